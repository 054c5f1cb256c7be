"""Texts offered by the app and used as the command line's default."""

FIJI = ("The majority of Fiji's islands were formed by volcanic activity starting around 150 million years ago. "
        "Some geothermal activity still occurs today on the islands of Vanua Levu and Taveuni.")
REPEATED = ("The quick brown fox jumps over the lazy dog. Mr and Mrs Dursley of number four, Privet Drive. "
            "The quick brown fox jumps over the lazy dog. Mr and Mrs Dursley of number four, Privet Drive.")
CODE = "def mean(values):\n    total = sum(values)\n    return total / len(values)\n\nprint(mean([1, 2, 3]))\n"

PRESETS = {
    "The notebook's Fiji text": FIJI,
    "Repeated phrases (induction)": REPEATED,
    "A code snippet": CODE,
}

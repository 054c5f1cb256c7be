"""--from-report gives back everything a report embeds: the results, the ablation / neuron / comparison sections
(<script id="headscope-beyond">) and the induction probe's results (<script id="headscope-probe-results">).

Ground truth is each report's own embedded JSON, read here with plain json.loads, and the --json written by the same
run; a damaged or tampered section is one line and exit status 2, never dropped.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analysis import load_model
from analysis.ablation import compute_ablation
from analysis.results import HEAD_SCORE_NAMES
from analysis.schema import BEYOND_SCHEMA_NAME, SCHEMA_NAME, schema_file
from reports.__main__ import GIVEN, build_parser, main, parse_arguments
from reports.beyond import BEYOND_ID
from reports.html import PROBE_ID, RESULTS_ID
from tests.conftest import REPEATS
from tests.lm_checkpoints import float16_overflow_lm, tiny_gpt2_lm
from tests.reports.test_cli import assert_one_line_error, run_cli


def embedded(page: str, script_id: str):
    """The JSON of the page's <script id=script_id>, parsed without headscope's reader (None when absent)."""
    match = re.search(rf'<script type="application/json" id="{script_id}">(.*?)</script>', page, re.DOTALL)
    return None if match is None else json.loads(match.group(1))


def write_both(capsys, out, *argv) -> tuple:
    """One run's --json and --html (the same analysis): the JSON written, less its provenance, and the page."""
    code, lines = run_cli(capsys, *argv, "--json", out / "first.json", "--html", out / "report.html")
    assert code == 0, lines
    written = json.loads((out / "first.json").read_text(encoding="utf-8"))
    written.pop("provenance")  # the page shows it in HTML, not in its JSON
    return written, (out / "report.html").read_text(encoding="utf-8")


def read_back(capsys, report, out) -> dict:
    code, lines = run_cli(capsys, "--from-report", report, "--json", out)
    assert code == 0, lines
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lm_paths(tmp_path_factory):
    return [tiny_gpt2_lm(tmp_path_factory.mktemp(f"from-report-seed{seed}"), seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def beyond_report(lm_paths, tmp_path_factory):
    """An --ablation --neuron report (and its run's --json), for the tampering tests."""
    out = tmp_path_factory.mktemp("beyond")
    argv = ["--model", lm_paths[0], "--text", REPEATS, "--layer", "1", "--head", "2", "--ablation", "mean",
            "--neuron", "-1", "3", "--json", out / "first.json", "--html", out / "report.html"]
    assert main([str(arg) for arg in argv]) == 0
    return out / "report.html"


def test_an_ablation_and_neuron_report_gives_back_both_sections(beyond_report, tmp_path, capsys):
    page = beyond_report.read_text(encoding="utf-8")
    results, sections = embedded(page, RESULTS_ID), embedded(page, BEYOND_ID)
    assert sorted(sections) == ["ablation", "neuron"]
    back = read_back(capsys, beyond_report, tmp_path / "back.json")
    assert back == {**results, "ablation": sections["ablation"], "neuron": sections["neuron"]}
    written = json.loads((beyond_report.parent / "first.json").read_text(encoding="utf-8"))
    written.pop("provenance")
    assert back == written  # exactly the --json of the run that wrote the report


def test_a_compare_report_gives_back_the_compare_document(lm_paths, tmp_path, capsys):
    written, page = write_both(capsys, tmp_path, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", REPEATS,
                               "--all-layers", "--head", "1", "--ablation", "zero", "--neuron", "-1", "2")
    sections = embedded(page, BEYOND_ID)
    assert sections["compare"]["schema"] == "headscope.compare/1" and sections["compare"]["ablation"] is not None
    back = read_back(capsys, tmp_path / "report.html", tmp_path / "back.json")
    assert back == {**sections["compare"], "neuron": sections["neuron"]}
    assert back["ablation"]["a"] == sections["ablation"]  # A's atlas, the report's own ablation section
    assert back == written


def test_a_with_probe_report_gives_back_the_probe(gpt2_path, tmp_path, capsys):
    written, page = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", REPEATS, "--layer", "2",
                               "--with-probe", "12", "--probe-seed", "3")
    probe = embedded(page, PROBE_ID)
    assert probe["settings"]["induction_probe"] == {"length": 12, "seed": 3}
    back = read_back(capsys, tmp_path / "report.html", tmp_path / "back.json")
    assert back == {**embedded(page, RESULTS_ID), "probe": probe}
    assert back == written  # --json beside --with-probe carries the probe too


def test_a_plain_report_gives_back_its_results_only(gpt2_path, tmp_path, capsys):
    written, page = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", REPEATS, "--layer", "2")
    assert embedded(page, BEYOND_ID) is None and embedded(page, PROBE_ID) is None
    assert read_back(capsys, tmp_path / "report.html", tmp_path / "back.json") == embedded(page, RESULTS_ID) == written


def test_a_patterns_run_gives_back_its_json_less_the_patterns(gpt2_path, tmp_path, capsys):
    """A report embeds no attention patterns, so --from-report gives back the --json of a --patterns run without
    them (the README said "exactly the --json written"): the rest is that JSON, and the patterns were there."""
    written, _ = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", REPEATS, "--layer", "1", "--patterns")
    assert all("patterns" in layer for layer in written["layers"].values())
    less = {**written, "layers": {key: {name: value for name, value in layer.items() if name != "patterns"}
                                  for key, layer in written["layers"].items()}}
    assert read_back(capsys, tmp_path / "report.html", tmp_path / "back.json") == less


def strict(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity refused."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def as_json(values) -> list:
    """What an atlas must be in JSON: its numbers, null where the number is NaN or infinite."""
    return [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(values)]


def test_an_ablation_that_overflows_float16_is_null_and_reads_back(tmp_path_factory, tmp_path, capsys):
    """float16 logits past 65504 make the loss inf or NaN: --json wrote nothing (ValueError: Out of range float
    values) and the report embedded NaN, which --from-report then refused as not JSON. Now null, both ways; ground
    truth is the same ablation run here."""
    every = float16_overflow_lm(tmp_path_factory.mktemp("overflow-all"), 3e4)  # even the unablated loss is NaN
    some = float16_overflow_lm(tmp_path_factory.mktemp("overflow-some"), 1.95e4)  # heads whose removal overflows
    written, page = write_both(capsys, tmp_path, "--model", every, "--compare", some, "--dtype", "float16",
                               "--text", "The cat sat on the mat.", "--layer", "1", "--ablation", "zero")
    truth = [compute_ablation(load_model(str(path), dtype="float16", head=True), "The cat sat on the mat.", "zero")
             for path in (every, some)]
    assert np.isnan(truth[0].baseline) and not np.isfinite(truth[0].delta).any()  # the case this test is about
    ablation = written["ablation"]
    assert ablation["a"]["baseline"] is None and ablation["a"]["delta"] == as_json(truth[0].delta)
    assert ablation["b"]["delta"] == as_json(truth[1].delta)
    assert ablation["difference"] == as_json(truth[1].delta - truth[0].delta)
    assert strict(json.dumps(embedded(page, BEYOND_ID))) == embedded(page, BEYOND_ID)  # no NaN in the page either
    assert strict((tmp_path / "first.json").read_text(encoding="utf-8"))
    assert read_back(capsys, tmp_path / "report.html", tmp_path / "back.json") == written


def _edit(change):
    def payload(good: dict) -> str:
        data = json.loads(json.dumps(good))
        change(data)
        return json.dumps(data)
    return payload


TAMPERED_SECTIONS = {
    "invalid JSON": (lambda good: '{"ablation": oops}',
                     r"The ablation/neuron/compare JSON in .*tampered\.html is not valid JSON \(Expecting value"),
    "NaN": (lambda good: json.dumps(good).replace('"dot": ', '"dot": NaN, "was": ', 1),
            r"is not valid JSON \(NaN is not a JSON number\)\.$"),
    "a list": (lambda good: "[1, 2]", (r"does not match headscope\.beyond-1\.schema\.json: the document must be of "
                                      r"type object, not list\.$")),
    "no section": (lambda good: "{}", r"does not match headscope\.beyond-1\.schema\.json: the document is empty\.$"),
    "an unknown section": (_edit(lambda d: d.update(patching={"x": 1})),
                           (r"holds a section this headscope cannot read back \('patching'; it knows ablation, "
                            r"neuron, compare\)")),
    "a string in the atlas": (_edit(lambda d: d["ablation"]["delta"][1].__setitem__(2, "0.5")),
                              r"at ablation\.delta\[1\]\[2\] must be of type number or null, not str\.$"),
    "a missing field": (_edit(lambda d: d["neuron"].pop("products")),
                        r"at neuron lacks the field 'products'\.$"),
    "an unknown mode": (_edit(lambda d: d["ablation"].update(mode="half")), r"at ablation\.mode "),
    "a weight above 1": (_edit(lambda d: d["neuron"]["weights"].__setitem__(0, 3.0)),
                         r"at neuron\.weights\[0\] is 3\.0, out of the allowed range"),
    "an atlas of the wrong shape": (_edit(lambda d: d["ablation"]["delta"].pop()),
                                    r"does not fit the report's results: ablation\.delta is not 3 layers x 4 heads\.$"),
    "a neuron past the text": (_edit(lambda d: d["neuron"]["weights"].append(0.0)),
                               r"does not fit the report's results: the neuron view has \d+ weights values for \d+\.$"),
    "a neuron head past the model": (_edit(lambda d: d["neuron"].update(head=9)),
                                     r"the neuron view's head 9 is past the model's heads \(0\.\.3\)\.$"),
    "a masked position past the text": (_edit(lambda d: d["ablation"]["masked_positions"].append(999)),
                                        r"a masked position of ablation lies past its last token\.$"),
    # the writer's fields are fixed: one more is refused, not passed through to the output
    "a field in the ablation": (_edit(lambda d: d["ablation"].update(injected="hello")),
                                r"at ablation has a field this version does not know \('injected'\)\.$"),
    "a field in the neuron view": (_edit(lambda d: d["neuron"].update(injected=[1, 2])),
                                   r"at neuron has a field this version does not know \('injected'\)\.$"),
    # what a reader can check against the results, and values the writer derives from others
    "an ablation of another text": (_edit(lambda d: d["ablation"].update(tokens=["x"], masked_positions=[])),
                                    r"fit the report's results: ablation has 1 tokens for the results' \d+\.$"),
    "a neuron reading another key head": (_edit(lambda d: d["neuron"].update(kv_head=0)),
                                          r"the neuron view's head 2 reads key head 2, not 0\.$"),
    "a neuron query token not the text's": (_edit(lambda d: d["neuron"].update(query_token="ZZZ")),
                                            r"the neuron view's query_token is not the text's token \d+\.$"),
    "a neuron dot not its products' sum": (_edit(lambda d: d["neuron"].update(dot=12345.0)),
                                           r"the neuron view's dot is not the sum of its products"),
    "a neuron product not q_i k_i": (_edit(lambda d: d["neuron"]["products"].__setitem__(0, 99.0)),
                                     r"the neuron view's products are not q_i \* k_i\.$"),
}


def tampered(report, tmp_path, script_id: str, payload: str):
    page = report.read_text(encoding="utf-8")
    block = re.compile(rf'(<script type="application/json" id="{script_id}">)(.*?)(</script>)', re.DOTALL)
    assert block.search(page) is not None
    out = tmp_path / "tampered.html"
    out.write_text(block.sub(lambda m: m.group(1) + payload + m.group(3), page, count=1), encoding="utf-8")
    return out


@pytest.mark.parametrize("case", list(TAMPERED_SECTIONS))
def test_a_tampered_beyond_section_is_one_line_and_exit_2(beyond_report, tmp_path, capsys, case):
    payload, pattern = TAMPERED_SECTIONS[case]
    good = embedded(beyond_report.read_text(encoding="utf-8"), BEYOND_ID)
    code, lines = run_cli(capsys, "--from-report", tampered(beyond_report, tmp_path, BEYOND_ID, payload(good)),
                          "--json", tmp_path / "out.json")
    assert_one_line_error(code, lines)
    assert code == 2 and re.search(pattern, lines[0]), lines[0]
    assert len(lines[0]) < 400
    assert not (tmp_path / "out.json").exists()  # nothing is written from a tampered report


def test_a_tampered_comparison_is_one_line_and_exit_2(lm_paths, tmp_path, capsys):
    _, page = write_both(capsys, tmp_path, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", "The cat sat.")
    good = embedded(page, BEYOND_ID)
    for change, pattern in [
        (lambda d: d["compare"]["b"]["layers"]["1"].pop("q_means"),
         (r"The ablation/neuron/compare JSON in .* at compare\.b is not a headscope\.results/1 document: at layers\.1 "
         r"lacks the field 'q_means'\.$")),
        (lambda d: d["compare"].update(schema="headscope.compare/2"),
         r"at compare\.schema must be 'headscope\.compare/1', not 'headscope\.compare/2'\.$"),
        (lambda d: d["compare"]["score_difference"]["entropy"].pop(),
         r"compare\.score_difference\.entropy is not 3 layers x 4 heads\.$"),
    ]:
        report = tampered(tmp_path / "report.html", tmp_path, BEYOND_ID, _edit(change)(good))
        code, lines = run_cli(capsys, "--from-report", report, "--json", tmp_path / "out.json")
        assert_one_line_error(code, lines)
        assert code == 2 and re.search(pattern, lines[0]), lines[0]
        assert not (tmp_path / "out.json").exists()


def _other_a(d: dict) -> None:
    d["compare"]["a"]["text"] = "a different text"
    d["compare"]["a"]["head_scores"]["induction"][0][0] = 0.99


def _bogus_score(d: dict) -> None:
    d["compare"]["score_difference"]["bogus"] = d["compare"]["score_difference"]["entropy"]


def _shifted(change: float):
    """A change of every entry of the ablation difference: by much, or by less than float rounding."""
    def edit(d: dict) -> None:
        grid = d["compare"]["ablation"]["difference"]
        d["compare"]["ablation"]["difference"] = [[None if v is None else v + change for v in row] for row in grid]
    return edit


def test_a_comparison_that_contradicts_itself_or_the_page_is_one_line_and_exit_2(lm_paths, tmp_path, capsys):
    """A comparison's A is the page's own results, its differences are B - A of its atlases, its Q/K rows are
    A's and B's statistics, its score names are the known ones: a report edited otherwise is refused. Ground truth
    is the untouched report, which reads back; and a change smaller than float rounding is no contradiction."""
    _, page = write_both(capsys, tmp_path, "--model", lm_paths[0], "--compare", lm_paths[1], "--text", "The cat sat.",
                         "--ablation", "zero")
    good = embedded(page, BEYOND_ID)
    for change, pattern in [
        (_other_a, r"compare\.a is not the report's own results"),
        (lambda d: d["compare"].update(qk_stats=[]), r"compare\.qk_stats is not the Q/K statistics of compare\.a "),
        (lambda d: d["compare"]["qk_stats"][0].update(q_means_a=7.0), r"compare\.qk_stats is not the Q/K statistics"),
        (lambda d: d["compare"]["qk_stats"][0].update(injected=1.0), r"at compare\.qk_stats\[0\] has a field this "),
        (_bogus_score, r"at compare\.score_difference has a name this version does not know \('bogus'; it knows "),
        (lambda d: d["compare"]["score_difference"].pop("entropy"),
         r"compare\.score_difference holds .*, not the scores both models have"),
        (lambda d: d["compare"]["score_difference"]["induction"][1].__setitem__(2, 0.5),
         r"compare\.score_difference\.induction at L1H2 is 0\.5, not B - A\.$"),
        (_shifted(5.0), r"compare\.ablation\.difference at L0H0 is .*, not B - A\.$"),
        (lambda d: d["compare"]["ablation"].update(difference=None), r"compare\.ablation\.difference is missing"),
        (lambda d: d["compare"]["ablation"]["a"].update(tokens=["x"], masked_positions=[]),
         r"compare\.ablation\.a has 1 tokens for the results' \d+\.$"),
        (lambda d: d["ablation"].update(seed=9), r"compare\.ablation\.a is not the report's own ablation atlas\.$"),
        (lambda d: d["compare"].update(injected=1), r"at compare has a field this version does not know"),
    ]:
        report = tampered(tmp_path / "report.html", tmp_path, BEYOND_ID, _edit(change)(good))
        code, lines = run_cli(capsys, "--from-report", report, "--json", tmp_path / "out.json")
        assert_one_line_error(code, lines)
        assert code == 2 and re.search(pattern, lines[0]), lines[0]
        assert not (tmp_path / "out.json").exists()
    report = tampered(tmp_path / "report.html", tmp_path, BEYOND_ID, _edit(_shifted(1e-12))(good))
    assert read_back(capsys, report, tmp_path / "out.json")["ablation"]["a"] == good["ablation"]


def test_the_schemas_know_the_score_names_of_the_results():
    for name in (SCHEMA_NAME, BEYOND_SCHEMA_NAME):
        schema = json.loads(schema_file(name).read_text(encoding="utf-8"))
        assert schema["$defs"]["score_name"]["enum"] == list(HEAD_SCORE_NAMES), name


def test_results_with_a_score_this_version_does_not_know_are_refused(gpt2_path, tmp_path, capsys):
    """A head score of another name is not passed through to the output as if headscope had computed it."""
    _, page = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", REPEATS, "--layer", "2")
    good = embedded(page, RESULTS_ID)
    payload = _edit(lambda d: d["head_scores"].update({"<b>copying</b>": d["head_scores"]["sink"]}))(good)
    code, lines = run_cli(capsys, "--from-report", tampered(tmp_path / "report.html", tmp_path, RESULTS_ID, payload),
                          "--json", tmp_path / "out.json")
    assert_one_line_error(code, lines)
    assert code == 2 and re.search(r"at head_scores has a name this version does not know \('<b>copying</b>'; it "
                                   r"knows previous_token, duplicate_token, induction, sink, self, entropy\)\.$",
                                   lines[0]), lines[0]
    assert not (tmp_path / "out.json").exists()


def test_a_tampered_probe_is_one_line_and_exit_2(gpt2_path, tmp_path, capsys):
    _, page = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", "The cat sat.", "--with-probe", "6")
    good = embedded(page, PROBE_ID)
    for change, pattern in [
        (lambda d: d.pop("head_scores"),
         (r"The induction probe's results JSON in .* is not a headscope\.results/1 document: the document lacks the "
         r"field 'head_scores'\.$")),
        (lambda d: d["settings"].update(induction_probe=None), r"is not the induction probe's"),
    ]:
        report = tampered(tmp_path / "report.html", tmp_path, PROBE_ID, _edit(change)(good))
        code, lines = run_cli(capsys, "--from-report", report, "--json", tmp_path / "out.json")
        assert_one_line_error(code, lines)
        assert code == 2 and re.search(pattern, lines[0]), lines[0]
        assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("flags, named", [
    (["--html", "again.html"], "--html"),
    (["--patterns"], "--patterns"),
    (["--figures", "figs"], "--figures"),
    (["--ablation", "zero", "--layer", "1"], "--layer, --ablation"),
    (["--compare", "other"], "--compare"),
    # flags with a default, refused when typed, even at their default's value
    (["--model", "gpt2"], "--model"),
    (["--head", "0"], "--head"),
    (["--device", "cpu"], "--device"),
    (["--dtype", "float16"], "--dtype"),
    (["--probe-seed", "0"], "--probe-seed"),
    (["--mask-seed", "3"], "--mask-seed"),
    (["--include-bos", "--model=auto", "--revision", "main"], "--model, --include-bos, --revision"),
    (["--batch-size", "4"], "--batch-size"),  # set to 1 after parsing when not typed
    (["--ray-workers", "2"], "--ray-workers"),
    (["--query-position", "2"], "--query-position"),
    # refused as --from-report's, not by another check that points elsewhere ("add --figures", "add --batch", ...)
    (["--format", "png"], "--format"),
    (["--shared-assets"], "--shared-assets"),
    (["--input-changed"], "--input-changed"),
    (["--engine", "local"], "--engine"),
    (["--no-layers"], "--no-layers"),
    (["--from-results", "d"], "--from-results"),
    # distinct flags joined by ", "; "/" only between the names of one value
    (["--text-json", '"x"', "--head", "1"], "--text/--text-json, --head"),
])
def test_flags_that_from_report_would_ignore_are_refused(tmp_path, capsys, flags, named):
    """A report cannot be redrawn (it holds no attention patterns) nor analysed again: such a flag is one line, not
    silently ignored; nor can it be read with another model, head, device or dtype."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--from-report", "r.html", "--json", str(tmp_path / "o.json"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "--from-report writes the JSON a report holds" in lines[0] and f"drop {named} (see" in lines[0], lines[0]


@pytest.mark.parametrize("argv", [
    [],
    ["--text", "x", "--head", "0", "--layer", "1", "--layer", "2", "--json", "o.json", "--include-bos"],
    ["--model=auto", "--dtype", "float16", "--with-probe", "--html", "r.html", "--ablation", "mean"],
    ["--batch", "t.txt", "--results", "out", "--text-column", "body", "--probe-seed", "7"],
])
def test_knowing_which_flags_were_typed_changes_no_value(argv):
    """The values are argparse's own, defaults included; given_flags names exactly the flags of argv."""
    parser = build_parser()
    args = vars(parse_arguments(parser, argv))
    given = args.pop(GIVEN)
    assert args == vars(parser.parse_args(argv))
    assert sorted(flag.split("/")[0] for flag in given) == sorted({arg.split("=")[0] for arg in argv
                                                                   if arg.startswith("--")})


def test_flags_that_share_a_dest_are_named_together(tmp_path, capsys):
    """--text and --text-json fill one value: a refusal names both, as argparse cannot tell which was typed."""
    args = parse_arguments(build_parser(), ["--text-json", '"x"'])
    assert args.text == "x" and getattr(args, GIVEN) == ("--text/--text-json",)


def _first_reports_results(data: dict) -> None:
    """The results as headscope's first reports embedded them (b50553b..2958e2f, 2026-11-28, before a0c2e3e added the
    head scores): no head_scores, settings of exclude_first_token alone, a model without device_map and local_path."""
    del data["head_scores"]
    data["settings"] = {"exclude_first_token": data["settings"]["exclude_first_token"]}
    for key in ("device_map", "local_path"):
        data["model"].pop(key, None)


def test_a_report_from_before_the_head_scores_is_refused_as_such_in_one_line(gpt2_path, tmp_path, capsys):
    """A report of headscope's first days claims headscope.results/1 but has no head scores: not a damaged file (as
    'lacks the field head_scores' read), one line saying it predates them and where the page names its commit."""
    _, page = write_both(capsys, tmp_path, "--model", gpt2_path, "--text", REPEATS, "--layer", "2")
    payload = _edit(_first_reports_results)(embedded(page, RESULTS_ID))
    code, lines = run_cli(capsys, "--from-report", tampered(tmp_path / "report.html", tmp_path, RESULTS_ID, payload),
                          "--json", tmp_path / "out.json")
    assert_one_line_error(code, lines)
    assert code == 2 and re.search(r"tampered\.html was written before headscope computed head scores .*read it with "
                                   r"the headscope that wrote it, .*What produced this report", lines[0]), lines[0]
    assert not (tmp_path / "out.json").exists()
    damaged = _edit(lambda d: d.pop("head_scores"))(embedded(page, RESULTS_ID))  # today's, its head scores cut out
    code, lines = run_cli(capsys, "--from-report", tampered(tmp_path / "report.html", tmp_path, RESULTS_ID, damaged),
                          "--json", tmp_path / "out.json")
    assert code == 2 and lines[0].endswith("is not a headscope.results/1 document: the document lacks the field "
                                           "'head_scores'."), lines[0]


def test_a_corpus_page_is_named_as_such_not_as_no_report(gpt2_path, tmp_path, capsys):
    """--from-report of a --batch folder's corpus.html said 'holds no headscope results: is it a headscope report?',
    of headscope's own page; it says what the page is and what reads what."""
    batch = tmp_path / "texts.txt"
    batch.write_text("The cat sat on the mat.\nA dog ran home.\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", batch, "--out-dir", tmp_path / "out")
    assert code == 0, lines
    code, lines = run_cli(capsys, "--from-report", tmp_path / "out" / "corpus.html", "--json", tmp_path / "c.json")
    assert_one_line_error(code, lines)
    assert code == 2 and "corpus.html is a corpus report (means over many texts)" in lines[0], lines[0]
    assert "report-NNNN.html" in lines[0] and not (tmp_path / "c.json").exists()
    assert read_back(capsys, tmp_path / "out" / "report-0001.html", tmp_path / "one.json")["text"] == (
        "The cat sat on the mat.")

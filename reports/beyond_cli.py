"""The command line's flags beyond observation (issue 15): --ablation, --neuron, --compare, --revision.

Kept apart from reports/__main__.py, which only calls `add_arguments`, `check_arguments`, `load_kwargs` and
`compute`, so those flags stay one local change there.
"""

from __future__ import annotations

from analysis.choices import ABLATION_BATCH, ABLATION_MODES

NEEDS_TEXT = "{flag} works on one text or the induction probe, not on --batch: drop one of them."
COMPARE_PROBE = "--compare runs both models on a text: drop --induction-probe (or --compare)."
ABLATION_ONLY = "{flags} {verb} read by --ablation only: add --ablation zero|mean, or drop {it}"
SECTION_OUTPUT = ("{flags} {verb} a section to the --html report or the --json results, which --figures does not "
                  "draw: add one of them")
SECTIONS = ("ablation", "neuron", "compare")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("beyond observation")
    group.add_argument("--ablation", choices=ABLATION_MODES,
                       help="add the ablation atlas: each head's output removed in turn (zero, or its mean over "
                            "positions) and the change in the text's loss measured (hidden-state change without an "
                            "LM head)")
    group.add_argument("--mask-seed", type=int, default=0,
                       help="seed of the 15%% of positions an encoder's masked-token loss scores (default 0)")
    group.add_argument("--ablation-batch", type=int, metavar="N",
                       help=f"copies of the text per ablation pass (default: up to {ABLATION_BATCH}, fewer for long "
                            "texts)")
    group.add_argument("--neuron", type=int, nargs=2, metavar=("QUERY", "KEY"),
                       help="add the neuron view of --head on the first --layer (without one, the default layer; "
                            "with --compare, the one the comparison measures): q_i*k_i per dimension for the query "
                            "and key token positions (negative counts from the end)")
    group.add_argument("--compare", metavar="MODEL_B",
                       help="run the text through a second model with the same tokenizer too: both atlases, their "
                            "difference and the Q/K statistics side by side (--json then writes headscope.compare/1)")
    group.add_argument("--revision", help="branch, tag or commit of a hub --model (e.g. Pythia's step1000)")
    group.add_argument("--compare-revision", metavar="REVISION", help="branch, tag or commit of the hub MODEL_B")


def check_arguments(parser, args) -> None:
    if args.batch is not None or getattr(args, "from_results", None) is not None:
        for flag in ("ablation", "neuron", "compare"):
            if getattr(args, flag) is not None:
                parser.error(NEEDS_TEXT.format(flag=f"--{flag}"))
    if args.batch is None and getattr(args, "from_results", None) is None:  # one text (--batch refuses them all)
        settings = [flag for flag in ("--mask-seed", "--ablation-batch") if flag in getattr(args, "given_flags", ())]
        if settings and args.ablation is None:
            one = len(settings) == 1
            parser.error(ABLATION_ONLY.format(flags=", ".join(settings), verb="is" if one else "are",
                                              it="it" if one else "them"))
        sections = [f"--{flag}" for flag in SECTIONS if getattr(args, flag) is not None]
        if sections and args.json is None and args.html is None:  # computed, then written nowhere
            parser.error(SECTION_OUTPUT.format(flags=", ".join(sections), verb="adds" if len(sections) == 1 else "add"))
    if args.compare is not None and args.induction_probe is not None:
        parser.error(COMPARE_PROBE)
    if args.compare_revision is not None and args.compare is None:
        parser.error("--compare-revision needs --compare MODEL_B")
    if args.ablation_batch is not None and args.ablation_batch < 1:
        parser.error("--ablation-batch must be at least 1")
    if not 0 <= args.mask_seed <= 2**32 - 1:  # numpy's seeds, as --probe-seed
        parser.error(f"--mask-seed must be a whole number in 0..{2**32 - 1}, not {args.mask_seed}")


def load_kwargs(args) -> dict:
    """What load_model needs beyond the usual: the LM head for the ablation's loss, the revision."""
    return {"head": args.ablation is not None, "revision": args.revision}


def load_other(args):
    """--compare's model B (with an LM head when --ablation asks for its loss), or None without --compare. Loaded
    before A's analysis: without --layer, both are measured on the shallower model's default layer (shared_layers)."""
    if args.compare is None:
        return None
    from analysis import load_model  # torch: imported when a flag needs it, not for --help

    return load_model(args.compare, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      head=args.ablation is not None, revision=args.compare_revision)


def shared_layers(loaded, other) -> int:
    """The layers the default layer is chosen among: A's, or with --compare the shallower model's, so that without
    --layer the report, the neuron view and the comparison are on the one layer both models have and the recorded
    command (--layer L) recomputes all of them."""
    return loaded.info.n_layers if other is None else min(loaded.info.n_layers, other.info.n_layers)


def compute(loaded, text: str, result, args, other=None) -> dict:
    """{"ablation", "neuron", "compare"}: those asked for (the others None); `other`: load_other's model B."""
    from analysis import default_layer
    from analysis.ablation import compute_ablation
    from analysis.compare import compare_models
    from analysis.neuron import neuron_view

    source = result.token_ids if result.induction_probe else text
    extras = {"ablation": None, "neuron": None, "compare": None}
    n_layers = shared_layers(loaded, other)
    if args.neuron is not None:
        layer = args.layer[0] if args.layer else default_layer(n_layers)
        extras["neuron"] = neuron_view(loaded, source, layer, args.head, *args.neuron)
    if other is not None:  # with --ablation it measures both models' atlases: A's is the report's too
        layers = None if args.all_layers else (args.layer or [default_layer(n_layers)])  # a layer both models have
        extras["compare"] = compare_models(loaded, other, text, layers, not args.include_first_token,
                                           args.ablation, args.mask_seed, args.ablation_batch,
                                           query_position=args.query_position,
                                           exclude_special_keys=args.exclude_special_keys,
                                           exclude_bos=not args.include_bos)
        extras["ablation"] = extras["compare"].ablation_a
    elif args.ablation is not None:
        extras["ablation"] = compute_ablation(loaded, source, args.ablation, args.mask_seed, args.ablation_batch)
    return extras


def json_document(result_doc: dict, extras: dict) -> dict:
    """The results JSON with "ablation"/"neuron" added, or, with --compare, the headscope.compare/1 document
    (reports.beyond.document_with); its provenance's command carries the flags that recompute them."""
    from reports.beyond import document_with, reproduce_with

    sections = {name: None if value is None else value.to_dict() for name, value in extras.items()}
    doc = document_with(result_doc, sections)
    if "provenance" in result_doc:
        provenance = dict(result_doc["provenance"])
        provenance["command"] = reproduce_with(provenance["command"], **extras)
        doc["provenance"] = provenance
    return doc


def any_requested(args) -> bool:
    return any(getattr(args, flag) is not None for flag in SECTIONS)


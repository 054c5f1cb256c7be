"""The command line: python -m reports --text "..." (--json OUT | --html OUT), batches, and reading reports back.

Bad input ends with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from analysis.choices import DEVICE_MAPS, DTYPE_NAMES
from analysis.errors import HeadscopeError, OutputError
from analysis.presets import FIJI
from reports import beyond_cli
from reports.choices import FORMATS
from reports.provenance import results_json
from reports.untrusted import needs_text_file, visible

# torch (analysis.pipeline, .capture, .corpus, .loading) and altair/pandas (reports.figures, reports.html) are
# imported inside the functions that use them: --help and bad flags answer without them (issue 10: under a second).

EXIT_BAD_INPUT = 2
CORPUS_FILE = "corpus.html"
INDEX_FILE = "index.html"
BATCH_REPORT = re.compile(r"report-\d{4,}\.(html|text\.txt)")  # the names --out-dir gives a text's report and text
EARLIER_REPORTS = "headscope: {n} reports of an earlier batch removed from {out_dir} (not this batch's texts)"
LOCK_FILE = ".headscope-batch.lock"  # in --out-dir DIR or --results DIR: locked (flock) while a run writes there
BATCH_BUSY = ("{folder} is being written by another headscope batch ({holder}): its index would list reports this "
              "one writes over or removes; wait for it to end, or give this batch another --out-dir")
RESULTS_BUSY = ("{folder} is being written by another headscope run ({holder}): both would analyse the texts without a "
                "row and write them twice, or two inputs' rows under the same numbers; wait for it to end (the same "
                "command then goes on from its rows), or give this run another --results folder")
BATCH_STOPPED = ("{error} The batch stopped at {where}: {kept} in {out_dir}, without an index.html; free some space "
                 "(or fix the folder's permissions) and run the same command again.")
INTERRUPTED = ("headscope: interrupted: the files written before it stay (a --batch --out-dir has no index.html yet; "
               "a --results folder goes on from its rows when the same command runs again)")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C stopped
NOT_UTF8 = "{path} is not UTF-8 text (bad byte at offset {offset}): save it as UTF-8 and try again."
NOT_UNICODE_JSON = ("is not Unicode text (a lone surrogate escape at character {offset}): write the character "
                    "itself, or both halves of its surrogate pair")
NOT_UTF8_ARG = "--text is not UTF-8 text (bad byte at character {offset}): save the text as UTF-8 and use --text-file."
FROM_REPORT_ONLY = ("--from-report writes the JSON a report holds (--json OUT) and neither analyses nor redraws (a "
                    "report holds no attention patterns): drop {flags}")
STDIN_NAME = "standard input"  # --text-file -
NO_LAYER_FOR = "--no-layers measures no layer, and {flag} needs one: give --layer N instead."
RESULTS_QUERY = ("{flags}: Parquet results are measured with the default query token and exclusions; drop {it}, or "
                 "write reports with --batch FILE --out-dir DIR, which takes {it}")
RESULTS_LAYERS = ("{flags}: Parquet results hold every layer's measurements and draw no heatmap; drop {it}, or write "
                  "reports with --batch FILE --out-dir DIR, which takes {it}")
BOTH_STDOUT = "--json - and --html - would both write to standard output: send one of them to a file"
SAME_FILE = "--json and --html both name {path}: the page would overwrite the results; give each its own file"
OVER_INPUT = "{out} {path} is the {input} input: writing it would destroy what it reads; write to another file"
FIGURES_STDOUT = "--figures writes a folder of files, not standard output: name a folder instead of '-'"
NOT_A_FOLDER = "{flag} {path} is a file, not a folder: name a folder (one that does not exist yet is made)"
UNUSED = "{flags} {verb} not used by {mode}: drop {it}"
# what each corpus mode reads (flags typed but not read are refused with UNUSED, not silently ignored)
OUT_DIR_MODE = "--batch FILE --out-dir DIR, which writes its reports, index.html and corpus.html into DIR"
OUT_DIR_READS = ("--model", "--batch", "--out-dir", "--layer", "--all-layers", "--head", "--include-first-token",
                 "--query-position", "--exclude-special-keys", "--include-bos", "--device", "--dtype", "--device-map",
                 "--revision", "--batch-size", "--figures", "--format", "--shared-assets")
RESULTS_MODE = ("--batch FILE --results DIR, which writes Parquet rows and corpus.json (the corpus report and its "
                "means with --html OUT and --json OUT), no report per text")
RESULTS_READS = ("--model", "--batch", "--results", "--engine", "--ray-address", "--ray-workers", "--ray-wait",
                 "--batch-size", "--input-changed", "--text-column", "--include-first-token", "--device", "--dtype",
                 "--device-map", "--revision", "--html", "--json")
FROM_RESULTS_MODE = "--from-results DIR, which draws the folder's corpus as it was measured and analyses nothing"
FROM_RESULTS_READS = ("--from-results", "--html", "--json")
ONE_TEXT_MODE = "a single text's run, only by --batch FILE"
# what one text would not read
CORPUS_ONLY = ("--out-dir", "--ray-workers", "--ray-wait", "--batch-size", "--text-column")
PROBE_SEED_ALONE = "--probe-seed is the seed of --induction-probe or --with-probe: add one of them, or drop it"
PATTERNS_JSON = ("--patterns writes every attention pattern into the --json results (a report or a figure does not "
                 "hold them): add --json OUT, or drop --patterns")
RAY_WORKERS_LOCAL = "--ray-workers is the number of Ray workers: add --engine ray (or --ray-address), or drop it"
RAY_WAIT_LOCAL = ("--ray-wait waits for a Ray cluster joined by --ray-address to grow (a local Ray instance does "
                  "not): add --ray-address, or drop it")


MAX_SEED = 2**32 - 1
DEFAULT_PROBE = object()  # --with-probe without a LENGTH: analysis.PROBE_LENGTH (not imported, for --help's speed)
NOT_TYPED = object()  # a defaulted flag's value while parsing: still there afterwards, the flag was not typed
GIVEN = "given_flags"  # the attribute of parse_arguments' namespace naming the flags typed, in --help's order
FROM_REPORT_FLAGS = ("--from-report", "--json")  # all that --from-report reads
LAYER_FLAGS = ("--layer", "--all-layers", "--no-layers", "--head")  # what a report shows: not Parquet results
RESULTS_BATCH_SIZE = 16  # --batch-size of --results (Parquet rows); --out-dir's is 1


def json_text(value: str) -> str:
    """--text-json: a text as a JSON string ("..." with backslash escapes), how a recorded command carries a text
    with control characters when no file holds it; or argparse's one-line error."""
    try:
        text = json.loads(value)
    except ValueError:
        text = None
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError("is not a JSON string: write the text in double quotes, with JSON's "
                                         "backslash escapes (\\n, \\u0000, ...)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate escape (\ud800): JSON's syntax allows it, Unicode text not
        raise argparse.ArgumentTypeError(NOT_UNICODE_JSON.format(offset=exc.start)) from None
    return text


def wait_seconds(text: str) -> float:
    """--ray-wait: seconds, 0 or more (a finite number), or argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def seed_value(text: str) -> int:
    """--probe-seed: a whole number 0..2**32-1 (numpy's seed range), or argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..{MAX_SEED}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(EXIT_BAD_INPUT, f"headscope: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "python -m reports") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Analyse attention heads and write the results.")
    parser.add_argument("--model", default="auto",
                        help="hub id, local checkpoint directory, or 'auto' (gpt2 if cached, else the bundled MiniLM)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to analyse (default: the notebook's Fiji sentences)")
    source.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file ('-': standard input)")
    source.add_argument("--text-json", dest="text", type=json_text, metavar="JSON",
                        help="the text as a JSON string, e.g. '\"tab\\there\"' (how a reproduce command carries a "
                             "text with control characters when no file beside the output holds it)")
    source.add_argument("--induction-probe", type=int, metavar="LENGTH",
                        help="instead of a text, seeded random tokens of LENGTH repeated twice (induction scores "
                             "then mean something whatever the model)")
    parser.add_argument("--probe-seed", type=seed_value, default=0,
                        help="seed of --induction-probe or --with-probe (default 0)")
    parser.add_argument("--with-probe", type=int, nargs="?", const=DEFAULT_PROBE, metavar="LENGTH",
                        help="beside the text, run the induction probe too (LENGTH random tokens written twice; "
                             "default 50) and add its atlases to the --html report (its results to --json, under "
                             "\"probe\")")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layer", type=int, action="append", metavar="N",
                        help="layer to analyse, 0-based; repeat for several (default: 6, or n_layers // 2)")
    layers.add_argument("--all-layers", action="store_true", help="analyse every layer")
    layers.add_argument("--no-layers", action="store_true",
                        help="no per-layer measurements, only every layer's head scores (the atlases), as the probe "
                             "of --with-probe")
    parser.add_argument("--include-first-token", action="store_true",
                        help="keep the first token in the means, stds and dot products")
    parser.add_argument("--query-position", type=int, metavar="P",
                        help="the query token of the dot products and the query read-out, 0-based; negative counts "
                             "from the end (default: the final token of a causal model, the last non-special "
                             "token of an encoder)")
    parser.add_argument("--exclude-special-keys", action="store_true",
                        help="leave the special tokens (BOS, CLS, SEP, ...) out of the query's keys")
    parser.add_argument("--include-bos", action="store_true",
                        help="keep a BOS/CLS token at position 0 in the head scores (by default it is left out, as "
                             "TransformerLens's exclude_bos; a first word is always kept)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES),
                        help="precision the model runs in; the measurements are computed in float32 either way")
    parser.add_argument("--device-map", choices=list(DEVICE_MAPS),
                        help="'auto': spread a model too large for one device over the GPUs and CPU memory "
                             "(Accelerate's big-model loading); --device is then not used")
    parser.add_argument("--head", type=int, default=0, help="head whose attention heatmap the report shows")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results JSON here ('-': stdout)")
    parser.add_argument("--patterns", action="store_true", help="include every [head][q][k] attention pattern")
    parser.add_argument("--html", type=Path, metavar="OUT", help="write a standalone HTML report here")
    parser.add_argument("--batch", type=Path, metavar="FILE",
                        help="one text per line, or JSONL with a 'text' field: one report per text plus index.html")
    parser.add_argument("--out-dir", type=Path, metavar="DIR", help="where --batch writes its reports")
    parser.add_argument("--from-report", type=Path, metavar="REPORT",
                        help="read the JSON back out of a headscope HTML report (with --json): the results, and the "
                             "ablation, neuron, comparison or induction probe sections it holds, as its --json was")
    add_results_arguments(parser)
    beyond_cli.add_arguments(parser)
    parser.add_argument("--figures", type=Path, metavar="DIR",
                        help="write every figure as a file for a paper (vl-convert, no browser), named by layer, "
                             "head and figure, with figures.json (captions, sizes); with --batch one folder per text")
    parser.add_argument("--format", choices=FORMATS, help="file format of --figures (default: pdf)")
    parser.add_argument("--shared-assets", action="store_true",
                        help="with --batch: the pages load one copy of the Vega JavaScript from DIR/assets/ instead "
                             "of each inlining it (default: every page stands alone)")
    return parser


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus mode with results kept as Parquet (analysis.corpus_store), on this process or on Ray Data."""
    group = parser.add_argument_group("corpus results (Parquet rows + corpus.json; reruns resume)")
    group.add_argument("--results", type=Path, metavar="DIR",
                       help="with --batch: write one Parquet row per text and corpus.json to DIR; a rerun into the "
                            "same DIR analyses only the texts without a row (FILE: .txt, .jsonl, .parquet, a folder "
                            "of Parquet files or a dataset saved with datasets' save_to_disk)")
    group.add_argument("--engine", choices=["local", "ray"],
                       help="local (default): in this process; ray: on Ray Data (a local Ray instance, or "
                            "--ray-address)")
    group.add_argument("--ray-address", metavar="ADDR", help="join a running Ray cluster ('auto': the one this "
                                                             "machine belongs to); implies --engine ray")
    group.add_argument("--ray-workers", type=int, metavar="N",
                       help="model workers on Ray (default: one per GPU, or 1 without GPUs)")
    group.add_argument("--ray-wait", type=wait_seconds, default=0.0, metavar="SECONDS",
                       help="where the cluster lacks the GPUs or CPUs the workers need: ask its autoscaler for them "
                            "and wait up to SECONDS for them before refusing the run (default: 0, refuse at once)")
    group.add_argument("--batch-size", type=int, metavar="N",
                       help=f"texts per forward pass (default: {RESULTS_BATCH_SIZE} with --results; 1 with --out-dir, "
                            "each report then exactly its single-text run's numbers)")
    group.add_argument("--input-changed", action="store_true",
                       help="with --results: FILE is not the input DIR's rows are of (edited, shortened, replaced): "
                            "drop the rows of texts it changed or no longer has and analyse it as it is now (without "
                            "it such a rerun is refused and DIR left as it was)")
    group.add_argument("--text-column", default="text", metavar="NAME",
                       help="the text field of .jsonl, Parquet and saved datasets (default: text)")
    group.add_argument("--from-results", type=Path, metavar="DIR",
                       help="the corpus report (--html OUT) or its means as JSON (--json OUT) from a results folder")


def check_results_arguments(parser, args) -> None:
    if args.results is not None or args.from_results is not None:
        given = query_flags(args)
        if given:
            parser.error(RESULTS_QUERY.format(flags=join_flags(given), it="it" if len(given) == 1 else "them"))
        layers = [flag for flag in getattr(args, GIVEN, ()) if flag in LAYER_FLAGS]  # run_results reads none of them
        if layers:
            parser.error(RESULTS_LAYERS.format(flags=join_flags(layers), it="it" if len(layers) == 1 else "them"))
    if args.ray_address is not None and args.engine is None:
        args.engine = "ray"
    if args.engine == "ray" and args.device_map is not None:  # run_ray's workers load the model without it
        parser.error("--device-map is not used with --engine ray")
    if args.results is not None and args.engine != "ray" and args.ray_workers is not None:
        parser.error(RAY_WORKERS_LOCAL)
    if args.results is not None and args.ray_address is None and "--ray-wait" in getattr(args, GIVEN, ()):
        parser.error(RAY_WAIT_LOCAL)
    if args.engine == "ray" and args.revision is not None:  # its workers load the model by name
        parser.error("--revision is not used with --engine ray: run it with the local engine")
    if args.batch_size is None:
        args.batch_size = RESULTS_BATCH_SIZE if args.results is not None or args.from_results is not None else 1
    if args.batch_size < 1 or (args.ray_workers is not None and args.ray_workers < 1):
        parser.error("--batch-size and --ray-workers must be at least 1")
    if args.from_results is not None:
        if args.json is None and args.html is None:
            parser.error("--from-results needs --html OUT and/or --json OUT")
        if args.batch is not None or args.from_report is not None:
            parser.error("--from-results reads a results folder; drop --batch/--from-report")
    elif args.results is not None:
        if args.batch is None:
            parser.error("--results DIR needs --batch FILE (the texts)")
        if args.out_dir is not None:
            parser.error("--out-dir writes one report per text, --results the Parquet rows: choose one")
    elif args.engine is not None:
        parser.error("--engine and --ray-address need --batch FILE --results DIR")
    elif args.input_changed:
        parser.error("--input-changed needs --batch FILE --results DIR (it drops rows of a results folder)")
    if args.text_column != "text" and args.results is None:
        parser.error("--text-column is read by --batch FILE --results DIR (JSONL, Parquet, saved datasets); "
                     "--out-dir reads JSONL's \"text\" field")


def check_outputs(parser, args) -> None:
    if args.from_report is not None:  # first: any other flag is refused as --from-report's, not as that flag's own
        check_from_report(parser, args)
        if args.json is None:
            parser.error("--from-report needs --json OUT")
        return
    if args.format is not None and args.figures is None:
        parser.error("--format is the format of --figures DIR: add --figures")
    check_destinations(parser, args)
    if args.shared_assets and args.batch is None:
        parser.error("--shared-assets shares the JavaScript between the pages of --batch: add --batch FILE "
                     "--out-dir DIR")
    check_results_arguments(parser, args)
    if args.from_results is not None or args.results is not None:
        if args.text is not None or args.text_file is not None or args.induction_probe is not None:
            parser.error("the corpus reads its texts from --batch FILE; drop --text/--text-file/--induction-probe")
    elif args.batch is not None:
        if args.out_dir is None:
            parser.error("--batch needs --out-dir DIR (one report per text) or --results DIR (Parquet rows)")
        if args.text is not None or args.text_file is not None or args.induction_probe is not None:
            parser.error("--batch reads its texts from FILE; drop --text/--text-file/--induction-probe")
    elif args.json is None and args.html is None and args.figures is None:
        parser.error("say where to write: --json OUT and/or --html OUT (or --batch FILE --out-dir DIR)")
    beyond_cli.check_arguments(parser, args)
    check_with_probe(parser, args)
    for flag in ("neuron", "compare", "batch"):
        if args.no_layers and getattr(args, flag) is not None:
            parser.error(NO_LAYER_FOR.format(flag=f"--{flag}"))
    check_unused(parser, args)
    for flag, folder in (("--out-dir", args.out_dir), ("--figures", args.figures)):  # before any text is analysed
        if folder is not None and folder.exists() and not folder.is_dir():
            parser.error(NOT_A_FOLDER.format(flag=flag, path=visible(str(folder))))


def check_destinations(parser, args) -> None:
    """--json and --html to one place would leave the last written alone (on stdout, the two one after the other)."""
    if args.figures is not None and str(args.figures) == "-":
        parser.error(FIGURES_STDOUT)
    inputs = {flag: path for flag, path in (("--text-file", args.text_file), ("--batch", args.batch))
              if path is not None and str(path) != "-"}
    for out_flag, out in (("--json", args.json), ("--html", args.html)):
        for in_flag, source in inputs.items():
            if out is not None and str(out) != "-" and out.resolve() == source.resolve():
                parser.error(OVER_INPUT.format(out=out_flag, path=visible(str(out)), input=in_flag))
    if args.json is None or args.html is None:
        return
    if str(args.json) == "-" and str(args.html) == "-":
        parser.error(BOTH_STDOUT)
    if "-" not in (str(args.json), str(args.html)) and args.json.resolve() == args.html.resolve():
        parser.error(SAME_FILE.format(path=visible(str(args.json))))


def check_unused(parser, args) -> None:
    """A corpus mode reads only its own flags, one text none of --batch's: one typed that the run would not use is
    refused, not silently ignored (even at its default's value, as --from-report's; the more specific refusals
    above come first)."""
    if args.from_results is not None:
        mode, reads = FROM_RESULTS_MODE, FROM_RESULTS_READS
    elif args.results is not None:
        mode, reads = RESULTS_MODE, RESULTS_READS
    elif args.batch is not None:
        mode, reads = OUT_DIR_MODE, OUT_DIR_READS
    else:
        check_one_text(parser, args)
        mode, reads = ONE_TEXT_MODE, None
    given = getattr(args, GIVEN, ())
    unused = [flag for flag in given if flag in CORPUS_ONLY] if reads is None else [f for f in given if f not in reads]
    if unused:
        one = len(unused) == 1
        parser.error(UNUSED.format(flags=join_flags(unused), verb="is" if one else "are", mode=mode,
                                   it="it" if one else "them"))


def check_one_text(parser, args) -> None:
    """One text's flags that only mean something beside another: each is refused without it, not ignored."""
    if "--probe-seed" in getattr(args, GIVEN, ()) and args.induction_probe is None and args.with_probe is None:
        parser.error(PROBE_SEED_ALONE)
    if args.patterns and args.json is None:  # results_json alone writes them
        parser.error(PATTERNS_JSON)


def parse_arguments(parser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args(argv), and which flags were typed (args.given_flags), those with a default too (--model,
    --head, --device, --dtype, ...). argparse fills a default in only where the namespace has no value yet: each
    defaulted flag starts as NOT_TYPED, and one still NOT_TYPED after parsing gets its default, as parse_args gives
    it; a flag whose default is None was typed when it is not None."""
    defaults = vars(parser.parse_args([]))
    filled = {dest for dest, value in defaults.items() if value is not None}
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(filled, NOT_TYPED)))
    typed = [dest for dest in defaults if getattr(args, dest) is not (NOT_TYPED if dest in filled else None)]
    for dest in filled - set(typed):
        setattr(args, dest, defaults[dest])
    names = {}  # dest -> its flags: "--text/--text-json" share one
    for action in parser._actions:
        names[action.dest] = "/".join(filter(None, (names.get(action.dest), *action.option_strings)))
    setattr(args, GIVEN, tuple(names[dest] for dest in typed))
    return args


def join_flags(flags: list[str]) -> str:
    """Flags for a message: distinct flags joined by ", " ("/" joins the names of one value: --text/--text-json)."""
    return ", ".join(flags)


def check_from_report(parser, args) -> None:
    """--from-report writes the JSON a report embeds: any other flag is refused, not ignored (a report holds no
    attention patterns, so it cannot be redrawn, nor --patterns written, nor read with another model, head, device
    or dtype: it is not analysed again)."""
    given = [flag for flag in getattr(args, GIVEN) if flag not in FROM_REPORT_FLAGS]
    if given:
        parser.error(FROM_REPORT_ONLY.format(flags=join_flags(given)))


def check_with_probe(parser, args) -> None:
    """--with-probe: one text's --html report, beside the text (not instead of it), no other extra section."""
    if args.with_probe is None:
        return
    if args.with_probe is not DEFAULT_PROBE and args.with_probe < 1:
        parser.error(f"--with-probe LENGTH must be at least 1, not {args.with_probe}")
    if args.induction_probe is not None:
        parser.error("--with-probe runs the probe beside a text; --induction-probe analyses the probe instead of one")
    if args.batch is not None or args.from_report is not None or args.from_results is not None:
        parser.error("--with-probe adds the probe to one text's report: drop --batch/--from-report/--from-results")
    if args.html is None and args.json is None:
        parser.error("--with-probe adds the probe to the --html report or the --json results: add one")
    if beyond_cli.any_requested(args):
        parser.error("--with-probe and --ablation/--neuron/--compare: one extra section at a time")


def read_utf8(path: Path) -> str:
    """The UTF-8 text of `path`, or of standard input for '-' (a reproduce command's text too long for it)."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise HeadscopeError(f"Cannot read {path}: {exc.strerror}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        name = STDIN_NAME if str(path) == "-" else path
        raise HeadscopeError(NOT_UTF8.format(path=name, offset=exc.start)) from None


def read_text(args) -> str:
    if args.text_file is None:
        text = FIJI if args.text is None else args.text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the terminal's encoding could not decode (surrogate escapes)
            raise HeadscopeError(NOT_UTF8_ARG.format(offset=exc.start)) from None
        return text
    return read_utf8(args.text_file)


def read_batch(path: Path) -> tuple[list[str | HeadscopeError], list[int], str]:
    """Texts of a batch file: plain lines, or JSONL objects with a "text" field (a bad line becomes its error,
    a line that is not UTF-8 too); the file's line of each (blank lines are not texts: report-0500.html may be of
    line 501); and the SHA-256 of the file's bytes, which the batch's pages record."""
    from analysis.corpus import numbered_texts

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HeadscopeError(f"Cannot read {path}: {exc.strerror}.") from None
    lines, texts = zip(*numbered_texts(data, source=str(path)))
    return list(texts), list(lines), hashlib.sha256(data).hexdigest()


def write_text(out: Path, payload: str) -> None:
    if str(out) == "-":
        sys.stdout.write(payload + "\n")
        return
    try:
        out.write_text(payload, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"Cannot write {out}: {exc.strerror}.") from None


def text_file_beside(out: Path) -> Path | None:
    """Where the text goes when the reproduce command of `out` cannot quote it: OUT's stem + .text.txt; None for
    stdout ('-'), beside which nothing is written (the command then carries the text: provenance.text_options)."""
    return None if str(out) == "-" else out.with_name(f"{out.stem}.text.txt")


def text_file_name(out: Path) -> str | None:
    """The name the reproduce command of `out` gives the text file (it runs in OUT's folder), or None."""
    beside = text_file_beside(out)
    return None if beside is None else beside.name


def write_text_beside(out: Path, result) -> None:
    """The text, exactly, beside `out` when its reproduce command reads it from there (reports.provenance)."""
    text_file = text_file_beside(out)
    if text_file is None or result.induction_probe or not needs_text_file(result.text):
        return
    try:
        text_file.write_bytes(result.text.encode("utf-8"))  # bytes: the text exactly, \r and NUL included
    except OSError as exc:
        raise OutputError(f"Cannot write {text_file}: {exc.strerror}.") from None


def write_report(out: Path, result, head: int, assets: str | None = None, probe=None,
                 outputs: tuple[str, ...] = ("--html", "report.html"), source: dict | None = None) -> None:
    """The HTML report (with the induction probe's section when `probe`), and beside it the text when its
    reproduce command cannot quote it. `outputs`: what that command writes; `source`: a batch text's place in its
    file (render_report)."""
    from reports.html import render_report

    write_text(out, render_report(result, head=head, text_file=text_file_name(out), assets=assets,
                                  probe=probe, outputs=outputs, source=source))
    write_text_beside(out, result)


def write_json(data: dict, out: Path) -> None:
    write_text(out, json.dumps(data, allow_nan=False))


def _quiet_libraries(own_process: bool = False) -> None:
    """Quiet transformers; and, in the command line's own process (python -m reports, headscope), Altair's check of
    every chart part against its schema as the part is made (its debug mode, a process-wide switch) off: a quarter of
    a report's drawing time, for the same bytes. main() called in a process of others' charts (the tests) leaves it
    on."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if own_process:
        from altair.utils.schemapi import disable_debug_mode

        disable_debug_mode()


def check_head(head: int, n_heads: int) -> None:
    if not 0 <= head < n_heads:
        raise HeadscopeError(f"Head {head} is out of range: this model has heads 0..{n_heads - 1}.")


def query_flags(args) -> list[str]:
    """The flags of query_options that were given (Parquet results are measured without them)."""
    given = {"--query-position": args.query_position is not None, "--exclude-special-keys": args.exclude_special_keys,
             "--include-bos": args.include_bos}
    return [flag for flag, on in given.items() if on]


def query_options(args) -> dict:
    """The query token and the two exclusions of issue 12, as analyze's keyword arguments."""
    return {"query_position": args.query_position, "exclude_special_keys": args.exclude_special_keys,
            "exclude_bos": not args.include_bos}


def chosen_layers(args, n_layers: int) -> list[int] | None:
    """The layers to measure: --layer's, none (--no-layers), every one (None: --all-layers), else the default."""
    from analysis import default_layer

    if args.no_layers:
        return []
    return None if args.all_layers else (args.layer or [default_layer(n_layers)])


def analyse(loaded, text: str, args, n_layers: int):
    """The patterns are kept only when something shows them: --patterns, or a report's heatmaps. `n_layers`: the
    layers the default layer is chosen among (beyond_cli.shared_layers)."""
    from analysis import analyze, analyze_induction_probe

    layers = chosen_layers(args, n_layers)
    keep = args.patterns or args.html is not None or args.batch is not None or args.figures is not None
    options = {"exclude_first_token": not args.include_first_token, "keep_patterns": keep,
               **query_options(args)}
    if args.induction_probe is not None:
        return analyze_induction_probe(loaded, args.induction_probe, args.probe_seed, layers, **options)
    return analyze(loaded, text, layers, **options)


def with_probe(loaded, args):
    """The induction probe's results for --with-probe (every layer's head scores, no per-layer figures), or None."""
    if args.with_probe is None:
        return None
    from analysis import PROBE_LENGTH, analyze_induction_probe

    length = PROBE_LENGTH if args.with_probe is DEFAULT_PROBE else args.with_probe
    return analyze_induction_probe(loaded, length, args.probe_seed, layers=[],
                                   exclude_first_token=not args.include_first_token, exclude_bos=not args.include_bos)


def run_single(args) -> None:
    from analysis import load_model
    from reports.figures import write_figures

    text = read_text(args)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                        **beyond_cli.load_kwargs(args))
    check_head(args.head, loaded.info.n_heads)
    other = beyond_cli.load_other(args)  # --compare's model B, before A's analysis: it decides the default layer
    result = analyse(loaded, text, args, beyond_cli.shared_layers(loaded, other))
    extras = beyond_cli.compute(loaded, text, result, args, other) if beyond_cli.any_requested(args) else None
    probe = with_probe(loaded, args)
    for warning in result.warnings + (extras["compare"].warnings if extras and extras["compare"] else ()):
        print(f"headscope: warning: {warning}", file=sys.stderr)
    if args.json is not None:
        doc = results_json(result, args.head, args.patterns, ("--json", "results.json"),
                           text_file=text_file_name(args.json))
        if probe is not None:  # as the report embeds it, so --from-report gives back this file
            from reports.html import with_probe_results

            doc = with_probe_results(doc, probe)
        write_json(doc if extras is None else beyond_cli.json_document(doc, extras), args.json)
        write_text_beside(args.json, result)
    if args.html is not None:
        if extras is None:
            write_report(args.html, result, args.head, probe=probe)
        else:
            from reports.beyond import render_report_with

            write_text(args.html, render_report_with(result, head=args.head, text_file=text_file_name(args.html),
                                                     **extras))
            write_text_beside(args.html, result)
    if args.figures is not None:
        write_figures(result, args.figures, args.format or "pdf", head=args.head)
    worst = max((layer.parity_max_abs_err for layer in result.layers.values()), default=None)
    parity = "" if worst is None else f", parity max abs err {worst:.1e}"  # --no-layers: no layer was checked
    outputs = " and ".join(visible(str(out)) for out in (args.json, args.html, args.figures) if out is not None)
    print(f"headscope: {visible(loaded.info.id)}, {result.n_tokens} tokens, layers {sorted(result.layers)}{parity} "
          f"-> {outputs}", file=sys.stderr)


def run_batch(args) -> int:
    """One report per text, and corpus.html with the means over all texts, from the same passes.

    The texts go through `analyze_batch` --batch-size at a time in file order (1, the default: each report holds
    exactly the numbers of its single-text run; more: padded passes, the same numbers to float rounding). Every
    layer is measured, for the corpus means; the report shows the chosen layers, whose patterns alone are kept.
    A text that fails is listed in index.html and corpus.html with its error; the rest are written and counted.
    """
    from analysis import load_model

    texts, lines, digest = read_batch(args.batch)
    # what index.html and corpus.html say produced them: the input file as read, and the command as typed
    run = {"input": str(args.batch), "sha256": digest, "command": args.command}
    # two batches into one DIR wrote over and removed each other's reports; the second is refused before its model
    # loads (it loaded the whole model first: 17 s for MiniLM on the CPU, minutes and a GPU's memory for a large one)
    with lock_folder(args.out_dir, BATCH_BUSY):
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            revision=args.revision)
        check_head(args.head, loaded.info.n_heads)
        return _write_batch(args, loaded, texts, lines, run)


@contextlib.contextmanager
def lock_folder(folder: Path, busy: str):
    """Holds FOLDER/LOCK_FILE locked while this run writes `folder` (a batch's --out-dir, a --results DIR), and removes
    it at the end (the lock goes with the process, killed too: a file left then locks nothing); a run already writing
    there is one line (`busy`: BATCH_BUSY, RESULTS_BUSY). A folder that does not exist is made to hold the lock, and
    removed at the end, with the parents made for it, when the run left nothing in it (it failed before writing: a
    bad --model). Readers (--from-results, the app) take no lock. Where the system or the file system has no flock
    (Windows, some network file systems), the run goes on without it."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HeadscopeError(f"Cannot create {folder}: {exc.strerror}.") from None
    try:
        with _locked(folder, busy):
            yield
    finally:
        for path in made:
            try:
                path.rmdir()  # only an empty folder: one the run wrote into stays
            except OSError:
                break


@contextlib.contextmanager
def _locked(folder: Path, busy: str):
    """lock_folder's flock on FOLDER/LOCK_FILE."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = folder / LOCK_FILE
    while True:
        try:
            handle = path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"Cannot write {path}: {exc.strerror}.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()  # what the holder wrote: its process id
            handle.close()
            holder = f"process {visible(holder)}" if holder.isdigit() else "another process"
            raise HeadscopeError(busy.format(folder=visible(str(folder)), holder=holder)) from None
        except OSError:
            handle.close()
            handle = None  # no locks here: as without flock
            break
        if _same_file(handle, path):
            break
        handle.close()  # the run that held it removed it as this one opened it: lock the file there now
    if handle is None:
        yield
        return
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # while locked: a run that opened it meanwhile sees it gone (_same_file) and retries


def _same_file(handle, path: Path) -> bool:
    """Whether the open `handle` is the file at `path` now (not one removed since it was opened)."""
    try:
        now = path.stat()
    except OSError:
        return False
    opened = os.fstat(handle.fileno())
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


def _write_batch(args, loaded, texts: list, lines: list[int], run: dict) -> int:
    """run_batch's writing, into the --out-dir it holds locked; `lines`: each text's line of the file."""
    from analysis import check_layers
    from analysis.corpus import CorpusAccumulator
    from reports.html import render_corpus_report, render_index, write_shared_assets

    for name in (INDEX_FILE, CORPUS_FILE):  # an earlier run's: stopped midway, they would list other texts
        remove_file(args.out_dir / name)
    assets = write_shared_assets(args.out_dir) if args.shared_assets else None
    entries = []
    model = loaded.info.to_dict()
    exclude_first_token = not args.include_first_token
    acc = CorpusAccumulator(model, exclude_first_token, **query_options(args))  # recorded in corpus.html
    try:
        layers = check_layers(chosen_layers(args, loaded.info.n_layers), loaded.info.n_layers)
    except HeadscopeError as exc:
        layers = exc  # every text fails with it, as before: listed, not a crash
    for first in range(0, len(texts), args.batch_size):
        chunk = texts[first:first + args.batch_size]
        for number, text, result in zip(range(first + 1, first + len(chunk) + 1), chunk,
                                        _analyse_chunk(loaded, chunk, layers, args)):
            try:
                entries.append(_write_batch_entry(number, text, result, layers, acc, assets, args,
                                                  lines[number - 1]))
            except OutputError as exc:  # a full disk fails every later text too: stop, keep what is written
                raise _batch_stopped(exc, f"text {number} of {len(texts)}", entries, args.out_dir) from None
    removed = remove_earlier_reports(args.out_dir, {entry[key] for entry in entries for key in ("file", "text_file")
                                                    if entry.get(key)})
    if removed:
        print(EARLIER_REPORTS.format(n=removed, out_dir=visible(str(args.out_dir))), file=sys.stderr)
    for name, page in ((CORPUS_FILE, lambda: render_corpus_report(acc.finish(), assets=assets, run=run,
                                                                     lines=lines)),
                       (INDEX_FILE, lambda: render_index(entries, model, corpus_file=CORPUS_FILE, run=run))):
        try:
            write_text(args.out_dir / name, page())
        except OutputError as exc:
            remove_partial(args.out_dir / name)
            raise _batch_stopped(exc, name, entries, args.out_dir) from None
    failed = sum(entry["error"] is not None for entry in entries)
    print(f"headscope: {len(entries) - failed} reports, {failed} failed -> {args.out_dir / INDEX_FILE}, "
          f"means over the texts -> {args.out_dir / CORPUS_FILE}", file=sys.stderr)
    return EXIT_BAD_INPUT if failed == len(entries) else 0  # every text failed: a script must see it


def _batch_stopped(exc: OutputError, where: str, entries: list[dict], out_dir: Path) -> HeadscopeError:
    """The one line of a batch that could not write a file: where it stopped, and the reports it keeps."""
    kept = sum(entry["error"] is None for entry in entries)
    return HeadscopeError(BATCH_STOPPED.format(
        error=exc, where=where, out_dir=visible(str(out_dir)),
        kept="the 1 report before it is" if kept == 1 else f"the {kept} reports before it are"))


def remove_partial(path: Path) -> None:
    """A file left cut short (or empty) by a write that failed: gone, so that nothing looks like a whole page."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the folder refuses that too: the write's own error is the one to tell


def remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise HeadscopeError(f"Cannot remove {path}: {exc.strerror}.") from None


def remove_earlier_reports(out_dir: Path, written: set[str]) -> int:
    """Removes the reports (and text files) of an earlier batch in `out_dir` that this one did not write over: a
    smaller batch, or a text that failed this time, left another text's report under a number of the new index.
    Only files of the names --out-dir gives (BATCH_REPORT) are touched; one that cannot be removed is a warning,
    not the end of the batch (its index is still to be written). Returns how many reports went."""
    removed = 0
    for path in out_dir.iterdir():
        if BATCH_REPORT.fullmatch(path.name) and path.name not in written and path.is_file():
            try:
                path.unlink()
            except OSError as exc:
                print(f"headscope: warning: cannot remove {visible(str(path))}, a report of an earlier batch: "
                      f"{exc.strerror}.", file=sys.stderr)
                continue
            removed += path.suffix == ".html"
    return removed


def _unexpected(exc: Exception) -> HeadscopeError:
    from analysis.corpus import UNEXPECTED
    from analysis.loading import one_line

    if isinstance(exc, HeadscopeError):
        return exc
    return HeadscopeError(UNEXPECTED.format(kind=type(exc).__name__, message=one_line(exc)))


def _analyse_chunk(loaded, chunk: list, layers, args) -> list:
    """Each item's AnalysisResult of every layer (patterns of `layers` kept) or its HeadscopeError. A pass that
    fails as a whole is retried text by text, so one bad text never fails its neighbours."""
    from analysis import analyze_batch

    if isinstance(layers, HeadscopeError):
        return [text if isinstance(text, HeadscopeError) else layers for text in chunk]
    strings = [text for text in chunk if isinstance(text, str)]
    options = {"exclude_first_token": not args.include_first_token, "keep_patterns": True, "keep_layers": layers,
               **query_options(args)}
    try:
        results = iter(analyze_batch(loaded, strings, args.batch_size, None, **options))
    except Exception as exc:  # noqa: BLE001 - retried alone below, or that text's error
        if len(strings) == 1:
            results = iter([_unexpected(exc)])
        else:
            results = iter([_analyse_chunk(loaded, [text], layers, args)[0] for text in strings])
    return [text if isinstance(text, HeadscopeError) else next(results) for text in chunk]


def _report_result(result, layers: list[int]):
    """The result restricted to the report's layers, its parity warning about those layers only."""
    from analysis.pipeline import check_parity
    from reports.html import select_layers

    every = set(check_parity(result.layers, result.model["dtype"]))
    shown = select_layers(result, layers)
    warnings = tuple(w for w in result.warnings if w not in every) + check_parity(shown.layers, result.model["dtype"])
    return dataclasses.replace(shown, warnings=warnings)


def _write_batch_entry(number: int, text, result, layers, acc, assets, args, line: int) -> dict:
    """Text `number`'s report (and figures), its row of the corpus, and its index.html entry; `line`: the file's
    line it is on (its report's number counts texts, not lines: a blank line is none)."""
    from analysis.corpus import excerpt
    from reports.figures import write_figures

    entry = {"number": number, "line": line, "excerpt": excerpt(text) if isinstance(text, str) else "",
             "error": None}
    try:
        if isinstance(result, HeadscopeError):
            raise result
        acc.add_result(result)
        shown = _report_result(result, layers)
        entry["file"] = f"report-{number:04d}.html"
        # its command, run in DIR, writes this text's page again (not a report.html beside the archive's)
        write_report(args.out_dir / entry["file"], shown, args.head, assets, outputs=("--html", entry["file"]),
                     source={"input": str(args.batch), "number": number, "line": line})
        if needs_text_file(shown.text):  # written beside it (write_text_beside)
            entry["text_file"] = text_file_name(args.out_dir / entry["file"])
        if args.figures is not None:
            write_figures(shown, args.figures / f"text-{number:04d}", args.format or "pdf", head=args.head)
        entry["n_tokens"] = shown.n_tokens
        entry["parity"] = max(layer.parity_max_abs_err for layer in shown.layers.values())
    except OutputError:  # not the text's: the batch stops (run_batch), and leaves nothing cut short behind
        if "file" in entry:  # and its text, which write_report writes after it
            remove_partial(args.out_dir / entry["file"])
            remove_partial(text_file_beside(args.out_dir / entry["file"]))
        raise
    except Exception as exc:  # noqa: BLE001 - a text's error is that text's: the others go on
        message = str(_unexpected(exc))
        entry["error"] = message
        if len(acc.records) < number:
            acc.add_failure(text if isinstance(text, str) else "", message)
        print(f"headscope: warning: text {number} (line {line}) failed: {message}", file=sys.stderr)
    return entry


def write_corpus_outputs(results: Path, args) -> None:
    """--html: the corpus report, --json: its means and intervals, both from the results folder's rows."""
    from analysis.corpus_store import ResultsFolder, load_results
    from reports.html import render_corpus_report

    corpus = load_results(results)
    if args.html is not None:  # the page names the input and the runs that wrote the rows (engine, command)
        write_text(args.html, render_corpus_report(corpus, manifest=ResultsFolder(results).read_manifest()))
    if args.json is not None:
        write_json(corpus.to_dict(), args.json)
    outputs = " and ".join(visible(str(out)) for out in (args.html, args.json) if out is not None)
    if outputs:
        print(f"headscope: {corpus.n_analysed} of {len(corpus.texts)} texts in {results} -> {outputs}", file=sys.stderr)


def run_results(args) -> int:
    """--batch FILE --results DIR: the per-text rows go to DIR as Parquet, on this process or on Ray. A rerun that
    will be refused (another input, other settings) is refused before the model loads, with either engine."""
    from analysis.corpus_io import check_input

    check_input(args.batch, args.text_column)  # a missing, damaged or columnless input: refused before any writing
    # two runs at once both read the rows at the start and both analysed the texts without one: held from before the
    # rerun check to the end
    with lock_folder(args.results, RESULTS_BUSY):
        return _write_results(args)


def _write_results(args) -> int:
    """run_results' run, into the --results DIR it holds locked."""
    from analysis import load_model
    from analysis.corpus import NO_TEXTS
    from analysis.corpus_io import iter_records
    from analysis.corpus_store import ResultsFolder, result_settings, run_local

    options = {"text_column": args.text_column, "exclude_first_token": not args.include_first_token,
               "batch_size": args.batch_size, "input_changed": args.input_changed, "command": args.command}
    if args.engine == "ray":
        from analysis.corpus_ray import run_ray  # the only path that imports Ray

        run = run_ray(args.model, args.batch, args.results, device=args.device, dtype=args.dtype,
                      address=args.ray_address, workers=args.ray_workers, wait=args.ray_wait,
                      waiting=lambda line: print(f"headscope: {line}", file=sys.stderr), **options)
    else:
        folder = ResultsFolder(args.results)
        checked = folder.check_rerun(str(args.batch), result_settings(options["exclude_first_token"]),
                                     args.text_column, args.dtype, args.input_changed)
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            revision=args.revision)
        run = run_local(loaded, iter_records(args.batch, args.text_column), folder, source=str(args.batch),
                        checked=checked, **options)
    if run["new_rows"] + run["skipped"] == 0:
        raise HeadscopeError(NO_TEXTS.format(source=args.batch))  # as --out-dir says it
    failed = run.get("new_failed", 0)
    dropped = f", {run['dropped']} dropped (texts the input changed or no longer has)" if run["dropped"] else ""
    relabelled = (f", {run['relabelled']} ids updated (their texts unchanged, not analysed again)"
                  if run["relabelled"] else "")
    retried, recovered = run.get("retried", 0), run.get("recovered", 0)
    again = f", {retried - recovered} failed again (their rows kept)" if retried > recovered else ""
    retry = f", {retried} retried (their rows held errors: {recovered} now analysed{again})" if retried else ""
    print(f"headscope: {run['new_rows']} texts written on {run['engine']} in {run['seconds']:.1f} s ({failed} failed), "
          f"{run['skipped']} already there{dropped}{relabelled}{retry} -> {args.results}", file=sys.stderr)
    write_corpus_outputs(args.results, args)
    analysed = ResultsFolder(args.results).read_rows(["error"])["error"].null_count  # the input's texts, all runs
    return EXIT_BAD_INPUT if analysed == 0 else 0  # every text failed (failed again, on a rerun)


def run(args, own_process: bool = False) -> int:
    """The exit status: 0, or EXIT_BAD_INPUT for a batch whose every text failed (its index still written).
    `own_process`: the command line runs as a process of its own (_quiet_libraries)."""
    _quiet_libraries(own_process)
    if args.from_results is not None:
        write_corpus_outputs(args.from_results, args)
    elif args.results is not None:
        return run_results(args)
    elif args.from_report is not None:
        from reports.html import read_report_document

        write_json(read_report_document(args.from_report), args.json)
    elif args.batch is not None:
        return run_batch(args)
    else:
        run_single(args)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m reports", own_process: bool = False) -> int:
    parser = build_parser(prog)
    args = parse_arguments(parser, argv)
    args.command = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])  # as typed: --batch's pages
    check_outputs(parser, args)
    try:
        return run(args, own_process)
    except HeadscopeError as exc:
        print(f"headscope: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the pass was
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def cli() -> None:
    """The `headscope` console script (pyproject.toml): the same command line as python -m reports."""
    sys.exit(main(prog="headscope", own_process=True))


if __name__ == "__main__":
    sys.exit(main(own_process=True))

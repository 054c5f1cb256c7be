"""Where a result came from: headscope's version and commit, library versions, the UTC time and the command line
that recomputes it. The HTML report, the command line's JSON and the app's JSON download carry the same block.
"""

from __future__ import annotations

import functools
import json
import shlex
from datetime import UTC, datetime

from analysis import __version__
from analysis.commit import COMPUTING, git_commit
from analysis.commit import library_versions as installed_versions
from analysis.results import AnalysisResult
from reports.untrusted import fits_argument, needs_text_file

RENDERING = ("altair", "jinja2", "vl-convert-python")  # what draws a report (beside commit.COMPUTING)
LIBRARIES = COMPUTING + RENDERING
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
TEXT_FILE = "report.text.txt"  # the text beside the output when a command line cannot carry it (untrusted.py)
STDIN = "-"  # --text-file -: the text on standard input (a text too long for a command line, output to stdout)
OUTPUT_FLAGS = ("--html", "--json", "--patterns")  # what a reproduce command writes: its flags come last


@functools.cache
def library_versions() -> tuple[tuple[str, str], ...]:
    """(name, version or "not installed") of LIBRARIES, in order."""
    return tuple((name, version or "not installed") for name, version in installed_versions(RENDERING).items())


def _option(flag: str, value: str) -> list[str]:
    """`--flag value`, or `--flag=value` when the value starts with '-' (argparse would take it for an option)."""
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]


def device_options(model: dict) -> list[str]:
    """The CLI's placement flags for a result's model: --device-map auto, or --device cpu|cuda.

    A --device-map auto run records the device of its input embeddings (e.g. cuda:0), which --device does not
    accept; a model placed on cuda:N by the library reruns on the CLI's `cuda`.
    """
    if model.get("device_map"):
        return ["--device-map", str(model["device_map"])]
    return ["--device", "cuda" if str(model["device"]).startswith("cuda") else "cpu"]


def model_options(flag: str, revision_flag: str, model: dict) -> list[str]:
    """`flag` and the name that loads `model` again from any folder, with its hub commit under `revision_flag`.

    The id records the name as given: for a local checkpoint perhaps relative to where that command ran (`./ckpt`),
    or a bare name (`ckpt`) that elsewhere is a hub id; the command names its absolute directory (`local_path`,
    analysis.loading.resolve_source's decision: a folder that exists wins over a hub id). A hub id or the bundled
    model's name stays as given.
    """
    if model.get("local_path"):
        return _option(flag, model["local_path"])
    return _option(flag, model["id"]) + revision_options(revision_flag, model)


def revision_options(flag: str, model: dict) -> list[str]:
    """`flag` and the hub commit a model was loaded at (a 40-digit hash: a hub snapshot), so that the command
    loads those weights even after the hub's main branch has moved on; nothing for a local or bundled model."""
    revision = str(model.get("revision") or "")
    local = model.get("local_path")  # a snapshot folder given as a path has a hash too, but --revision is hub-only
    return [flag, revision] if len(revision) == 40 and not revision.startswith("sha256:") and not local else []


def text_options(text: str, text_file: str | None) -> list[str]:
    """The flags that give the command `text`: --text as it is when a command line can carry it; else
    --text-file `text_file`, written beside the output; with no file beside it (output to stdout), --text-json
    and the text as a JSON string (ASCII: escapes for control characters), or, past what one argument holds,
    --text-file - (standard input: the `text` of the results)."""
    if not needs_text_file(text):
        return _option("--text", text)
    if text_file is not None:
        return _option("--text-file", text_file)
    escaped = json.dumps(text).replace("\x7f", "\\u007f")  # ASCII (ensure_ascii), every control an escape
    return ["--text-json", escaped] if fits_argument(escaped) else ["--text-file", STDIN]


def reproduce_command(result: AnalysisResult, head: int = 0,
                      outputs: tuple[str, ...] = ("--html", "report.html"), text_file: str | None = TEXT_FILE) -> str:
    """The command line that recomputes this result; derived from the result, so app and CLI agree.

    A text that a command line cannot carry (control characters, bidirectional controls, past 100 KB) is read
    from `text_file`, which the command line writes beside its output; None: nothing is written beside it
    (`--json -`), and the command carries the text itself (text_options). A result without per-layer
    measurements (the probe of --with-probe) says --no-layers, so that the command measures none either.
    """
    argv = ["python", "-m", "reports", *model_options("--model", "--revision", result.model)]
    probe = result.induction_probe
    if probe:
        argv += ["--induction-probe", str(probe["length"]), "--probe-seed", str(probe["seed"])]
    else:
        argv += text_options(result.text, text_file)
    for layer in sorted(result.layers):
        argv += ["--layer", str(layer)]
    if not result.layers:
        argv.append("--no-layers")
    argv += ["--head", str(head), *device_options(result.model), "--dtype", result.model["dtype"]]
    if not result.exclude_first_token:
        argv.append("--include-first-token")
    if result.query_choice == "chosen":
        argv += ["--query-position", str(result.query)]
    if result.exclude_special_keys:
        argv.append("--exclude-special-keys")
    if not result.exclude_bos:
        argv.append("--include-bos")
    return shlex.join(argv + list(outputs))


def corpus_command(corpus, batch_file: str, out_dir: str = "headscope-corpus") -> str:
    """The command line whose corpus.html recomputes `corpus` (analysis.corpus.CorpusResult) from `batch_file`, the
    file its texts were read from (the app's upload, saved under its name): to float rounding, --out-dir's texts
    go through the model one by one."""
    argv = ["python", "-m", "reports", *model_options("--model", "--revision", corpus.model),
            *_option("--batch", batch_file), *device_options(corpus.model), "--dtype", corpus.model["dtype"]]
    if not corpus.exclude_first_token:
        argv.append("--include-first-token")
    return shlex.join(argv + ["--out-dir", out_dir])


def insert_before_outputs(argv: list[str], flags: list[str]) -> str:
    """The command of `argv` with `flags` before its first output flag (--html, --json, --patterns), where a reproduce
    command keeps what it computes apart from what it writes; at the end without one."""
    outputs = [i for i, arg in enumerate(argv) if arg in OUTPUT_FLAGS]
    at = outputs[0] if outputs else len(argv)
    return shlex.join(argv[:at] + flags + argv[at:])


def with_probe_command(command: str, probe: AnalysisResult) -> str:
    """`command` with --with-probe LENGTH --probe-seed SEED before its outputs: what also recomputes the induction
    probe run beside the text (the report's section, the JSON's "probe")."""
    flags = ["--with-probe", str(probe.induction_probe["length"]), "--probe-seed", str(probe.induction_probe["seed"])]
    return insert_before_outputs(shlex.split(command), flags)


def build_provenance(result: AnalysisResult, head: int = 0, outputs: tuple[str, ...] = ("--html", "report.html"),
                     generated_at: datetime | None = None, text_file: str | None = TEXT_FILE) -> dict:
    """The provenance block as plain JSON values (libraries as {name: version})."""
    generated_at = generated_at or datetime.now(UTC)
    return {
        "headscope": __version__,
        "git_commit": git_commit(),
        "libraries": dict(library_versions()),
        "generated_at": generated_at.strftime(TIME_FORMAT),
        "command": reproduce_command(result, head, outputs, text_file),
    }


def results_json(result: AnalysisResult, head: int = 0, include_patterns: bool = False,
                 outputs: tuple[str, ...] = ("--json", "results.json"), generated_at: datetime | None = None,
                 text_file: str | None = TEXT_FILE) -> dict:
    """The results JSON with its provenance (what --json writes and the app downloads)."""
    if include_patterns and "--patterns" not in outputs:
        outputs = ("--patterns", *outputs)
    return {**result.to_dict(include_patterns=include_patterns),
            "provenance": build_provenance(result, head, outputs, generated_at, text_file)}

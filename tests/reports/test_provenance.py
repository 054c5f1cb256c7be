"""Reproducible provenance everywhere (issue 12, item 5): the reproduce command is valid for every run, and the
CLI's JSON and the app's JSON download carry the same provenance block as the report."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from analysis import analyze, analyze_induction_probe, loading
from reports import provenance, untrusted
from reports.__main__ import build_parser, main
from reports.html import read_report_results
from reports.untrusted import shown_command

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"headscope", "git_commit", "libraries", "generated_at", "command"}
TEXT = "The cat sat on the mat."


def parse(command: str):
    """The command as the CLI parses it (argparse exits with status 2 on anything it rejects)."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "reports"]
    return build_parser().parse_args(argv[3:])


def run_recorded(command: str, cwd: Path, stdin: bytes | None = None) -> None:
    """A recorded command run as a person runs it, in a subprocess from `cwd`: `python` is this interpreter with
    headscope importable (as after pip install); its outputs land in `cwd`."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "reports"], argv
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, input=stdin, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")


def results_of(doc: dict) -> dict:
    """A results JSON without its provenance (the time differs between runs)."""
    return {key: value for key, value in doc.items() if key != "provenance"}


def assert_same_results(got, want, where: str = "") -> None:
    """Two runs' results alike: every text, token, setting and shape equal, every number to float32 rounding. A
    rerun in another process is not bit for bit the same on every CPU (the BLAS's kernels may follow the buffers'
    alignment), and a checkpoint with sharp random heads grows that rounding (gpt2_path: ~2e-6 from one ulp; a CI
    rerun saw 1.3e-5), so runs compared across processes use steady_gpt2_path (~6e-8 from one ulp). A rerun with
    another setting, layer or text moves these numbers by far more than the 1e-6 allowed."""
    if isinstance(got, dict) and isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in got:
            assert_same_results(got[key], want[key], f"{where}.{key}")
    elif isinstance(got, list) and isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_results(a, b, f"{where}[{i}]")
    elif isinstance(got, float) and isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    else:
        assert got == want, where


def page_commands(page: str) -> list[str]:
    """The commands a report shows (its own, the probe's), as they read once the HTML is unescaped."""
    return [html.unescape(command) for command in re.findall(r"<pre>(python -m reports .*?)</pre>", page, re.DOTALL)]


def test_every_kind_of_run_reproduces_as_a_valid_command(gpt2):
    plain = analyze(gpt2, TEXT, [1, 3])
    runs = {
        "plain": plain,
        "device_map": replace(plain, model={**plain.model, "device": "cuda:0", "device_map": "auto"}),
        "cuda_n": replace(plain, model={**plain.model, "device": "cuda:1"}),
        "dash_text": replace(plain, text="-v --json x  and more"),
        "first_token": replace(plain, exclude_first_token=False),
        "bfloat16": replace(plain, model={**plain.model, "dtype": "bfloat16"}),
        "probe": analyze_induction_probe(gpt2, 12, 3, layers=[2]),
        "probe_no_layers": analyze_induction_probe(gpt2, 12, 3, layers=[]),  # as --with-probe's
    }
    for name, result in runs.items():
        args = parse(provenance.reproduce_command(result, head=5))
        assert args.model == result.model["local_path"] and args.head == 5, name  # a local checkpoint: its folder
        assert args.layer == (sorted(result.layers) or None) and args.no_layers == (not result.layers), name
        assert args.dtype == result.model["dtype"] and args.include_first_token == (not result.exclude_first_token)
        if result.induction_probe:
            assert (args.induction_probe, args.probe_seed) == (12, 3) and args.text is None
        else:
            assert args.text == result.text, name
        if result.model.get("device_map"):
            assert args.device_map == "auto", name
        else:
            assert args.device_map is None and args.device == result.model["device"].split(":")[0], name


def test_a_device_map_run_writes_a_command_that_reruns_it(gpt2_path, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert main(["--model", str(gpt2_path), "--text", TEXT, "--device-map", "auto", "--layer", "2",
                 "--json", str(first)]) == 0
    data = json.loads(first.read_text())
    assert data["model"]["device_map"] == "auto"
    command = data["provenance"]["command"]
    assert "--device-map auto" in command and "--device " not in command
    argv = shlex.split(command)[3:]
    argv[argv.index("--json") + 1] = str(tmp_path / "again.json")
    assert main(argv) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again.pop("provenance")["command"] == command
    assert again == {key: value for key, value in data.items() if key != "provenance"}


def test_cli_json_carries_the_reports_provenance(gpt2_path, tmp_path, capsys):
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert main(["--model", str(gpt2_path), "--text", TEXT, "--layer", "1", "--head", "2", "--json", str(out_json),
                 "--html", str(out_html)]) == 0
    block = json.loads(out_json.read_text())["provenance"]
    assert set(block) == KEYS and block["headscope"]
    datetime.strptime(block["generated_at"], "%Y-%m-%d %H:%M:%S UTC")
    assert block["libraries"]["torch"] and block["libraries"]["transformers"]
    page = html.unescape(out_html.read_text())
    assert f"<dt>headscope</dt><dd>{block['headscope']}" in page
    if block["git_commit"]:
        assert f"git commit <code>{block['git_commit']}</code>" in page
    for name, version in block["libraries"].items():
        assert f"{name} {version}" in page
    report_command = re.search(r"<dt>Reproduce with</dt><dd><pre>(.*?)</pre>", page, re.DOTALL)[1]
    assert report_command.removesuffix(" --html report.html") == block["command"].removesuffix(" --json results.json")
    assert parse(block["command"]).head == 2




def test_a_report_and_a_results_folder_name_the_same_libraries_that_computed_the_numbers(gpt2_path, tmp_path,
                                                                                       capsys):
    # a report named no tokenizers version and a results folder no scipy version, though the tokenizer splits the
    # text and scipy gives the small groups' Mann-Whitney p-values: each record named a different list
    from importlib import metadata

    out_json, source, results = tmp_path / "r.json", tmp_path / "in.txt", tmp_path / "res"
    assert main(["--model", str(gpt2_path), "--text", TEXT, "--json", str(out_json)]) == 0
    source.write_text(TEXT + "\n", encoding="utf-8")
    assert main(["--model", str(gpt2_path), "--batch", str(source), "--results", str(results)]) == 0
    capsys.readouterr()
    report = json.loads(out_json.read_text())["provenance"]["libraries"]
    manifest = json.loads((results / "corpus.json").read_text())
    for name in ("torch", "transformers", "tokenizers", "numpy", "scipy"):
        installed = metadata.version(name)
        assert report[name] == manifest["versions"][name] == manifest["runs"][0]["versions"][name] == installed, name


def test_a_checkout_with_uncommitted_edits_is_marked_dirty(monkeypatch):
    """Edits not committed change the numbers, so a report of such a checkout must not name the bare commit."""
    from analysis import commit

    clean = commit.git_commit.__wrapped__()
    if clean is None or not (commit.PACKAGE_ROOT / ".git").exists():
        pytest.skip("not a git checkout (an installed wheel records its build's commit)")
    monkeypatch.setattr(commit, "_modified", lambda: True)
    assert commit.git_commit.__wrapped__() == clean.removesuffix("-dirty") + "-dirty"
    monkeypatch.setattr(commit, "_modified", lambda: False)
    assert commit.git_commit.__wrapped__() == clean.removesuffix("-dirty")


def test_a_relative_local_model_reruns_from_another_folder(steady_gpt2_path, tmp_path, monkeypatch, capsys):
    """--model ./ckpt is the model's id as given, and the command names the folder's absolute path: run from
    another folder (the report's, a colleague's shell) it loads the same checkpoint and computes the same results."""
    monkeypatch.chdir(steady_gpt2_path.parent)
    relative, absolute = f"./{steady_gpt2_path.name}", str(steady_gpt2_path.resolve())
    out = tmp_path / "r.json"
    assert main(["--model", relative, "--text", TEXT, "--layer", "1", "--json", str(out)]) == 0, capsys.readouterr()
    first = json.loads(out.read_text())
    assert first["model"]["id"] == relative and first["model"]["local_path"] == absolute
    assert parse(first["provenance"]["command"]).model == absolute
    elsewhere = tmp_path / "elsewhere"
    run_recorded(first["provenance"]["command"], elsewhere)
    again = json.loads((elsewhere / "results.json").read_text())
    assert again["model"] == {**first["model"], "id": absolute}
    assert_same_results({**results_of(again), "model": None}, {**results_of(first), "model": None})


def test_every_command_names_a_local_model_by_its_absolute_path(gpt2_path, tmp_path, monkeypatch, capsys):
    """A bare folder name (elsewhere a hub id) in --batch's reports, --compare's second model and the probe's own
    command alike."""
    monkeypatch.chdir(gpt2_path.parent)
    name, absolute = gpt2_path.name, str(gpt2_path.resolve())
    (tmp_path / "texts.txt").write_text("A first text.\nA second one.\n", encoding="utf-8")
    runs = [["--batch", tmp_path / "texts.txt", "--out-dir", tmp_path / "out"],
            ["--text", TEXT, "--compare", name, "--json", tmp_path / "c.json"],
            ["--text", TEXT, "--with-probe", "8", "--html", tmp_path / "p.html"]]
    for argv in runs:
        assert main(["--model", name, "--layer", "1", *map(str, argv)]) == 0, capsys.readouterr().err
    compared = parse(json.loads((tmp_path / "c.json").read_text())["provenance"]["command"])
    assert (compared.model, compared.compare, compared.revision, compared.compare_revision) == (absolute, absolute,
                                                                                               None, None)
    commands = [*page_commands((tmp_path / "out" / "report-0002.html").read_text(encoding="utf-8")),
                *page_commands((tmp_path / "p.html").read_text(encoding="utf-8"))]
    assert len(commands) == 3 and all(parse(command).model == absolute for command in commands)


def test_a_batch_reports_command_writes_that_texts_report_again(steady_gpt2_path, tmp_path, capsys):
    """Each report of a --batch --out-dir archive names the page it is (report-NNNN.html): its command, run in the
    archive's folder, writes that page again with the same results (a text read from its report-NNNN.text.txt
    too); it once wrote a report.html that no archive holds."""
    out = tmp_path / "out"
    (tmp_path / "texts.txt").write_text("A first text.\nA right-to-left \u202eoverride\u202c.\n", encoding="utf-8")
    assert main(["--model", str(steady_gpt2_path), "--layer", "1", "--batch", str(tmp_path / "texts.txt"),
                 "--out-dir", str(out)]) == 0, capsys.readouterr().err
    for name in ("report-0001.html", "report-0002.html"):
        first = read_report_results(out / name)
        [command] = page_commands((out / name).read_text(encoding="utf-8"))
        args = parse(command)
        assert args.html == Path(name) and (args.text_file is None) == (name == "report-0001.html")
        (out / name).unlink()
        run_recorded(command, out)
        assert not (out / "report.html").exists()
        assert_same_results(read_report_results(out / name), first)


def test_a_hub_id_or_the_bundled_model_stays_as_given(gpt2, gpt2_path, tmp_path, monkeypatch):
    """Only a folder that the loader read as a local checkpoint becomes a path: a hub id keeps its name and its
    commit, the bundled MiniLM its name; a hub snapshot's folder given as a path gets no --revision (hub only)."""
    plain = analyze(gpt2, TEXT, [1])
    hub = replace(plain, model={**plain.model, "id": "org/name", "local_path": None, "revision": "a" * 40})
    args = parse(provenance.reproduce_command(hub))
    assert (args.model, args.revision) == ("org/name", "a" * 40)
    snapshot_folder = replace(plain, model={**plain.model, "revision": "b" * 40})
    args = parse(provenance.reproduce_command(snapshot_folder))
    assert (args.model, args.revision) == (str(gpt2_path.resolve()), None)
    old = replace(plain, model={key: value for key, value in plain.model.items() if key != "local_path"})
    assert parse(provenance.reproduce_command(old)).model == plain.model["id"]  # a document from before
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    monkeypatch.setattr(loading, "_cached_snapshot", lambda repo_id, revision=None: snapshot)
    assert loading.resolve_source("org/name").local is False
    assert loading.resolve_source("minilm").local is False
    assert loading.resolve_source(str(gpt2_path)).local is True


@pytest.mark.parametrize("too_long", [False, True])
def test_json_to_stdout_records_a_text_the_command_can_read(steady_gpt2_path, tmp_path, monkeypatch, capsys, too_long):
    """--json - writes nothing beside stdout, so a text that a command line cannot quote travels in the command
    itself (--text-json, printable ASCII) or, past what one argument holds, on standard input (--text-file -: the
    JSON's text); the command once named a report.text.txt that nobody wrote."""
    text = "NUL\x00 and a right-to-left \u202eoverride\u202c,\r\n\x1b[31m DEL\x7f, \u00e9t\u00e9."
    if too_long:
        monkeypatch.setattr(untrusted, "MAX_ARG_BYTES", 40)  # as a text past 100 KB, without its forward pass
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(steady_gpt2_path), "--text", text, "--layer", "2", "--json", "-"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []  # nothing written beside the output
    command = first["provenance"]["command"]
    argv = shlex.split(command)
    if too_long:
        assert argv[argv.index("--text-file") + 1] == "-"
    else:
        assert "--text-json" in argv and command.isascii() and command.isprintable()
    elsewhere = tmp_path / "elsewhere"
    run_recorded(command, elsewhere, stdin=first["text"].encode("utf-8") if too_long else None)
    again = json.loads((elsewhere / "results.json").read_text())
    assert again["text"] == text
    assert_same_results(results_of(again), results_of(first))


def test_the_shown_command_is_visible_and_bash_reads_the_same_arguments():
    """The page's form of a command: no character that a page hides or that copying changes, and bash, given it
    as text, passes exactly the recorded arguments (a name's undecodable byte included)."""
    argv = ["python", "-m", "reports", "--model", "/models/\u2066odd\u2069 name", "--text", "it's\tone\nline, \u00e9",
            "--text-file", "r\u202ex\u200b\u00a0\udcff.text.txt", "--json", "a b.json"]
    shown = shown_command(shlex.join(argv))
    assert all(char.isprintable() or char in "\n\t" for char in shown) and "\u200b" not in shown
    assert "$'r\\xe2\\x80\\xaex\\xe2\\x80\\x8b\\xc2\\xa0\\xff.text.txt'" in shown
    done = subprocess.run(["bash", "-c", "printf '%s\\0' " + shown], capture_output=True, timeout=30, check=True)
    assert done.stdout.split(b"\0")[:-1] == [os.fsencode(arg) for arg in argv]


def test_characters_unicode_draws_as_nothing_are_quoted_whatever_their_category():
    """Hangul fillers (letters), variation selectors and the grapheme joiner (marks), tag characters, the blank
    braille pattern: each shows as nothing on a page, so an argument holding one is $'...' quoted (before, only
    control, format and space categories were); an accent that combines visibly (U+0301) is not."""
    hidden = "\u3164\u115f\u2800\ufe0f\u034f\U000e0041\u00ad"
    argv = ["printf", "%s\\0", *(f"a{char}b" for char in hidden), "e\u0301"]
    shown = shown_command(shlex.join(argv))
    assert shown.count("$'") == len(hidden) and not any(char in shown for char in hidden) and "e\u0301" in shown
    done = subprocess.run(["bash", "-c", shown], capture_output=True, timeout=30, check=True)
    assert done.stdout.split(b"\0")[:-1] == [os.fsencode(arg) for arg in argv[2:]]


@pytest.mark.parametrize("argv, at", [
    (["python", "-m", "reports", "--text", "a b", "--patterns", "--json", "r.json", "--html", "r.html"], 5),
    (["python", "-m", "reports", "--text=--json", "--layer", "1", "--html", "r.html"], 6),
    (["python", "-m", "reports", "--text", "a"], 5),  # no output flag: at the end
])
def test_flags_go_before_the_first_output_in_one_place(argv, at):
    """--with-probe's and the beyond sections' flags are put where a reproduce command's outputs begin, by one
    helper: the words bash reads back are argv with the flags at that index, and both callers agree."""
    from reports.beyond import reproduce_with

    flags = ["--compare", "b"]
    command = provenance.insert_before_outputs(argv, flags)
    assert shlex.split(command) == argv[:at] + flags + argv[at:]
    ablation = type("Atlas", (), {"mode": "zero", "seed": 3, "batch_size": 8})()
    assert shlex.split(reproduce_with(shlex.join(argv), ablation=ablation)) == (
        argv[:at] + ["--ablation", "zero", "--mask-seed", "3", "--ablation-batch", "8"] + argv[at:])
    probe = type("Probe", (), {"induction_probe": {"length": 4, "seed": 0}})()
    assert shlex.split(provenance.with_probe_command(shlex.join(argv), probe)) == (
        argv[:at] + ["--with-probe", "4", "--probe-seed", "0"] + argv[at:])

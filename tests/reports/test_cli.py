"""The command line: results JSON, and one clear stderr line with a non-zero exit for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reports.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def assert_one_line_error(code, lines, *needles):
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("headscope: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_default_run_writes_schema_json(gpt2_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--json", out)
    assert code == 0, lines
    data = json.loads(out.read_text())
    assert data["schema"] == "headscope.results/1"
    assert list(data["layers"]) == ["6"]  # layer 6 for a model with more than 6 layers
    assert data["text"].startswith("The majority of Fiji's islands")
    assert data["model"]["n_layers"] == 8 and data["settings"]["exclude_first_token"] is True
    layer = data["layers"]["6"]
    assert len(layer["q_means"]) == 12 and len(layer["kde"]["grid"]) == 300
    assert "patterns" not in layer


def test_layers_patterns_and_text_file(gpt2_path, tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text("Ünïcode text, read as UTF-8.", encoding="utf-8")
    out = tmp_path / "out.json"
    code, _ = run_cli(capsys, "--model", gpt2_path, "--text-file", text_file, "--layer", 0, "--layer", 7,
                      "--patterns", "--json", out)
    data = json.loads(out.read_text())
    assert code == 0 and list(data["layers"]) == ["0", "7"]
    assert data["text"] == "Ünïcode text, read as UTF-8."
    n = len(data["tokens"])
    assert len(data["layers"]["7"]["patterns"]) == 12 and len(data["layers"]["7"]["patterns"][0]) == n


def test_all_layers(gpt2_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert run_cli(capsys, "--model", gpt2_path, "--all-layers", "--text", "a b c d", "--json", out)[0] == 0
    assert list(json.loads(out.read_text())["layers"]) == [str(i) for i in range(8)]


def test_the_summary_line_shows_a_models_hidden_characters(gpt2_path, tmp_path, capsys):
    """A local folder named with a right-to-left override: the summary on stderr draws it visibly, as it does the
    output names, so the terminal line is not reordered."""
    odd = tmp_path / "gpt2\u202eevil"
    odd.symlink_to(gpt2_path, target_is_directory=True)
    code, lines = run_cli(capsys, "--model", odd, "--layer", "0", "--json", tmp_path / "r.json")
    assert code == 0 and "gpt2\u27e8U+202E\u27e9evil" in lines[-1] and "\u202e" not in lines[-1], lines


def test_bundled_model_uses_its_middle_layer(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert run_cli(capsys, "--json", out)[0] == 0
    data = json.loads(out.read_text())
    assert data["model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2" and list(data["layers"]) == ["3"]


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text(gpt2_path, tmp_path, capsys, text):
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", text, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "The text is empty")


def test_text_longer_than_the_model_allows(gpt2_path, tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", "word " * 300, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "tokens long", "at most 128")
    assert not (tmp_path / "o.json").exists()


def test_unknown_model_id_offline(tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", "someone/no-such-model", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "'someone/no-such-model' is not in the local Hugging Face cache", "offline")


def test_missing_path(tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", tmp_path / "nowhere", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "No local directory")


def test_layer_out_of_range(gpt2_path, tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", gpt2_path, "--layer", 8, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "Layer 8 is out of range", "layers 0..7")


def test_text_file_not_utf8(gpt2_path, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text-file", bad, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "is not UTF-8", "offset 3")


def test_a_lone_surrogate_names_the_flag_that_carried_it(gpt2_path, tmp_path, capsys):
    """--text-json's JSON may spell a lone surrogate (\\ud800), which is no Unicode text: the refusal named --text and
    sent the user to --text-file. Undecodable bytes of the terminal's (surrogate escapes) are still --text's."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(gpt2_path), "--text-json", '"a\\ud800b"', "--json", str(tmp_path / "o.json")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "argument --text-json: is not Unicode text" in line, line
    assert "--text-file" not in line and "character 1" in line, line
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", "a\udcffb", "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "--text is not UTF-8 text (bad byte at character 1)")
    assert not (tmp_path / "o.json").exists()


def test_missing_text_file(gpt2_path, tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text-file", tmp_path / "none.txt", "--json", tmp_path / "o")
    assert_one_line_error(code, lines, "Cannot read")


def test_pickle_only_checkpoint(pickle_only_path, tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", pickle_only_path, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "only pickle weights", "safetensors only")


def test_unsupported_architecture(t5_path, tmp_path, capsys):
    code, lines = run_cli(capsys, "--model", t5_path, "--json", tmp_path / "o.json")
    assert_one_line_error(code, lines, "T5Model", "not supported", "GPT-2")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--text", "x"])  # --json missing
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--json" in lines[0]


@pytest.mark.parametrize("flags, needle", [
    # read by --batch only: a single text ran without them, as if they had not been typed
    (["--batch-size", "4"], "--batch-size is not used by a single text's run, only by --batch FILE: drop it"),
    (["--out-dir", "d", "--ray-workers", "2", "--text-column", "text"],
     "--out-dir, --ray-workers, --text-column are not used by a single text's run"),
    # the seed of a probe that does not run
    (["--probe-seed", "3"], "--probe-seed is the seed of --induction-probe or --with-probe"),
    # the patterns go into the JSON only: a report or figures alone never held them
    (["--patterns", "--html", "r.html"], "--patterns writes every attention pattern into the --json results"),
    (["--patterns", "--figures", "figs"], "--patterns writes every attention pattern into the --json results"),
])
def test_flags_a_single_text_would_ignore_are_refused(tmp_path, capsys, flags, needle):
    argv = ["--text", "the cat sat", *(str(tmp_path / flag) if flag in ("r.html", "figs") else flag for flag in flags)]
    if not {"--html", "--figures"} & set(flags):
        argv += ["--json", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, needle", [
    # the JSON and the page went to stdout one after the other: neither parses
    (["--json", "-", "--html", "-"], "--json - and --html - would both write to standard output"),
    (["--batch", "B", "--results", "R", "--json", "-", "--html", "-"], "would both write to standard output"),
    # the report overwrote the results written a moment before
    (["--json", "SAME", "--html", "SAME"], "--json and --html both name"),
    (["--json", "SAME", "--html", "OTHER/../SAME"], "--json and --html both name"),
    (["--from-results", "R", "--json", "SAME", "--html", "SAME"], "--json and --html both name"),
    # a folder named '-' was made for the figures
    (["--figures", "-"], "--figures writes a folder of files, not standard output"),
])
def test_outputs_that_would_clash_are_refused(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.chdir(tmp_path)
    paths = {"SAME": tmp_path / "out.x", "OTHER/../SAME": tmp_path / "other" / ".." / "out.x",
             "B": tmp_path / "b.txt", "R": tmp_path / "res"}
    with pytest.raises(SystemExit) as exit_info:
        main([str(paths.get(flag, flag)) for flag in flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, needle", [
    # every text was analysed, its report written, then listed as failed ('afile/text-0001: Not a directory')
    (["--batch", "B", "--out-dir", "O", "--figures", "FILE"], "--figures FILE is a file, not a folder"),
    (["--batch", "B", "--out-dir", "FILE"], "--out-dir FILE is a file, not a folder"),
    # the text was analysed and its JSON written, then 'Cannot create FILE: File exists.' and exit 2
    (["--text", "the cat", "--json", "J", "--figures", "FILE"], "--figures FILE is a file, not a folder"),
])
def test_a_folder_flag_that_names_a_file_is_refused_before_the_analysis(gpt2_path, tmp_path, capsys, flags, needle):
    batch, afile = tmp_path / "b.txt", tmp_path / "FILE"
    batch.write_text("the cat sat\na dog ran\n")
    afile.write_text("not a folder")
    paths = {"B": batch, "O": tmp_path / "out", "FILE": afile, "J": tmp_path / "r.json"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(gpt2_path), *(str(paths.get(flag, flag)) for flag in flags)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle.replace("FILE", str(afile)) in lines[0], lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["FILE", "b.txt"]  # nothing analysed nor written


@pytest.mark.parametrize("text, n", [("cat", 1), ("the cat", 2)])
def test_one_or_two_tokens_warn_but_succeed(gpt2_path, tmp_path, capsys, text, n):
    out = tmp_path / "o.json"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", text, "--json", out)
    data = json.loads(out.read_text())
    assert code == 0 and len(data["tokens"]) == n
    assert (data["layers"]["6"]["kde"] is None) == (n == 1)  # two tokens: the notebook's KDE of the heads' weights
    assert data["layers"]["6"]["same_head_dp"] == []
    assert any(line.startswith("headscope: warning:") for line in lines)


def test_real_entry_point_in_a_subprocess(gpt2_path, tmp_path):
    """python -m reports as a user runs it: no traceback, one line, exit status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "reports", "--model", str(gpt2_path), "--layer", "99", "--json",
                          str(tmp_path / "o.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "headscope: error: Layer 99 is out of range: this model has layers 0..7."]
    good = subprocess.run([sys.executable, "-m", "reports", "--model", str(gpt2_path), "--json", "-"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["schema"] == "headscope.results/1"


def test_induction_probe_instead_of_a_text(gpt2_path, tmp_path, capsys):
    out, html_out = tmp_path / "probe.json", tmp_path / "probe.html"
    code, _ = run_cli(capsys, "--model", gpt2_path, "--induction-probe", 20, "--probe-seed", 3, "--json", out,
                      "--html", html_out)
    data = json.loads(out.read_text())
    assert code == 0 and data["settings"]["induction_probe"] == {"length": 20, "seed": 3}
    ids = data["token_ids"]
    assert len(ids) == 41 and ids[1:21] == ids[21:]  # BOS, then the seeded tokens twice
    assert "--induction-probe 20 --probe-seed 3" in html_out.read_text()


def test_help_imports_neither_torch_nor_altair_nor_pandas():
    """--help answers in well under a second (issue 10) because building the parser imports no heavy library:
    checked by what is imported, not by a timing that a busy machine would make flaky."""
    heavy = ("torch", "altair", "pandas", "transformers")
    script = ("import sys\nimport reports.__main__ as cli\ncli.build_parser().format_help()\n"
              f"print(','.join(name for name in {heavy!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == ""
    helped = subprocess.run([sys.executable, "-X", "importtime", "-m", "reports", "--help"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
                            check=False)
    assert helped.returncode == 0 and "--batch-size" in helped.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in helped.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(heavy), sorted(imported & set(heavy))


@pytest.mark.parametrize("flags, needle", [
    (["--text-file", "IN", "--json", "IN"], "--json IN is the --text-file input"),
    (["--text-file", "IN", "--html", "./IN"], "--html IN is the --text-file input"),
    (["--batch", "IN", "--results", "R", "--html", "IN"], "--html IN is the --batch input"),
])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, capsys, monkeypatch, flags, needle):
    """--text-file t.txt --json t.txt analysed the text, then wrote the results over it: the input was gone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").write_text("the cat sat on the mat\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert "destroy what it reads" in lines[0]
    assert (tmp_path / "IN").read_text(encoding="utf-8") == "the cat sat on the mat\n"


def test_the_entry_point_draws_the_page_main_draws(gpt2_path, tmp_path, capsys):
    """python -m reports turns Altair's check of each chart part off in its own process (a quarter of a page's
    drawing); the page is the same, byte for byte but for its time, and main() called in a process of others' charts
    (these tests) leaves the check on."""
    import re

    from altair.utils import schemapi

    pages = {}
    for name in ("entry", "main"):
        (tmp_path / name).mkdir()
        argv = ["--model", str(gpt2_path), "--text", "The cat sat on the mat.", "--all-layers", "--with-probe", "8",
                "--html", str(tmp_path / name / "r.html")]
        if name == "entry":
            subprocess.run([sys.executable, "-m", "reports", *argv], cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
                           check=True)
        else:
            assert main(argv) == 0 and schemapi.DEBUG_MODE
        page = (tmp_path / name / "r.html").read_text(encoding="utf-8")
        pages[name] = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "TIME", page)
    assert pages["entry"] == pages["main"]

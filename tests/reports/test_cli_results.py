"""The command line's corpus results: --batch FILE --results DIR, --from-results DIR, and Ray only when asked for."""

import contextlib
import functools
import html
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from analysis.corpus_store import ResultsFolder
from reports.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["the cat sat on the mat", "a dog ran far from home", "rain in the home", "the mat and the cat"]


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([*(json.dumps({"text": t, "id": f"d{i}"}) for i, t in enumerate(TEXTS)),
                               json.dumps({"title": "no text"})]) + "\n", encoding="utf-8")
    return path


def test_results_then_from_results_render_the_same_corpus(gpt2_path, corpus_file, tmp_path, capsys):
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results,
                          "--json", tmp_path / "a.json", "--batch-size", 2)
    assert code == 0, lines
    assert "5 texts written on local" in lines[0] and "(1 failed), 0 already there" in lines[0]
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0 and "0 texts written" in lines[0] and "5 already there" in lines[0], lines
    code, lines = run_cli(capsys, "--from-results", results, "--json", tmp_path / "b.json", "--html",
                          tmp_path / "corpus.html")
    assert code == 0, lines
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert first == second and first["schema"] == "headscope.corpus/1" and first["n_analysed"] == 4
    assert first["texts"][4] == {"number": 5, "excerpt": "", "n_tokens": None, "error": 'missing "text" field'}
    html = (tmp_path / "corpus.html").read_text()
    assert 'id="headscope-corpus"' in html and "missing &#34;text&#34; field" in html


@pytest.mark.parametrize("argv, needle", [
    (["--results", "DIR"], "--results DIR needs --batch FILE"),
    (["--batch", "F", "--results", "DIR", "--out-dir", "O"], "choose one"),
    (["--engine", "ray", "--json", "x"], "need --batch FILE --results DIR"),
    (["--from-results", "DIR"], "--from-results needs --html OUT and/or --json OUT"),
    (["--batch", "F", "--results", "DIR", "--batch-size", "0"], "at least 1"),
    (["--batch", "F"], "--out-dir DIR (one report per text) or --results DIR"),
    (["--batch", "F", "--out-dir", "O", "--input-changed"], "--input-changed needs --batch FILE --results DIR"),
    # Parquet results hold every layer and no heatmap: --layer, --head and --no-layers would be ignored (run_results
    # reads none of them), and --no-layers was told to "give --layer N instead"
    (["--batch", "F", "--results", "DIR", "--no-layers"], "--no-layers: Parquet results hold every layer's"),
    (["--batch", "F", "--results", "DIR", "--layer", "1", "--head", "2"], "--layer, --head: Parquet results hold "),
    (["--from-results", "DIR", "--json", "x", "--all-layers"], "--all-layers: Parquet results hold every layer's"),
    (["--batch", "F", "--results", "DIR", "--include-bos", "--query-position", "1"],
     "--query-position, --include-bos: Parquet results are measured with the default query token"),
    # flags the chosen engine would ignore
    (["--batch", "F", "--results", "R", "--ray-workers", "2"], "--ray-workers is the number of Ray workers"),
    # --ray-wait: seconds, 0 or more, to wait for a cluster joined by address (a local instance never grows)
    (["--batch", "F", "--results", "R", "--ray-wait", "5"], "--ray-wait waits for a Ray cluster joined by --ray-"),
    (["--batch", "F", "--results", "R", "--engine", "ray", "--ray-wait", "5"], "add --ray-address, or drop it"),
    (["--batch", "F", "--results", "R", "--ray-address", "auto", "--ray-wait", "-1"],
     "argument --ray-wait: '-1' is not a number of seconds, 0 or more"),
    (["--batch", "F", "--results", "R", "--ray-address", "auto", "--ray-wait", "soon"],
     "argument --ray-wait: 'soon' is not a number of seconds, 0 or more"),
    (["--batch", "F", "--results", "R", "--ray-address", "auto", "--ray-wait", "nan"], "'nan' is not a number"),
    # Ray's workers load the model by name: --device-map was dropped on a cluster (--ray-address) as without one
    (["--batch", "F", "--results", "R", "--ray-address", "auto", "--device-map", "auto"],
     "--device-map is not used with --engine ray"),
])
def test_bad_flag_combinations_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("argv, named, mode", [
    # --out-dir writes a report per text: --json and --html were silently not written, --patterns not kept
    (["--batch", "F", "--out-dir", "O", "--json", "c.json", "--html", "c.html"], "--json, --html", "--out-dir DIR"),
    (["--batch", "F", "--out-dir", "O", "--patterns", "--probe-seed", "3"], "--probe-seed, --patterns",
     "--out-dir DIR"),
    (["--batch", "F", "--out-dir", "O", "--mask-seed", "2", "--ray-workers", "2"], "--ray-workers, --mask-seed",
     "--out-dir DIR"),
    (["--batch", "F", "--out-dir", "O", "--ray-wait", "5"], "--ray-wait", "--out-dir DIR"),
    # Parquet rows: no figures, no patterns, no shared JavaScript were written
    (["--batch", "F", "--results", "R", "--figures", "figs", "--format", "png"], "--figures, --format",
     "--results DIR"),
    (["--batch", "F", "--results", "R", "--patterns", "--shared-assets"], "--patterns, --shared-assets",
     "--results DIR"),
    # --from-results draws what the folder holds: no model, device or setting of its own
    (["--from-results", "R", "--json", "x", "--model", "gpt2", "--dtype", "float16"], "--model, --dtype",
     "--from-results DIR"),
    (["--from-results", "R", "--json", "x", "--engine", "local", "--batch-size", "4", "--input-changed"],
     "--engine, --batch-size, --input-changed", "--from-results DIR"),
    (["--from-results", "R", "--html", "x", "--include-first-token", "--figures", "f"],
     "--include-first-token, --figures", "--from-results DIR"),
])
def test_flags_a_corpus_mode_would_ignore_are_refused(tmp_path, capsys, argv, named, mode):
    """Each corpus mode reads only its own flags: one it would have run without using is one line and exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert f"{named} " in err[0] and "not used by --" in err[0] and mode in err[0] and "drop" in err[0], err[0]


def test_missing_input_and_not_a_results_folder_are_one_line(tmp_path, capsys):
    code, lines = run_cli(capsys, "--batch", tmp_path / "nope.txt", "--results", tmp_path / "res")
    assert code == 2 and len(lines) == 1 and "nope.txt does not exist" in lines[0]
    assert not (tmp_path / "res").exists()  # refused before anything was written
    code, lines = run_cli(capsys, "--from-results", tmp_path, "--html", tmp_path / "c.html")
    assert code == 2 and len(lines) == 1 and "is not a headscope results folder" in lines[0]


def test_an_input_without_texts_is_refused_before_input_changed_drops_anything(gpt2_path, corpus_file, tmp_path,
                                                                             capsys):
    """--input-changed with an input of blank lines dropped every row, recorded the run and the new source, then said
    "holds no texts" (exit 2) as if nothing had been done: now it is refused first and the folder is as it was."""
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    manifest = (results / "corpus.json").read_text()
    parts = sorted((path.name, path.stat().st_mtime_ns) for path in ResultsFolder(results).part_files())
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", blank, "--results", results, "--input-changed")
    assert code == 2 and len(lines) == 1 and "holds no texts" in lines[0], lines
    assert (results / "corpus.json").read_text() == manifest
    assert sorted((path.name, path.stat().st_mtime_ns) for path in ResultsFolder(results).part_files()) == parts


def test_a_shortened_or_moved_input_is_one_line_until_told_it_changed(gpt2_path, corpus_file, tmp_path, capsys):
    """Made shorter in place, the input kept its old rows past its end in the means; moved elsewhere and replaced by
    another file, it was taken as the folder's. Now both are one line (exit 2, the folder untouched), --input-changed
    drops the rows that no longer fit, and a copy of the same texts at another path resumes."""
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    moved = tmp_path / "moved.jsonl"
    corpus_file.rename(moved)  # the same texts at another path: resumed, nothing analysed again
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", moved, "--results", results)
    assert code == 0 and "0 texts written" in lines[0] and "5 already there" in lines[0], lines
    corpus_file.write_text(json.dumps({"text": "another corpus altogether"}) + "\n")  # where the first one was
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 2 and len(lines) == 1, lines
    assert f"{results} holds the rows of {moved}, and {corpus_file} differs from them: 1 of its texts" in lines[0]
    assert "4 rows of texts it no longer has (numbers 2, 3, 4 and 1 more)" in lines[0] and "--input-changed" in lines[0]
    moved.write_text("\n".join(moved.read_text().splitlines()[:3]) + "\n")  # the folder's input, made shorter
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", moved, "--results", results,
                          "--json", tmp_path / "refused.json")
    assert code == 2 and len(lines) == 1 and "holds 2 rows of texts" in lines[0] and "(numbers 4, 5)" in lines[0]
    assert not (tmp_path / "refused.json").exists()
    code, lines = run_cli(capsys, "--from-results", results, "--json", tmp_path / "before.json")
    assert code == 0 and json.loads((tmp_path / "before.json").read_text())["n_texts"] == 5  # untouched
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", moved, "--results", results, "--input-changed",
                          "--json", tmp_path / "after.json")
    assert code == 0 and "0 texts written" in lines[0] and "3 already there, 2 dropped" in lines[0], lines
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", moved, "--results", tmp_path / "fresh",
                          "--json", tmp_path / "fresh.json")
    assert code == 0, lines
    after, fresh = (json.loads((tmp_path / name).read_text()) for name in ("after.json", "fresh.json"))
    assert after == fresh and [t["number"] for t in after["texts"]] == [1, 2, 3]  # as if written afresh


def test_a_rerun_that_will_be_refused_is_refused_before_the_model_loads(gpt2_path, corpus_file, tmp_path, capsys):
    """A rerun into a folder it does not fit loaded the model first (minutes, for a real LLM), then refused. Now every
    check that needs no model comes before the load: with a --model that cannot load at all, what the user sees is
    the refusal of the input, the settings, the text column or the dtype, in one line, and the folder is untouched."""
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    rows = ResultsFolder(results).read_rows()
    nowhere = tmp_path / "no-such-model"
    code, lines = run_cli(capsys, "--model", nowhere, "--batch", corpus_file, "--results", results)
    assert code == 2 and len(lines) == 1 and "no-such-model" in lines[0], lines  # nothing to refuse: the model is next
    corpus_file.write_text("\n".join(corpus_file.read_text().splitlines()[:3]) + "\n")  # made shorter
    for flags, needle in (([], "holds 2 rows of texts"), (["--include-first-token"], "(exclude_first_token True)"),
                          (["--dtype", "float16"], "(dtype 'float32'), not 'float16'"),
                          (["--text-column", "body"], "not of column 'body'")):
        code, lines = run_cli(capsys, "--model", nowhere, "--batch", corpus_file, "--results", results, *flags)
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "no-such-model" not in lines[0], lines
    assert ResultsFolder(results).read_rows().equals(rows)


def test_a_record_whose_id_changed_takes_the_new_id_without_being_analysed_again(gpt2_path, corpus_file, tmp_path,
                                                                                 capsys):
    """A JSONL record whose "id" changed but whose text did not kept the old id in its row (rows are matched to
    records by number and text). Now its row takes the input's id and keeps its numbers (nothing analysed again);
    a text changed in the same edit is analysed again as before; the rows are those of the edited file afresh."""
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    records = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    records[0]["id"], records[2]["id"], records[3]["id"] = "intro", "d2-v2", 7
    records[1]["text"] = "a cat ran far from the mat"
    corpus_file.write_text("\n".join(map(json.dumps, records)) + "\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0 and "1 texts written" in lines[0] and "4 already there, 1 dropped" in lines[0], lines
    assert "3 ids updated (their texts unchanged, not analysed again)" in lines[0], lines
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", tmp_path / "fresh")
    assert code == 0, lines
    got, want = ResultsFolder(results).read_rows(), ResultsFolder(tmp_path / "fresh").read_rows()
    assert got["id"].to_pylist() == ["intro", "d1", "d2-v2", "7", "5"] and got.equals(want)
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0 and "0 texts written" in lines[0] and "5 already there ->" in lines[0], lines  # nothing left


def test_the_same_local_checkpoint_named_another_way_resumes(gpt2_path, corpus_file, tmp_path, capsys, monkeypatch):
    """A folder written with --model ./gpt2 refused /abs/gpt2 or ../gpt2 from another directory ("holds results of
    ./gpt2"), the weights being the same. Local checkpoints are now compared by directory and weights' hash."""
    results = tmp_path / "res"
    monkeypatch.chdir(gpt2_path.parent)
    code, lines = run_cli(capsys, "--model", f"./{gpt2_path.name}", "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in (gpt2_path, os.path.relpath(gpt2_path)):
        code, lines = run_cli(capsys, "--model", name, "--batch", corpus_file, "--results", results)
        assert code == 0 and "0 texts written" in lines[0] and "5 already there" in lines[0], lines
    copy = tmp_path / "copy"  # another directory, the same weights: still another checkpoint (its files may differ)
    shutil.copytree(gpt2_path, copy)
    code, lines = run_cli(capsys, "--model", copy, "--batch", corpus_file, "--results", results)
    assert code == 2 and len(lines) == 1 and "(local_path" in lines[0] and "use a new --results folder" in lines[0]


def test_a_rerun_retries_the_texts_whose_rows_failed_and_says_so(gpt2_path, corpus_file, tmp_path, capsys,
                                                               monkeypatch):
    """Rows that failed under a since-fixed bug were never retried: "0 texts written, 5 already there", exit 0. Now
    the rerun retries them; every text failing again exits 2 as a first run whose every text failed does."""
    from tests.analysis.test_corpus_store import failing

    results = tmp_path / "res"
    with monkeypatch.context() as patch:
        failing(patch, set(TEXTS))
        for needle in ("5 texts written", "4 retried (their rows held errors: 0 now analysed, 4 failed again"):
            code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
            assert code == 2 and needle in lines[0], lines
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0 and "4 texts written" in lines[0] and "1 already there" in lines[0], lines
    assert "4 retried (their rows held errors: 4 now analysed) ->" in lines[0], lines
    assert ResultsFolder(results).read_rows()["error"].null_count == 4


def test_a_runs_failures_are_those_of_the_rows_it_wrote(gpt2_path, tmp_path, capsys):
    """A run's "(N failed)" was the folder's failed count after it less before it, so the failing rows it dropped
    cancelled the ones it wrote: a failing line edited into another failing line said "(0 failed)", and an input
    replaced (--input-changed) by one whose every text fails said "(0 failed)" and exited 0. Now the count is that
    of the rows the run wrote, and the exit status that of the same file run into a new folder."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "alpha one"}\n{"text": ""}\n', encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", tmp_path / "res")
    assert code == 0 and "(1 failed)" in lines[0], lines
    path.write_text('{"text": "alpha one"}\n{"text": 3}\n', encoding="utf-8")  # a failing line, failing otherwise
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", tmp_path / "res")
    written = ResultsFolder(tmp_path / "res").read_rows(["number", "error"]).to_pylist()
    assert written[1]["error"] is not None and written[1]["error"] != "empty text"  # the new row's own error
    assert code == 0 and "1 texts written" in lines[0] and "(1 failed), 1 already there, 1 dropped" in lines[0], lines
    path.write_text('{"text": " "}\n{"text": "\\t"}\n', encoding="utf-8")  # another input: every text fails
    want, fresh = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", tmp_path / "fresh")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", tmp_path / "res",
                          "--input-changed")
    assert "2 texts written" in fresh[0] and "(2 failed)" in fresh[0] and want == 2, fresh
    assert code == want and "2 texts written" in lines[0] and "(2 failed), 0 already there, 2 dropped" in lines[0]
    manifest = json.loads((tmp_path / "res" / "corpus.json").read_text())
    assert [run["new_failed"] for run in manifest["runs"]] == [1, 1, 2]
    assert manifest["counts"] == json.loads((tmp_path / "fresh" / "corpus.json").read_text())["counts"]


def test_a_corpus_put_where_the_input_was_is_refused_though_it_shares_a_text(gpt2_path, tmp_path, capsys):
    """The input moved away and another file put at its path, sharing its first line, was taken as the file edited in
    place: two rows dropped without --input-changed, and the moved file (the folder's input) refused after. Now the
    new file is refused (exit 2, one line, the folder as it was) and the moved file resumes."""
    path, kept, results = tmp_path / "in.txt", tmp_path / "v1.txt", tmp_path / "res"
    path.write_text("Chapter one\nbeta two\ngamma three\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", results)
    assert code == 0, lines
    rows = ResultsFolder(results).read_rows()
    path.rename(kept)
    path.write_text("Chapter one\nsomething else\nanother corpus\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", path, "--results", results)
    assert code == 2 and len(lines) == 1 and "it is not the file recorded at that path" in lines[0], lines
    assert ResultsFolder(results).read_rows().equals(rows)
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", kept, "--results", results)
    assert code == 0 and "0 texts written" in lines[0] and "3 already there ->" in lines[0], lines


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(source=123), "its source is not a path (a string)"),
    (lambda m: m.update(source=["x"]), "its source is not a path (a string)"),
    (lambda m: m.update(runs=None), "its runs are not a list"),
    (lambda m: m.pop("runs"), "its runs are not a list"),
    (lambda m: m["settings"].update(text_column=5), "its settings' text_column is not a column name (a string)"),
    (lambda m: m["settings"].update(exclude_bos="yes"), "its settings' exclude_bos is not true or false"),
])
def test_a_hand_edited_manifest_is_one_line(gpt2_path, corpus_file, tmp_path, capsys, edit, needle):
    """A corpus.json edited by hand raised a TypeError (a source that is not a string) or crashed after the run (runs
    null). Now it is one line naming the file and what is wrong, exit 2, before any model loads."""
    results = tmp_path / "res"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0, lines
    manifest_path = results / "corpus.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    for argv in (["--model", tmp_path / "no-such-model", "--batch", corpus_file, "--results", results],
                 ["--from-results", results, "--json", tmp_path / "c.json"]):
        code, lines = run_cli(capsys, *argv)
        want = f"headscope: error: {manifest_path} is not a readable headscope manifest: {needle}."
        assert code == 2 and lines == [want], lines


def test_a_manifest_without_counts_has_them_recounted(gpt2_path, corpus_file, tmp_path, capsys):
    """A corpus.json without its counts crashed after the run (its failed count was read to count the run's). The
    counts are the rows', recounted by every run: now they come back, those of the same input written afresh."""
    results = tmp_path / "res"
    for folder in (results, tmp_path / "fresh"):
        code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", folder)
        assert code == 0, lines
    manifest = json.loads((results / "corpus.json").read_text())
    del manifest["counts"]
    (results / "corpus.json").write_text(json.dumps(manifest))
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", corpus_file, "--results", results)
    assert code == 0 and "5 already there" in lines[0], lines
    counts = [json.loads((folder / "corpus.json").read_text())["counts"] for folder in (results, tmp_path / "fresh")]
    assert counts[0] == counts[1] == {"rows": 5, "analysed": 4, "failed": 1}


NO_RAY = """
import sys
from reports.__main__ import main
code = main(sys.argv[1:])
assert code == 0, code
loaded = sorted(name for name in sys.modules if name == "ray" or name.startswith("ray."))
print("RAY MODULES:", loaded)
"""


def test_the_plain_command_line_and_the_local_engine_never_import_ray(gpt2_path, corpus_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for argv in (["--model", gpt2_path, "--batch", corpus_file, "--results", tmp_path / "res", "--html",
                  tmp_path / "c.html"],
                 ["--from-results", tmp_path / "res", "--json", tmp_path / "c.json"],
                 ["--model", gpt2_path, "--text", "the cat sat", "--json", tmp_path / "one.json"]):
        done = subprocess.run([sys.executable, "-c", NO_RAY, *map(str, argv)], check=False, cwd=ROOT, env=env,
                              timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "RAY MODULES: []" in done.stdout, done.stdout


NO_RAY_APP = """
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("streamlit_app.py", default_timeout=240).run()
assert not at.exception, at.exception
print("RAY MODULES:", sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""


def test_the_app_never_imports_ray(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", NO_RAY_APP], check=False, cwd=ROOT, env=env, timeout=400,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RAY MODULES: []" in done.stdout, done.stdout


@pytest.mark.parametrize("missing", ["ray", "ray.data"])
def test_engine_ray_without_ray_installed_is_one_line(corpus_file, tmp_path, capsys, monkeypatch, missing):
    # a machine without the ray extra (or Ray without its data part): a traceback, exit 1, before; the model named
    # does not exist, so the line seen is Ray's, said before any model loads, and nothing is written
    monkeypatch.setitem(sys.modules, missing, None)  # import ray / import ray.data raises ImportError
    code, lines = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", corpus_file, "--results",
                          tmp_path / "res", "--engine", "ray")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"headscope: error: --engine ray needs Ray Data, and {missing} cannot be imported")
    assert "pip install 'headscope[ray]'" in lines[0] and "--engine local" in lines[0]
    assert not (tmp_path / "res").exists()


def joining(corpus_file, tmp_path, address: str, auto: bool) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of the real command line joining `address` (or auto with RAY_ADDRESS set to it),
    under a 120 s guard against ray.init's retries (its process group killed past it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           **({"RAY_ADDRESS": address} if auto else {})}
    argv = [sys.executable, "-m", "reports", "--model", str(tmp_path / "no-model"), "--batch", str(corpus_file),
            "--results", str(tmp_path / "res"), "--ray-address", "auto" if auto else address]
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"--ray-address {argv[-1]} ({address}) did not finish in 120 s (killed)")
    return child.returncode, err.strip().splitlines()


@pytest.mark.parametrize("auto", [False, True])
def test_a_ray_address_where_no_cluster_runs_is_one_line_at_once(corpus_file, tmp_path, auto):
    # ray.init retried an address where nothing listens (a typo, a cluster that is down) for about 14 minutes,
    # printing only its own retry lines; --ray-address auto did the same with RAY_ADDRESS naming such an address
    with socket.socket() as taken:  # bound, not listening: a connection is refused, and no one else can take the port
        taken.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, lines = joining(corpus_file, tmp_path, address, auto)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"headscope: error: No Ray cluster answers at {address}"), lines[0]
    assert "`ray start --head`" in lines[0] and ("check RAY_ADDRESS" if auto else "check --ray-address") in lines[0]
    assert not (tmp_path / "res").exists()  # made for the lock only, and removed


class Http11(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # answers the HTTP/2 preface with '505 HTTP Version Not Supported'

    def log_message(self, *args):
        pass


class Banner(socketserver.BaseRequestHandler):
    def handle(self):  # speaks first, as an ssh daemon
        self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        self.request.recv(1024)


@pytest.mark.parametrize("kind, auto", [("silent", False), ("http", False), ("ssh", False), ("http", True)])
def test_a_ray_address_where_something_else_listens_is_one_line(corpus_file, tmp_path, kind, auto):
    # a port that accepts connections but is not a GCS (a typo that hits a web server or an ssh daemon, a listener
    # that never answers) passed the connection check, and ray.init then retried it for many minutes
    with contextlib.ExitStack() as stack:
        if kind == "silent":  # the kernel accepts (backlog); nothing ever reads or answers
            server = stack.enter_context(socket.socket())
            server.bind(("", 0))  # every interface, as a GCS: 127.0.0.1 is looked up as this node's IP
            server.listen()
        else:
            server = stack.enter_context(http.server.ThreadingHTTPServer(("", 0), Http11) if kind == "http"
                                         else socketserver.ThreadingTCPServer(("", 0), Banner))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)
        port = server.getsockname()[1] if kind == "silent" else server.server_address[1]
        address = f"127.0.0.1:{port}"
        code, lines = joining(corpus_file, tmp_path, address, auto)
    from analysis.corpus_ray import NOT_RAY

    shown = f"{address} (RAY_ADDRESS, which --ray-address auto reads)" if auto else address
    named = "RAY_ADDRESS" if auto else "--ray-address"
    assert (code, lines) == (2, [f"headscope: error: {NOT_RAY.format(address=shown, named=named)}"])
    assert "6379" in lines[0]
    assert not (tmp_path / "res").exists()


def test_a_refusal_after_a_local_ray_start_is_the_one_line_on_stderr(corpus_file, tmp_path):
    # Ray turns token authentication on for a new local instance and said so on stderr at every start: a refusal
    # that comes once the instance runs (no GPU for --device cuda) was two lines, Ray's first
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU here
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run([sys.executable, "-m", "reports", "--model", str(tmp_path / "no-model"), "--batch",
                           str(corpus_file), "--results", str(tmp_path / "res"), "--engine", "ray", "--device", "cuda"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    from analysis.corpus_ray import NO_GPUS

    assert (done.returncode, done.stderr.splitlines()) == (2, [f"headscope: error: {NO_GPUS}"])


def test_ray_address_auto_with_no_cluster_to_find_is_one_line(corpus_file, tmp_path, capsys, monkeypatch):
    # Ray's own line named flags headscope does not have: 'The Ray run failed (ConnectionError): Could not find any
    # running Ray instance. Please specify the one to connect to by setting the `--address` flag or ...'
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    no_gcs = functools.cache(frozenset)  # ray.init calls its cache_clear
    monkeypatch.setattr(services, "find_gcs_addresses", no_gcs)  # no Ray of other test runs on this machine
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)  # nor a `ray start`'s file
    code, lines = run_cli(capsys, "--model", tmp_path / "no-model", "--batch", corpus_file, "--results",
                          tmp_path / "res", "--ray-address", "auto")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("headscope: error: --ray-address auto, but no Ray cluster runs here"), lines[0]
    assert "`ray start --head`" in lines[0]
    assert not (tmp_path / "res").exists()


def test_a_results_folders_page_names_its_input_runs_and_commands_and_a_command_reruns(gpt2_path, corpus_file,
                                                                                      tmp_path, capsys):
    # corpus.html of --results said nothing of what wrote its rows (the --out-dir page names its input and command):
    # not the input, not the engine (local or Ray, and Ray's workers and address), not the command
    results = tmp_path / "res"
    first = ["--model", gpt2_path, "--batch", corpus_file, "--results", results, "--batch-size", 2]
    code, lines = run_cli(capsys, *first)
    assert code == 0, lines
    code, lines = run_cli(capsys, "--from-results", results, "--html", tmp_path / "corpus.html", "--json",
                          tmp_path / "corpus.json")
    assert code == 0, lines
    page = (tmp_path / "corpus.html").read_text()
    runs = json.loads((results / "corpus.json").read_text())["runs"]
    command = shlex.join(["python", "-m", "reports", *map(str, first)])
    assert runs[0]["command"] == command
    assert f"<code><bdi>{html.escape(str(corpus_file))}</bdi></code>" in page
    assert "local engine, batch size 2;" in page and "5 rows written, 0 already there" in page
    shown = re.findall(r"<pre>(.*?)</pre>", page[page.index("Rows written by"):page.index('id="corpus-layers"')])
    assert [html.unescape(text) for text in shown] == [command]
    # the command as the page shows it, run again into an empty folder, gives the same corpus
    shutil.rmtree(results)
    argv = shlex.split(html.unescape(shown[0]))[3:]
    code, lines = run_cli(capsys, *argv, "--json", tmp_path / "again.json")
    assert code == 0, lines
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((tmp_path / "corpus.json").read_text())
    # a hand-edited run entry (markup, a command that does not parse, not an entry at all) is shown escaped or left
    # out, never a traceback
    manifest = json.loads((results / "corpus.json").read_text())
    manifest["runs"] += [{"engine": "<b>ray</b>", "workers": [], "command": "python -m reports 'open"}, "junk"]
    (results / "corpus.json").write_text(json.dumps(manifest))
    code, lines = run_cli(capsys, "--from-results", results, "--html", tmp_path / "edited.html")
    assert code == 0, lines
    page = (tmp_path / "edited.html").read_text()
    assert "&lt;b&gt;ray&lt;/b&gt; engine, batch size None" in page and "<b>ray</b>" not in page
    assert "&#39;open" not in page and "'open" not in page


def _section(page: str, start: str, end: str) -> str:
    return html.unescape(page[page.index(start):page.index(end, page.index(start))])


def test_a_results_folders_page_names_the_versions_that_computed_its_rows_not_those_drawing_it(gpt2_path, tmp_path,
                                                                                                capsys):
    # --from-results (and the app's download) showed the headscope and library versions of the process drawing the
    # page, not those recorded in corpus.json by the runs that computed the rows: after an upgrade the archive claimed
    # the new versions produced the numbers
    from reports.provenance import git_commit, library_versions

    source, results = tmp_path / "in.txt", tmp_path / "res"
    source.write_text("\n".join(TEXTS[:2]) + "\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", source, "--results", results)
    assert code == 0, lines
    now = dict(library_versions())["torch"]
    old = {"headscope": "0.0.9", "torch": "1.13.1", "transformers": "4.30.0", "tokenizers": "0.13.3",
           "numpy": "1.24.0", "pyarrow": "12.0.0", "datasets": None, "ray": None}
    manifest = json.loads((results / "corpus.json").read_text())
    assert manifest["runs"][0]["versions"] == manifest["versions"] and manifest["versions"]["torch"] == now

    def page(name: str) -> tuple[str, str]:
        code, lines = run_cli(capsys, "--from-results", results, "--html", tmp_path / name)
        assert code == 0, lines
        text = (tmp_path / name).read_text()
        return (_section(text, "Rows computed with", "Page drawn by"),
                _section(text, "Page drawn by", "</dd>"))

    # as a headscope before per-run versions wrote it: the manifest's versions alone, those of its last run
    for run in manifest["runs"]:
        del run["versions"], run["git_commit"]
    (results / "corpus.json").write_text(json.dumps({**manifest, "versions": old}))
    computed, drawn = page("old.html")
    assert "headscope 0.0.9 (git commit not recorded), torch 1.13.1, transformers 4.30.0" in computed
    assert "datasets not installed" in computed and now not in computed and "warning" not in computed
    assert f"torch {now}" in drawn and str(git_commit() or "") in drawn and "1.13.1" not in drawn
    # resumed by this headscope: the old run's versions are no longer recorded anywhere, and the page says so
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    code, lines = run_cli(capsys, "--model", gpt2_path, "--batch", source, "--results", results)
    assert code == 0 and "2 texts written" in lines[0], lines
    computed, _ = page("resumed.html")
    assert "1 run(s) ran before each run recorded its own" in computed and f"torch {now}" in computed
    # runs that each recorded their versions, and they differ: each run's, and a warning
    manifest = json.loads((results / "corpus.json").read_text())
    manifest["runs"][0].update(versions=old, git_commit="0" * 40)
    (results / "corpus.json").write_text(json.dumps(manifest))
    computed, _ = page("differ.html")
    assert "The runs that wrote these rows used different versions" in computed
    first, second = re.findall(r"<li>run of (.*?)</li>", computed)
    assert f"headscope 0.0.9 (git commit {'0' * 40}), torch 1.13.1" in first and now not in first
    assert f"(git commit {git_commit() or 'not recorded'}), torch {now}" in second
    # the same versions in every run: one line, no warning
    manifest["runs"][0].update(versions=manifest["runs"][1]["versions"], git_commit=manifest["runs"][1]["git_commit"])
    (results / "corpus.json").write_text(json.dumps(manifest))
    computed, _ = page("same.html")
    assert "warning" not in computed and "<li>" not in computed and f"torch {now}" in computed

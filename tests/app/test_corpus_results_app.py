"""The app's "Many texts" opens a results folder written by the command line, as it opens an upload."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from analysis.corpus_io import iter_records
from analysis.corpus_store import load_results, run_local
from reports.__main__ import main
from reports.html import CORPUS_ID
from tests.app import test_app, test_atlas_app
from tests.app.test_app import APP

clear_caches = test_app.clear_caches  # autouse: every test starts with cold caches
downloads = test_atlas_app.downloads  # what each download button would hand the browser


def test_a_results_folder_opens_with_its_means_and_failures(gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path))  # the app opens folders only under the operator's
    source = tmp_path / "in.txt"
    source.write_text("the cat sat on the mat\n" + " ".join(["cat"] * 300) + "\nthe dog ran far from home\n")
    run_local(gpt2, iter_records(source), tmp_path / "res")
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.text_input(key="corpus_results_dir").set_value(str(tmp_path / "res")).run()
    at.button(key="corpus_open").click().run()
    assert not at.exception and not at.error
    assert any("2 of 3 texts analysed with" in c.value for c in at.caption)
    assert any(w.value.startswith("Text 2 was skipped: The text is") for w in at.warning)
    expected = load_results(tmp_path / "res").means["previous_token"]  # the table shows the folder's means
    table = at.dataframe[-1].value
    np.testing.assert_allclose(table["mean"].to_numpy(dtype=float), expected.ravel())


def test_a_folder_that_is_not_results_is_an_error_shown_literally(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path))
    folder = tmp_path / "[x](http:evil)"
    folder.mkdir()
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.text_input(key="corpus_results_dir").set_value(str(folder)).run()
    at.button(key="corpus_open").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "is not a headscope results folder" in at.error[0].value
    assert "\\[x\\](http\\:evil)" in at.error[0].value  # escaped (reports.untrusted.plain): no link is drawn


def corpus_results(page: str) -> dict:
    """The means and intervals a corpus page embeds (its CORPUS_ID script)."""
    return json.loads(re.search(f'<script type="application/json" id="{CORPUS_ID}">(.*?)</script>', page, re.DOTALL)[1])


def test_the_corpus_names_its_upload_and_its_download_reruns_from_it(steady_gpt2_path, tmp_path, monkeypatch,
                                                                     downloads):
    """The results say which file they are of: after a refused upload they are still the last good file's (which
    nothing said), and the downloaded page records that file and its SHA-256 as the command line's corpus.html
    does, with a command that recomputes its numbers."""
    monkeypatch.setenv("HEADSCOPE_MODEL", str(steady_gpt2_path))
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(steady_gpt2_path))
    data = b"the cat sat on the mat\na dog ran far from home\nrain in the home\n"
    at = AppTest.from_file(APP, default_timeout=240).run()
    for name, upload in (("good.txt", data), ("bad.txt", b"\xff\n")):
        at.file_uploader(key="corpus_file").set_value((name, upload, "text/plain")).run()
        at.button(key="corpus_run").click().run()
    assert not at.exception and len(at.error) == 1 and at.error[0].value.startswith("bad.txt is not UTF-8")
    assert any("3 of 3 texts analysed" in c.value and "`good.txt`" in c.value for c in at.caption)
    (button,) = [b for b in at.get("download_button") if b.label == "Download the corpus report (HTML)"]
    page = downloads[button.proto.deferred_file_id]()
    digest = hashlib.sha256(data).hexdigest()
    assert f"<code><bdi>good.txt</bdi></code> (SHA-256 <code>{digest}</code>)" in page
    command = html.unescape(re.search(r"<dt>Run with</dt><dd><pre>(.*?)</pre>", page, re.DOTALL)[1])
    (tmp_path / "good.txt").write_bytes(data)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "reports"]
    subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(APP).parent)})
    (written,) = tmp_path.rglob("corpus.html")
    cli_page = written.read_text(encoding="utf-8")
    assert f"(SHA-256 <code>{digest}</code>)" in cli_page
    app_stats, cli_stats = corpus_results(page)["stats"], corpus_results(cli_page)["stats"]
    assert app_stats.keys() == cli_stats.keys()
    for name in app_stats:
        for key in ("mean", "low", "high"):
            np.testing.assert_allclose(np.array(app_stats[name][key], dtype=float),
                                       np.array(cli_stats[name][key], dtype=float), rtol=1e-4, atol=1e-6)


def test_a_results_folders_downloaded_page_lists_its_runs_as_from_results_does(gpt2, tmp_path, monkeypatch,
                                                                               downloads):
    # the app's page of a folder is documented as --from-results writes it: that page lists the input and the runs
    # that wrote the rows (engine, command); the download must too
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path))
    source = tmp_path / "in.txt"
    source.write_text("the cat sat on the mat\nthe dog ran far from home\n")
    run_local(gpt2, iter_records(source), tmp_path / "res", source=str(source), command="python -m reports <x>")
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.text_input(key="corpus_results_dir").set_value(str(tmp_path / "res")).run()
    at.button(key="corpus_open").click().run()
    assert not at.exception and not at.error
    (button,) = [b for b in at.get("download_button") if b.label == "Download the corpus report (HTML)"]
    page = downloads[button.proto.deferred_file_id]()
    page = page.decode() if isinstance(page, bytes) else page
    assert main(["--from-results", str(tmp_path / "res"), "--html", str(tmp_path / "cli.html")]) == 0

    def provenance(text: str) -> str:
        return text[text.index("<dt>Input</dt>"):text.index("</dl>")]

    assert provenance(page) == provenance((tmp_path / "cli.html").read_text())
    assert "local engine, batch size 16;" in provenance(page) and "&lt;x&gt;" in provenance(page)

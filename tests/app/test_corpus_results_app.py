"""The app's "Many texts" opens a results folder written by the command line, as it opens an upload."""

from __future__ import annotations

import numpy as np
from streamlit.testing.v1 import AppTest

from analysis.corpus_io import iter_records
from analysis.corpus_store import load_results, run_local
from tests.app import test_app
from tests.app.test_app import APP

clear_caches = test_app.clear_caches  # autouse: every test starts with cold caches


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

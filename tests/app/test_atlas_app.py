"""The app's head atlas (score picker, induction probe, selection) and its corpus upload, through AppTest."""

from __future__ import annotations

import json

import numpy as np

from analysis import analyze, analyze_induction_probe
from reports.charts import ATLAS_SELECTION
from tests.app import test_app
from tests.app.test_app import charts, errors, run_app
from tests.conftest import FIJI

clear_caches = test_app.clear_caches  # autouse: every test starts with cold caches
forward_calls = test_app.forward_calls


def atlas_spec(at) -> dict:
    (spec,) = [spec for spec in charts(at) if spec.get("params")]  # the only chart with a selection
    return spec


def values(spec: dict) -> np.ndarray:
    rows = sorted((row for rows in spec["datasets"].values() for row in rows), key=lambda r: (r["layer"], r["head"]))
    return np.array([np.nan if row["value"] is None else row["value"] for row in rows], dtype=float)


def test_the_atlas_shows_the_texts_scores_and_selects_heads(minilm, forward_calls):
    expected = analyze(minilm, FIJI, [3]).head_scores
    forward_calls.clear()
    at = run_app()
    assert not at.exception and not errors(at)
    spec = atlas_spec(at)
    score = at.selectbox(key="atlas_score").value
    assert score.startswith("text:")
    np.testing.assert_allclose(values(spec), expected[score.split(":")[1]].ravel(), rtol=1e-5, equal_nan=True)
    assert [p["name"] for p in spec["params"]] == [ATLAS_SELECTION]
    (element,) = [e for e in at.get("vega_lite_chart") if json.loads(e.proto.spec).get("params")]
    assert list(element.proto.selection_mode) == [ATLAS_SELECTION]  # on_select is on: a click reruns the app
    at.selectbox(key="atlas_score").set_value("text:sink").run()
    np.testing.assert_allclose(values(atlas_spec(at)), expected["sink"].ravel(), rtol=1e-5, equal_nan=True)
    assert forward_calls == ["BertModel"]  # changing the score runs nothing


def test_the_induction_probe_runs_once_and_offers_its_scores(minilm, forward_calls):
    expected = analyze_induction_probe(minilm, layers=[]).head_scores["induction"]
    forward_calls.clear()
    at = run_app()
    at.checkbox(key="probe").check().run()
    assert not at.exception and not errors(at)
    assert at.selectbox(key="atlas_score").value == "probe:induction"
    np.testing.assert_allclose(values(atlas_spec(at)), expected.ravel(), rtol=1e-5, equal_nan=True)
    assert "induction probe" in atlas_spec(at)["title"]["subtitle"][0]
    at.selectbox(key="atlas_score").set_value("probe:previous_token").run()
    assert not at.exception
    assert forward_calls == ["BertModel", "BertModel"]  # the text once, the probe once (cached)


def test_a_corpus_upload_shows_means_with_intervals(gpt2_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))
    at = run_app()
    texts = ["the cat sat on the mat", "", "a dog ran home", "the mat sat on the cat again"]
    at.file_uploader(key="corpus_file").set_value(("texts.txt", "\n".join(texts).encode(), "text/plain")).run()
    at.button(key="corpus_run").click().run()
    assert not at.exception and not errors(at)
    (spec,) = [spec for spec in charts(at) if "mean over 3 texts" in spec["title"]["text"]]
    rows = [row for rows in spec["datasets"].values() for row in rows]
    assert len(rows) == 8 * 12 and all(row["low"] <= row["value"] <= row["high"] for row in rows)
    assert "95% bootstrap intervals" in json.dumps(spec["title"])
    assert any("3 of 3 texts analysed" in c.value for c in at.caption)
    assert len(at.dataframe) == 1


def test_a_bad_upload_is_a_sentence(gpt2_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))
    at = run_app()
    at.file_uploader(key="corpus_file").set_value(("texts.txt", b"\xff\xfe bad", "text/plain")).run()
    at.button(key="corpus_run").click().run()
    assert not at.exception
    assert any("is not UTF-8 text" in e for e in errors(at))

"""The app's head atlas (score picker, induction probe, selection) and its corpus upload, through AppTest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import analyze, analyze_induction_probe
from analysis.results import HEAD_SCORE_NAMES
from reports.charts import ATLAS_SELECTION
from reports.html import report_document
from tests.app import test_app
from tests.app.test_app import charts, errors, run_app, sidebar_number
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
    helps = [button.proto.help for button in at.get("download_button")]
    assert "Download the HTML report (with the induction probe)" in helps  # its atlases are a section of the report


@pytest.fixture
def downloads(monkeypatch):
    """Each deferred download's data callable, by file id: AppTest's runtime holds them in a MediaFileManager that it
    drops after the run, so they are recorded as the app registers them."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    made = {}
    add = MediaFileManager.add_deferred

    def record(self, data_callable, *args, **kwargs):
        file_id = add(self, data_callable, *args, **kwargs)
        made[file_id] = data_callable
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    return made


def downloaded(at, downloads, help_starts: str) -> str:
    """What clicking the download button whose help starts with `help_starts` would hand the browser."""
    (button,) = [b for b in at.get("download_button") if b.proto.help.startswith(help_starts)]
    data = downloads[button.proto.deferred_file_id]()
    return data if isinstance(data, str) else data.decode("utf-8")


def test_with_the_probe_on_the_json_download_carries_its_results_as_the_report_does(minilm, downloads):
    """The JSON download is what --json beside --with-probe writes: the results and the probe's under "probe", the
    very document --from-report reads back out of the downloaded report (less the provenance it shows in HTML)."""
    expected = analyze_induction_probe(minilm, layers=[])
    at = run_app()
    at.checkbox(key="probe").check().run()
    assert not at.exception and not errors(at)
    doc = json.loads(downloaded(at, downloads, "Download the results (JSON"))
    page = downloaded(at, downloads, "Download the HTML report (with the induction probe)")
    assert "provenance" in doc and report_document(page) == {k: v for k, v in doc.items() if k != "provenance"}
    probe = doc["probe"]
    assert probe["settings"]["induction_probe"] == expected.induction_probe and probe["token_ids"] == list(
        expected.token_ids)
    for name, grid in expected.head_scores.items():
        np.testing.assert_allclose(np.array(probe["head_scores"][name], dtype=float), grid, rtol=1e-5, equal_nan=True)


def test_a_corpus_upload_shows_means_with_intervals(gpt2_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(gpt2_path))  # a local model: under the operator's directories
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
    at.file_uploader(key="corpus_file").set_value(("bad.txt", b"\xff\xfe bad", "text/plain")).run()
    at.button(key="corpus_run").click().run()
    assert not at.exception and any("bad.txt is not UTF-8 text" in e for e in errors(at))
    assert [spec for spec in charts(at) if "mean over 3 texts" in spec["title"]["text"]]  # the last results stay


def test_a_bad_upload_is_a_sentence(gpt2_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(gpt2_path))  # a local model: under the operator's directories
    at = run_app()
    at.file_uploader(key="corpus_file").set_value(("texts.txt", b"\xff\xfe bad", "text/plain")).run()
    at.button(key="corpus_run").click().run()
    assert not at.exception
    assert any("is not UTF-8 text" in e for e in errors(at))


def sidebar_head(at) -> tuple[int, int]:
    return sidebar_number(at, "Layer").value, sidebar_number(at, "Head").value


def test_analyse_keeps_the_shown_head_and_the_link_carries_it_with_probe_and_score(forward_calls):
    at = run_app(layer="4", head="7")
    assert not at.exception and not errors(at)
    assert sidebar_head(at) == (4, 7)
    assert atlas_spec(at)["params"][0]["value"] == [{"layer": 4, "head": 7}]  # the atlas outlines the shown head
    at.toggle(key="exclude").set_value(False)
    at.button[0].click().run()  # Analyse with only the toggle changed: the head stays L4H7
    assert not at.exception and not errors(at)
    assert sidebar_head(at) == (4, 7)
    assert [spec for spec in charts(at) if spec["title"]["text"].startswith("Attention pattern of L4H7")]
    assert (at.query_params["layer"], at.query_params["head"]) == ("4", "7")
    assert "Over every position" in json.dumps([spec["title"] for spec in charts(at)])

    at.checkbox(key="probe").check().run()
    assert not at.exception and not errors(at)
    assert at.query_params["probe"] == "1" and at.query_params["score"] == "probe:induction"
    at.selectbox(key="atlas_score").set_value("probe:previous_token").run()
    assert at.query_params["score"] == "probe:previous_token"
    assert forward_calls == ["BertModel", "BertModel"]  # the text once, the probe once

    again = run_app(**{key: at.query_params[key] for key in at.query_params})  # the link, opened afresh
    assert not again.exception and not errors(again)
    assert again.checkbox(key="probe").value and again.selectbox(key="atlas_score").value == "probe:previous_token"
    assert "induction probe" in atlas_spec(again)["title"]["subtitle"][0]
    assert sidebar_head(again) == (4, 7)


def test_atlas_colour_scales_are_honest(minilm, forward_calls):
    forward_calls.clear()
    at = run_app()
    domains = {}
    for score in HEAD_SCORE_NAMES:
        option = f"text:{score}"
        at.selectbox(key="atlas_score").set_value(option).run()
        layers = atlas_spec(at)["layer"]
        (scale,) = [layer["encoding"]["color"]["scale"] for layer in layers if "color" in layer.get("encoding", {})]
        domains[option.split(":")[1]] = scale
    for share in ("previous_token", "duplicate_token", "induction", "sink", "self"):
        assert domains[share]["domain"] == [0, 1], share
    n_tokens = len(minilm.tokenizer(FIJI)["input_ids"])
    assert domains["entropy"]["domain"] == [0, round(np.log(n_tokens), 3)]  # bidirectional: uniform over T keys
    assert forward_calls == ["BertModel"]


def test_the_entropy_atlas_states_a_sliding_window_models_maximum(tmp_path, monkeypatch):
    """Tiny Mistral (window 8 on every layer) on the default text: the legend's maximum is what the model's own
    eager attention rows allow (tests.reports.test_atlas), not the causal every-earlier-key one."""
    from transformers import AutoTokenizer

    from tests.checkpoints import tiny_mistral
    from tests.reports.test_atlas import eager_layer_max_entropy, entropy_legend

    path = tiny_mistral(tmp_path / "mistral")
    monkeypatch.setenv("HEADSCOPE_MODEL", str(path))
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(path))  # a local model: under the operator's directories
    at = run_app()
    at.selectbox(key="atlas_score").set_value("text:entropy").run()
    assert not at.exception and not errors(at)
    spec = atlas_spec(at)
    token_ids = AutoTokenizer.from_pretrained(path)(FIJI)["input_ids"]
    assert f"{len(token_ids)} tokens" in spec["title"]["subtitle"][0]  # the ids the truth is of
    truth = eager_layer_max_entropy(path, token_ids).max()
    assert entropy_legend(spec)[0] == f"Nats (max {truth:.2f})"

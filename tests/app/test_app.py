"""The Streamlit app through AppTest, offline, on the bundled MiniLM (the app's `auto` fallback) and tiny
checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest
from transformers import PreTrainedModel

from analysis import analyze
from analysis.loading import supported_families
from analysis.presets import FIJI, PRESETS
from reports.charts import ATLAS_SELECTION, build_layer_charts
from reports.figures import FIGURE_HELP

APP = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")
TIMEOUT = 120
FIGURES, FIGURE_TABS = "figures", ("Q and K", "q·k dot products", "Softmax weights")  # streamlit_app's lazy tabs


@pytest.fixture(autouse=True)
def clear_caches():
    """Caches outlive AppTest instances in one process: every test starts cold."""
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def forward_calls():
    """How many times any whole model (a PreTrainedModel, not its submodules) was called: a pre-hook, since a
    recording pass ends at the last layer's attention and never returns."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__) if isinstance(module, PreTrainedModel) else None)
    yield calls
    handle.remove()


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def drawn_charts(at: AppTest) -> list[dict]:
    """Each drawn chart's Vega-Lite spec with its Arrow datasets decoded into row dicts."""
    out = []
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        spec["datasets"] = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pylist()
                            for d in element.proto.datasets}
        out.append(spec)
    return out


def charts(at: AppTest) -> list[dict]:
    """Every chart the page offers: the figures' tabs are lazy (only the open one is drawn), so open each in turn."""
    if FIGURES not in at.session_state:
        return drawn_charts(at)
    assert set(FIGURE_TABS) <= {tab.label for tab in at.tabs}
    opened, seen, out = at.session_state[FIGURES], set(), []
    for label in FIGURE_TABS:
        at.session_state[FIGURES] = label
        for spec in drawn_charts(at.run()):
            if spec["title"]["text"] not in seen:
                seen.add(spec["title"]["text"])
                out.append(spec)
    at.session_state[FIGURES] = opened
    at.run()
    return out


def chart_titled(specs: list[dict], words: str) -> dict:
    matches = [spec for spec in specs if words in spec["title"]["text"]]
    assert len(matches) == 1, [spec["title"]["text"] for spec in specs]
    return matches[0]


def split_atlas(specs: list[dict]) -> tuple[dict, list[dict]]:
    """(the head atlas, the layer's charts): the atlas is the one chart carrying the head selection."""
    atlas = [spec for spec in specs if [param["name"] for param in spec.get("params", [])] == [ATLAS_SELECTION]]
    assert len(atlas) == 1, [spec["title"]["text"] for spec in specs]
    return atlas[0], [spec for spec in specs if spec is not atlas[0]]


def by_chart(specs: list[dict]) -> dict[str, dict]:
    """Charts keyed by their title with the layer and head left out, so the same chart matches across views."""
    keyed = {re.sub(r"L\d+H\d+|layer \d+", "#", spec["title"]["text"]): spec for spec in specs}
    assert len(keyed) == len(specs)
    return keyed


def column(spec: dict, name: str) -> np.ndarray:
    return np.array([row[name] for rows in spec["datasets"].values() for row in rows if name in row], dtype=float)


def sidebar_number(at: AppTest, label: str):
    """The sidebar's Layer or Head input (keyed layer-N / head-N: a new key each time the shown head changes)."""
    (widget,) = [widget for widget in at.number_input if widget.label == label]
    return widget


def submit(at: AppTest, **widgets) -> AppTest:
    for key, value in widgets.items():
        if key == "text":
            at.text_area[0].set_value(value)
        elif key in ("layer", "head"):
            sidebar_number(at, key.title()).set_value(value)
        else:
            getattr(at, {"model_typed": "text_input", "exclude": "toggle"}[key])(key=key).set_value(value)
    at.button[0].click()
    return at.run()


def errors(at: AppTest) -> list[str]:
    return [element.value for element in at.error]


def test_default_run_shows_the_notebook_figures_with_the_results_numbers(minilm, forward_calls):
    at = run_app()
    assert not at.exception
    assert not errors(at)
    specs = charts(at)
    assert forward_calls == ["BertModel"]  # one forward pass for everything on the page

    layer = 3  # MiniLM has 6 layers: the middle one, as on the command line
    result = analyze(minilm, FIJI, [layer])
    expected = result.layers[layer]
    atlas, layer_charts = split_atlas(specs)
    assert "layer" not in atlas["title"]["text"]  # every layer; the model line above the atlas names the model
    titles = [item.chart.to_dict()["title"]["text"] for item in build_layer_charts(result, layer, head=0)]
    assert all(title.endswith(f" · {minilm.info.id}") for title in titles)  # the report's titles name the model
    titles = [title.removesuffix(f" · {minilm.info.id}") for title in titles]  # the app's: its model line does
    assert sorted(spec["title"]["text"] for spec in layer_charts) == sorted(titles)  # every chart of the layer
    for spec in layer_charts:  # Vega cuts a title line at the chart's width: the app wraps long subtitles
        assert all(len(line) <= 70 for line in spec["title"].get("subtitle", [])), spec["title"]
    means = chart_titled(specs, "Q and K means")
    np.testing.assert_allclose(sorted(column(means, "mean")), sorted(np.r_[expected.q_means, expected.k_means]),
                               rtol=1e-6)
    sink = chart_titled(specs, "Sink mass")
    np.testing.assert_allclose(column(sink, "sink_mass"), expected.sink_mass, rtol=1e-6)
    kde = chart_titled(specs, "KDE")
    np.testing.assert_allclose(column(kde, "density"),
                               np.r_[expected.kde["final_to_prev"], expected.kde["self_attention"]], rtol=1e-6)
    dots = chart_titled(specs, "Raw attention scores")
    same = np.array([row["value"] for rows in dots["datasets"].values() for row in rows
                     if row.get("group") == "Same head"])
    np.testing.assert_allclose(sorted(same), sorted(expected.same_head_dp), rtol=1e-5)
    diff = np.array([row["value"] for rows in dots["datasets"].values() for row in rows
                     if row.get("group") == "Different heads"])
    assert len(diff) == 1500 < len(expected.diff_head_dp)  # thinned by rank under Altair's row limit
    assert np.isin(diff, expected.diff_head_dp).all()
    assert diff.min() == expected.diff_head_dp.min() and diff.max() == expected.diff_head_dp.max()
    heatmap = chart_titled(specs, "Attention pattern of L3H0")
    np.testing.assert_allclose(column(heatmap, "weight"), expected.patterns[0].ravel(), atol=1e-7)

    page = " ".join(element.value for kind in (at.markdown, at.caption, at.info, at.success) for element in kind)
    assert "gpt2 is not in the local Hugging Face cache" in page  # what was loaded and why
    assert "[CLS]" in page and "first token is `[CLS]`" in page  # special tokens and the first token named
    assert "matches the model's own attention" in page
    downloads = [button.proto.help for button in at.get("download_button")]
    figures = [text for text in downloads if text.startswith("Download this figure as")]  # beside every chart
    assert figures == [FIGURE_HELP.format(fmt="PNG"), FIGURE_HELP.format(fmt="SVG")] * len(drawn_charts(at))
    assert [text for text in downloads if text not in figures] == ["Download the results (JSON)",
                                                                  "Download the HTML report"]
    assert at.query_params["model"] == "auto" and at.query_params["layer"] == "3"
    assert sidebar_number(at, "Layer").value == 3  # the sidebar names the default layer it shows
    assert not at.warning  # no "default value but also set via Session State" warning either


def test_changing_layer_head_and_toggle_redraws_without_running_the_model(forward_calls):
    at = run_app()
    before = charts(at)
    assert forward_calls == ["BertModel"]

    at = submit(at, layer=1, head=5)
    assert not at.exception and not errors(at)
    after = charts(at)
    assert forward_calls == ["BertModel"]  # no second forward pass
    (atlas_before, layer_before), (atlas_after, layer_after) = split_atlas(before), split_atlas(after)
    assert all(spec["title"]["text"].endswith(" · layer 1") for spec in layer_after)
    assert chart_titled(after, "Attention pattern of L1H5")
    before, after = by_chart(layer_before), by_chart(layer_after)
    assert sorted(before) == sorted(after) and len(after) == 9
    unchanged = [key for key in after if after[key]["datasets"] == before[key]["datasets"]]
    assert unchanged == []  # every chart of the layer now draws layer 1's numbers
    assert atlas_after["datasets"] == atlas_before["datasets"]  # the atlas already showed every layer

    at = submit(at, head=7, exclude=False)
    assert not at.exception and not errors(at)
    assert chart_titled(charts(at), "Attention pattern of L1H7")
    assert "Over every position" in json.dumps(chart_titled(charts(at), "Q and K means")["title"])
    assert forward_calls == ["BertModel"]
    assert at.query_params["layer"] == "1" and at.query_params["head"] == "7"


def test_query_params_reproduce_the_view():
    at = run_app(model="minilm", layer="2", head="4", text="Attention heads read keys with queries.")
    assert not at.exception and not errors(at)
    specs = charts(at)
    assert chart_titled(specs, "Attention pattern of L2H4")
    assert at.text_area[0].value == "Attention heads read keys with queries."


def test_a_preset_fills_the_text_and_analyse_uses_it(forward_calls):
    at = run_app()
    at.selectbox(key="preset").set_value("A code snippet").run()
    assert at.text_area[0].value == PRESETS["A code snippet"]
    assert forward_calls == ["BertModel"]  # choosing a preset alone runs nothing new
    at = submit(at)
    assert not at.exception and not errors(at)
    assert "def" in " ".join(element.value for element in at.markdown)
    assert len(forward_calls) == 2


def test_unknown_model_is_an_error_not_a_traceback():
    at = run_app(model="no-such-user/no-such-model-xyz")
    assert not at.exception
    assert len(errors(at)) == 1 and "no-such-user/no-such-model-xyz" in errors(at)[0]
    assert "not in the local Hugging Face cache" in errors(at)[0]
    assert not at.get("vega_lite_chart")


def test_errors_keep_the_last_good_results_on_screen():
    at = run_app()
    good = charts(at)
    assert len(split_atlas(good)[1]) == 9

    at = submit(at, model_typed="no-such-user/no-such-model-xyz")
    assert not at.exception
    assert len(errors(at)) == 1 and "no-such-user/no-such-model-xyz" in errors(at)[0]
    assert charts(at) == good  # the last good results stay, the same charts with the same data

    at = submit(at, model_typed="", text="   ")
    assert not at.exception
    assert errors(at) == ["The text is empty: type a sentence to analyse."]
    assert charts(at) == good


def test_empty_text_is_an_error():
    at = run_app(text="")
    assert not at.exception
    assert errors(at) == ["The text is empty: type a sentence to analyse."]


def test_head_out_of_range_is_an_error():
    at = run_app(head="12")
    assert not at.exception
    assert len(errors(at)) == 1 and "Head 12 is out of range" in errors(at)[0]


def test_unsupported_architecture_names_the_supported_families(t5_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(t5_path))  # the app loads local checkpoints only from these
    at = run_app()
    at = submit(at, model_typed=str(t5_path))
    assert not at.exception
    assert len(errors(at)) == 1
    assert "T5" in errors(at)[0] and supported_families() in errors(at)[0]


def test_a_causal_model_notes_that_first_token_self_attention_is_one(gpt2_path, forward_calls, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(gpt2_path))  # the deployment's default model (README: Community Cloud)
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(gpt2_path))  # ... a local one under the operator's directories
    at = run_app(layer="6", head="3")
    assert not at.exception and not errors(at)
    softmax = chart_titled(charts(at), "Softmax attention weights")
    assert "always exactly 1" in " ".join(softmax["title"]["subtitle"])  # the app wraps subtitles: lines joined
    assert forward_calls == ["GPT2Model"]
    assert at.query_params["model"] == str(gpt2_path)


def test_a_long_text_heatmap_is_aggregated_and_the_window_zooms_to_tokens(forward_calls):
    at = run_app(text=" ".join([FIJI] * 3))  # 119 MiniLM tokens: past the 70-token heatmap grid
    assert not at.exception and not errors(at)
    heatmap = chart_titled(charts(at), "Attention pattern")
    assert "blocks of 2" in json.dumps(heatmap["title"])
    assert len(column(heatmap, "weight")) <= 70 * 70
    at.slider[0].set_value((10, 40)).run()
    heatmap = chart_titled(charts(at), "Attention pattern")
    assert len(column(heatmap, "weight")) == 30 * 30 and "blocks" not in json.dumps(heatmap["title"])
    assert forward_calls == ["BertModel"]

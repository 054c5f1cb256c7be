"""The app's ablation, neuron-view and two-model tabs through AppTest, against the analysis functions."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import analyze, load_model
from analysis.ablation import compute_ablation
from analysis.neuron import neuron_view
from reports.untrusted import plain
from tests.app import test_app
from tests.app.test_app import chart_titled, charts, errors, run_app
from tests.conftest import FIJI
from tests.lm_checkpoints import tiny_gpt2_lm

clear_caches = test_app.clear_caches  # autouse: every test starts with cold caches
forward_calls = test_app.forward_calls
LAYER = 1  # the app's default layer for a 3-layer model


@pytest.fixture(scope="module")
def lm_paths(tmp_path_factory):
    return [tiny_gpt2_lm(tmp_path_factory.mktemp(f"app-seed{seed}"), seed=seed) for seed in (0, 1)]


@pytest.fixture(autouse=True)
def model_dirs(tmp_path_factory, monkeypatch):
    """The app loads local checkpoints only under the operator's directories: list this session's temp dir."""
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def app(lm_paths, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(lm_paths[0]))
    return run_app()


def grid(spec: dict) -> np.ndarray:
    """The [layer, head] values of a grid chart's data rows."""
    rows = [row for rows in spec["datasets"].values() for row in rows if "value" in row]
    n_layers, n_heads = max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1
    out = np.full((n_layers, n_heads), np.nan)
    for row in rows:
        out[row["layer"], row["head"]] = np.nan if row["value"] is None else row["value"]
    return out


def test_first_load_runs_the_model_once_and_nothing_more(lm_paths, monkeypatch, forward_calls):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(lm_paths[0]))
    at = run_app()
    assert not at.exception and not errors(at)
    assert forward_calls == ["GPT2Model"]  # the ablation, neuron view and comparison wait for a click


def test_ablation_tab_shows_the_atlas(app, lm_paths):
    app.radio(key="ablation_mode").set_value("mean")
    app.checkbox(key="ablation_run").check().run()
    assert not app.exception and not errors(app)
    expected = compute_ablation(load_model(str(lm_paths[0]), head=True), FIJI, "mean").delta
    np.testing.assert_allclose(grid(chart_titled(charts(app), "Head ablation (mean)")), expected, rtol=1e-4,
                               atol=1e-6)


def test_neuron_tab_bars_sum_to_the_dot_product(app, lm_paths):
    app.toggle(key="neuron_on").set_value(True).run()
    app.selectbox(key="neuron_key").set_value(3).run()
    assert not app.exception and not errors(app)
    view = neuron_view(load_model(str(lm_paths[0])), FIJI, LAYER, 0, -1, 3)
    spec = chart_titled(charts(app), "q·k by dimension")
    rows = [row for rows in spec["datasets"].values() for row in rows]
    products = np.array([row["product"] for row in sorted(rows, key=lambda r: r["dimension"])])
    np.testing.assert_allclose(products, view.products, atol=1e-6)
    assert abs(products.sum() - view.dot) < 1e-5 and f"{view.dot:.4f}" in str(spec["title"])


@pytest.mark.parametrize("query", [None, 5])
def test_neuron_tab_starts_at_the_analysis_query_token(minilm, query):
    """An encoder's final token is [SEP]: the neuron view opens on the token the analysis read out (its last word,
    or the link's query), as every other figure of the page does."""
    at = run_app(model="minilm", **({} if query is None else {"query": str(query)}))
    at.toggle(key="neuron_on").set_value(True).run()
    assert not at.exception and not errors(at)
    result = analyze(minilm, FIJI, query_position=query)
    assert result.tokens[-1] == "[SEP]" and result.query < len(result.tokens) - 1
    assert at.selectbox(key="neuron_query").value == result.query


def test_two_models_tab_shows_both_atlases_and_their_difference(app, lm_paths):
    app.text_input(key="compare_model").set_value(str(lm_paths[1])).run()
    app.checkbox(key="compare_run").check().run()
    assert not app.exception and not errors(app)
    app.selectbox(key="compare_score").set_value("entropy").run()
    a = analyze(load_model(str(lm_paths[0])), FIJI, [LAYER]).head_scores["entropy"]
    b = analyze(load_model(str(lm_paths[1])), FIJI, [LAYER]).head_scores["entropy"]
    specs = charts(app)
    np.testing.assert_allclose(grid(chart_titled(specs, "Attention entropy (nats) difference")), b - a, atol=1e-5)
    assert len([s for s in specs if "both models" in s["title"]["text"]]) == 4  # Q/K means and stds of layer 1


def test_two_models_of_other_shapes_show_both_ablation_atlases(app, lm_paths, tmp_path):
    """B with another depth has no B - A of the ablation atlases: each model's atlas is drawn (nothing was, so the
    two atlases asked for and computed were not shown anywhere)."""
    deeper = tiny_gpt2_lm(tmp_path / "deeper", n_layer=4)
    app.text_input(key="compare_model").set_value(str(deeper)).run()
    app.radio(key="compare_ablation").set_value("zero")
    app.checkbox(key="compare_run").check().run()
    assert not app.exception and not errors(app)
    specs = charts(app)
    for path in (lm_paths[0], deeper):
        expected = compute_ablation(load_model(str(path), head=True), FIJI, "zero").delta
        np.testing.assert_allclose(grid(chart_titled(specs, f"Head ablation (zero) · {path}")), expected, rtol=1e-4,
                                   atol=1e-6)


def test_a_different_tokenizer_is_a_sentence_with_the_id_shown_literally(app, tmp_path):
    other = tiny_gpt2_lm(tmp_path / "vocab[x](http:e)", vocab_size=400)
    app.text_input(key="compare_model").set_value(str(other)).run()
    app.checkbox(key="compare_run").check().run()
    assert not app.exception
    (message,) = [e for e in errors(app) if "same tokenizer" in e]
    assert plain(str(other)) in message  # the app's one Markdown escape: shown as text, not a link
    assert "\\[x\\](http\\:e)" in message  # brackets escaped, so no [text](url) link can form


def test_the_ablation_tab_says_what_it_measures_on_a_model_without_an_lm_head(lm_paths):
    """The bundled MiniLM (the app's offline model) has no LM head: its ablation atlas is the change in the final
    hidden states, as the chart says, while the tab's caption promised 'how much the model's loss on the text
    changes' and its seed box 'encoders' 15% masked positions' (MiniLM, an encoder, masks none). Both now say
    what each kind of checkpoint gets; a GPT-2 with its LM head still gets its loss."""
    for model, measured in (("minilm", "hidden states"), (str(lm_paths[0]), "next-token cross-entropy")):
        at = run_app(model=model)
        at.checkbox(key="ablation_run").check().run()
        assert not at.exception and not errors(at)
        [caption] = [c.value for c in at.caption if c.value.startswith("Remove one head's output")]
        [spec] = [spec for spec in charts(at) if spec["title"]["text"].startswith("Head ablation")]
        assert measured in spec["title"]["subtitle"][0]  # what compute_ablation measured
        assert "loss on the text" in caption and "without an LM head" in caption and "final hidden states" in caption
        [seed] = [box.label for box in at.number_input if box.label.startswith("Mask seed")]
        assert "masked LM" in seed and "encoders" not in seed

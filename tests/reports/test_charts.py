"""reports/charts.py: every builder draws the results' own numbers, labels heads, and stays under Altair's row limit."""

from __future__ import annotations

import json
import re

import altair as alt
import numpy as np
import pytest

from analysis import analyze
from analysis.results import AnalysisResult, LayerResult
from reports.charts import (
    COLORS,
    MAX_AXIS_CELLS,
    MAX_POINTS,
    LayerChart,
    build_heatmap_chart,
    build_kde_chart,
    build_layer_charts,
    build_means_chart,
    build_qk_means_chart,
    build_softmax_chart,
)
from tests.conftest import FIJI

KEYS = ["means", "qk_means", "qk_stds", "dot_products", "dot_distributions", "softmax", "sink_mass", "kde", "heatmap"]
# What each chart draws: its marks, outermost first (error bars are rules, the zero line of a strip is a rule).
MARKS = {"means": ["rule", "point"], "qk_means": ["point"], "qk_stds": ["point"], "dot_products": ["rule", "circle"],
         "dot_distributions": ["rule", "line"], "softmax": ["rule", "circle"], "sink_mass": ["bar"], "kde": ["line"],
         "heatmap": ["rect"]}


def synthetic_result(n_tokens: int, n_heads: int = 8, n_kv_heads: int = 2, layer: int = 0, causal: bool = True,
                     patterns: bool = True) -> AnalysisResult:
    """A result with named sizes and random (row-stochastic) patterns: no model needed."""
    rng = np.random.default_rng(0)
    t, h, g = n_tokens, n_heads, n_kv_heads
    pattern = rng.random((h, t, t)).astype(np.float32)  # [head, q_pos, k_pos]
    if causal:
        pattern *= np.tril(np.ones((t, t), dtype=np.float32))  # [q_pos, k_pos] broadcast over heads
    pattern /= pattern.sum(axis=-1, keepdims=True)  # each query's weights sum to 1
    grid = np.linspace(0, 1, 300)
    data = LayerResult(
        q_means=rng.normal(size=h), q_stds=rng.random(h) + 0.5, k_means=rng.normal(size=g), k_stds=rng.random(g) + 0.5,
        same_head_dp=rng.normal(size=h * (t - 2)), diff_head_dp=rng.normal(size=h * (g - 1) * (t - 2)),
        final_to_prev=pattern[:, -1, :-1].ravel(),
        self_attention=np.diagonal(pattern[:, 1:, 1:], axis1=1, axis2=2).ravel(),
        first_self=pattern[:, 0, 0], sink_mass=pattern[:, 1:, 0].mean(axis=1), parity_max_abs_err=3e-8,
        kde={"grid": grid, "final_to_prev": np.exp(-grid * 5), "self_attention": np.exp(-grid * 3)},
        patterns=pattern if patterns else None)
    model = {"id": "synthetic", "revision": "x", "architecture": "LlamaModel", "family": "Llama", "n_layers": 1,
             "n_heads": h, "n_kv_heads": g, "d_head": 4, "causal": causal, "dtype": "float32", "device": "cpu"}
    tokens = tuple(["<s>"] + [f" w{i}" for i in range(1, t)])
    return AnalysisResult(model=model, text="".join(tokens), tokens=tokens, token_ids=np.arange(t),
                          special_positions=(0,), exclude_first_token=True, layers={layer: data})


def rows(chart: alt.TopLevelMixin) -> list[dict]:
    """Every data row of a chart, with Altair's default data transformer (the 5,000-row limit on)."""
    spec = chart.to_dict()
    return [row for values in spec.get("datasets", {}).values() for row in values]


def marks(spec: dict) -> list[str]:
    """The mark types of a chart spec and of its layers, depth first."""
    found = [spec["mark"] if isinstance(spec["mark"], str) else spec["mark"]["type"]] if "mark" in spec else []
    return found + [mark for layer in spec.get("layer", []) for mark in marks(layer)]


def values(chart, field: str, **where) -> np.ndarray:
    return np.array([row[field] for row in rows(chart)
                     if field in row and all(row.get(k) == v for k, v in where.items())])


@pytest.fixture(scope="module")
def gpt2_result(gpt2):
    return analyze(gpt2, FIJI, [6])


def test_layer_charts_in_display_order_with_titles_naming_layer_and_model(gpt2_result):
    charts = build_layer_charts(gpt2_result, 6, head=3)
    assert [item.key for item in charts] == KEYS
    for item in charts:
        assert isinstance(item, LayerChart) and item.explanation.endswith(".")
        spec = item.chart.to_dict()
        assert "layer 6" in spec["title"]["text"] and gpt2_result.model["id"] in spec["title"]["text"]
        assert "density" not in json.dumps(spec.get("transform", []))  # KDEs come from the results, not the browser
        assert marks(spec) == MARKS[item.key], item.key
    data = gpt2_result.layers[6]
    n_rows = {key: len(rows(item.chart)) for key, item in zip(KEYS, charts, strict=True)}
    h, g, t = len(data.q_means), len(data.k_means), gpt2_result.n_tokens
    assert (n_rows["means"], n_rows["qk_means"], n_rows["qk_stds"], n_rows["sink_mass"]) == (h + g, h, h, h)
    assert n_rows["kde"] == 2 * len(data.kde["grid"]) and n_rows["heatmap"] == t * t  # one row per drawn point
    with pytest.raises(AttributeError):
        charts[0].key = "other"  # frozen


def test_charts_hold_the_results_numbers(gpt2_result):
    data = gpt2_result.layers[6]
    np.testing.assert_allclose(values(build_means_chart(gpt2_result, 6), "mean", kind="Q"), data.q_means)
    np.testing.assert_allclose(values(build_means_chart(gpt2_result, 6), "std", kind="K"), data.k_stds)
    np.testing.assert_allclose(values(build_qk_means_chart(gpt2_result, 6), "k"), data.k_means)
    kde = build_kde_chart(gpt2_result, 6)
    np.testing.assert_allclose(values(kde, "density", series="Query to earlier keys"), data.kde["final_to_prev"])
    np.testing.assert_allclose(values(kde, "weight", series="Self-attention"), data.kde["grid"])
    softmax = build_softmax_chart(gpt2_result, 6)
    np.testing.assert_allclose(values(softmax, "value", group="Self-attention, first token"), data.first_self)
    np.testing.assert_allclose(values(softmax, "value", group="Query to earlier keys"), data.final_to_prev, rtol=1e-6)
    heatmap = build_heatmap_chart(gpt2_result, 6, 3)
    np.testing.assert_allclose(values(heatmap, "weight"), data.patterns[3].ravel(), rtol=1e-6)
    labels = {row["query"] for row in rows(heatmap)}
    assert len(labels) == gpt2_result.n_tokens  # one row per token: position-prefixed, so repeats stay apart


def test_causal_note_and_bidirectional_note():
    causal = build_softmax_chart(synthetic_result(12, causal=True), 0).to_dict()
    bidirectional = build_softmax_chart(synthetic_result(12, causal=False), 0).to_dict()
    assert "always exactly 1" in json.dumps(causal["title"])
    assert "bidirectional" in json.dumps(bidirectional["title"])


def test_grouped_query_attention_labels_key_heads_as_key_heads():
    result = synthetic_result(10, n_heads=8, n_kv_heads=2)
    means = rows(build_means_chart(result, 0))
    assert [row["label"] for row in means if row["kind"] == "K"] == ["L0K0", "L0K1"]
    assert [row["label"] for row in means if row["kind"] == "Q"] == [f"L0H{h}" for h in range(8)]
    paired = rows(build_qk_means_chart(result, 0))
    assert [row["key_head"] for row in paired] == ["L0K0"] * 4 + ["L0K1"] * 4  # query head h reads key head h // 4
    np.testing.assert_allclose([row["k"] for row in paired], np.repeat(result.layers[0].k_means, 4))
    dots = build_layer_charts(result, 0)[3].chart
    same = [row for row in rows(dots) if row.get("group") == "Same head"]
    assert {(row["query_head"], row["key_head"]) for row in same} == {(f"L0H{h}", f"L0K{h // 4}") for h in range(8)}


def test_no_patterns_no_heatmap():
    result = synthetic_result(10, patterns=False)
    assert build_heatmap_chart(result, 0, 0) is None
    assert [item.key for item in build_layer_charts(result, 0)] == KEYS[:-1]


@pytest.mark.parametrize("n_tokens", [3, 70, 71, 300, 1024])
def test_every_chart_stays_under_altairs_row_limit(n_tokens):
    result = synthetic_result(n_tokens, n_heads=16, n_kv_heads=16)
    for item in build_layer_charts(result, 0, head=5):
        assert len(rows(item.chart)) < 5000, item.key  # to_dict() would raise MaxRowsError otherwise


def test_long_heatmap_is_aggregated_into_blocks_that_keep_rows_summing_to_one():
    result = synthetic_result(300)
    chart = build_heatmap_chart(result, 0, 2)
    data = rows(chart)
    side = int(np.sqrt(len(data)))
    assert side * side == len(data) and side <= MAX_AXIS_CELLS
    weights = np.array([row["weight"] for row in data]).reshape(side, side)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)  # each row block still sums to 1
    assert "blocks of 5" in json.dumps(chart.to_dict()["title"])
    pattern = result.layers[0].patterns[2].astype(np.float64)
    np.testing.assert_allclose(weights[1, 0], pattern[5:10, 0:5].sum(axis=1).mean(), rtol=1e-6)


def test_heatmap_window_zooms_to_single_tokens():
    result = synthetic_result(300)
    chart = build_heatmap_chart(result, 0, 1, positions=(100, 150))
    data = rows(chart)
    assert len(data) == 50 * 50
    assert data[0]["query"] == "100: ␣w100" and data[0]["key"] == "100: ␣w100"
    np.testing.assert_allclose([row["weight"] for row in data], result.layers[0].patterns[1, 100:150, 100:150].ravel(),
                               rtol=1e-6)


def test_long_strips_are_thinned_by_rank_and_say_so():
    result = synthetic_result(400, n_heads=12, n_kv_heads=12)
    dots = build_layer_charts(result, 0)[3].chart
    diff = np.array([row["value"] for row in rows(dots) if row.get("group") == "Different heads"])
    full = result.layers[0].diff_head_dp
    assert len(diff) == MAX_POINTS < len(full)
    assert diff.min() == full.min() and diff.max() == full.max()
    np.testing.assert_allclose(np.median(diff), np.median(full), atol=0.05)
    assert f"{MAX_POINTS:,} of {len(full):,}" in json.dumps(dots.to_dict()["title"])


def test_short_texts_draw_what_there_is_and_say_what_is_missing():
    """Two tokens whose read-outs gave no KDE (a one-head model has one weight) and no dot products (they need a key
    between the first and the final token); the charts that can be drawn still hold the layer's numbers."""
    result = synthetic_result(2, n_heads=4, n_kv_heads=4)
    layer = result.layers[0]
    short = AnalysisResult(model=result.model, text=result.text, tokens=result.tokens, token_ids=result.token_ids,
                           special_positions=(0,), exclude_first_token=True, layers={0: LayerResult(
                               **{**layer.__dict__, "same_head_dp": np.empty(0), "diff_head_dp": np.empty(0),
                                  "kde": None})})
    charts = {item.key: item.chart for item in build_layer_charts(short, 0)}
    assert list(charts) == KEYS
    for key in ("dot_products", "dot_distributions"):
        assert rows(charts[key]) == [{"value": 0.0}], key  # only the zero line: no point, no histogram bar
    assert rows(charts["kde"]) == [] and "Too few weights" in json.dumps(charts["kde"].to_dict()["title"])
    np.testing.assert_allclose(values(charts["means"], "mean", kind="Q"), layer.q_means)
    np.testing.assert_allclose(values(charts["sink_mass"], "sink_mass"), layer.sink_mass, rtol=1e-6)
    np.testing.assert_allclose(values(charts["softmax"], "value", group="Query to earlier keys"), layer.final_to_prev,
                               rtol=1e-6)
    np.testing.assert_allclose(values(charts["heatmap"], "weight"), layer.patterns[0].ravel(), rtol=1e-6)


def test_tokens_are_data_not_markup():
    result = synthetic_result(5)
    tokens = ("</s>", "<script>", " a", "\n", "&amp;")
    result = AnalysisResult(**{**result.__dict__, "tokens": tokens})
    spec = build_heatmap_chart(result, 0, 0).to_dict()
    assert "0: </s>" in {row["query"] for row in rows(build_heatmap_chart(result, 0, 0))}
    assert "3: ↵" in json.dumps(spec, ensure_ascii=False)  # whitespace made visible


def test_the_qk_means_chart_draws_one_legend_with_both_marks():
    import vl_convert

    svg = vl_convert.vegalite_to_svg(build_means_chart(synthetic_result(10), 0).to_dict())
    assert svg.count('class="mark-group role-legend"') == 1  # colour and shape merged into one legend
    assert "Q, per query head" in svg and "K, per key head" in svg
    symbols = re.findall(r'<g class="mark-symbol role-legend-symbol"[^>]*><path [^>]*d="([^"]+)" fill="([^"]+)"', svg)
    assert len(symbols) == 2
    (square, green), (circle, red) = symbols
    assert square.endswith("Z") and "A" in circle  # a square path and a circle (arc) path
    assert (green, red) == (COLORS["Q"], COLORS["K"])


def test_atlas_colour_scales_are_fixed_for_shares_and_centred_for_signed_values():
    from dataclasses import replace

    from reports.charts import build_atlas_chart, max_entropy

    rng = np.random.default_rng(0)
    scores = {name: rng.random((3, 4)) * 0.011 for name in ("previous_token", "duplicate_token", "induction", "sink",
                                                             "self")}
    scores["q_mean"] = rng.normal(size=(3, 4)) - 2.0  # mostly negative: the scale must still centre on 0
    scores["entropy"] = rng.random((3, 4))
    result = replace(synthetic_result(12), head_scores=scores)

    def color_scale(score):
        spec = build_atlas_chart(result, score).to_dict()
        (scale,) = [layer["encoding"]["color"]["scale"] for layer in spec["layer"] if "color" in layer["encoding"]]
        return scale

    for share in ("previous_token", "duplicate_token", "induction", "sink", "self"):
        assert color_scale(share)["domain"] == [0, 1]  # 0.011 does not glow like a strong head
    signed = color_scale("q_mean")
    top = np.abs(scores["q_mean"]).max()
    assert signed["domainMid"] == 0 and signed["domain"] == [-top, top] and signed["scheme"] == "redblue"
    causal_max = np.mean([np.log(i + 1) for i in range(1, 12)])  # query i sees i + 1 keys
    assert color_scale("entropy")["domain"] == [0, round(causal_max, 3)]
    assert max_entropy(12, causal=False) == pytest.approx(np.log(12))
    spec = json.dumps(build_atlas_chart(result, "entropy").to_dict())
    assert f"max {causal_max:.2f}" in spec and "Click" not in spec  # the static report has nothing to click
    tooltips = [t["title"] for layer in build_atlas_chart(result, "previous_token").to_dict()["layer"]
                for t in layer["encoding"]["tooltip"]]
    assert "Previous-token score" in tooltips and "previous_token" not in tooltips


def test_report_numbers_are_rounded_for_display():
    from reports.html import ENV

    num = ENV.filters["num"]
    assert num(2.467e-16) == "0" and num(-3e-15) == "0"  # a centred mean is 0 up to rounding: show 0
    assert num(0.123456) == "0.1235" and num(-12.3456) == "-12.35" and num(3.2e-6) == "3.2e-06"

"""The head atlas: a layers x heads chart of one score, deterministic, with a named point selection."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from markupsafe import escape

from analysis import analyze
from analysis.corpus import CorpusAccumulator
from analysis.errors import HeadscopeError
from analysis.results import HEAD_SCORE_NAMES, AnalysisResult
from reports.charts import (
    ATLAS_SELECTION,
    SCORE_EXPLANATIONS,
    SCORE_TITLES,
    build_atlas_chart,
    build_corpus_atlas_chart,
    selected_head,
)
from tests.conftest import REPEATS


@pytest.fixture(scope="module")
def result(gpt2):
    return analyze(gpt2, REPEATS, layers=[6])


def rows(spec: dict) -> list[dict]:
    (data,) = spec["datasets"].values()
    return data


@pytest.mark.parametrize("score", HEAD_SCORE_NAMES)
def test_the_atlas_holds_every_heads_score(result, score):
    spec = build_atlas_chart(result, score).to_dict()
    data = rows(spec)
    scores = result.head_scores[score]  # [layer, head]
    assert len(data) == scores.size == 8 * 12
    for row in data:
        assert row["value"] == pytest.approx(scores[row["layer"], row["head"]], rel=1e-5, abs=1e-12)
    assert {"calculate": "'L' + datum.layer + 'H' + datum.head", "as": "label"} in spec["layer"][0]["transform"]
    assert [param["name"] for param in spec["params"]] == [ATLAS_SELECTION]
    assert spec["params"][0]["select"]["fields"] == ["layer", "head"]
    tooltip = json.dumps(spec["layer"][1]["encoding"]["tooltip"])
    assert '"label"' in tooltip and '"value"' in tooltip


def test_the_same_results_give_the_same_spec_bytes(result):
    first = json.dumps(build_atlas_chart(result, "induction").to_dict())
    build_atlas_chart(result, "sink").to_dict()  # other charts in between must not renumber anything
    assert json.dumps(build_atlas_chart(result, "induction").to_dict()) == first


def test_undefined_scores_are_missing_cells(gpt2):
    # one token, its own attention excluded: nothing to measure (exclude_bos keeps a first word)
    one = analyze(gpt2, "a", layers=[6], exclude_current_token=True)
    spec = build_atlas_chart(one, "previous_token").to_dict()
    assert len(rows(spec)) == 8 * 12 and all(row["value"] is None for row in rows(spec))
    assert {"filter": "isValid(datum.value)"} in spec["layer"][1]["transform"]  # coloured only where defined
    with pytest.raises(KeyError):
        build_atlas_chart(one, "no_such_score")


def test_the_corpus_atlas_holds_means_and_intervals(gpt2):
    from analysis.capture import capture

    acc = CorpusAccumulator(gpt2.info.to_dict())
    for text in ("the cat sat", "a dog ran home", "the mat"):
        acc.add(capture(gpt2, text, pattern_layers=[]))
    corpus = acc.finish(n_boot=50)
    spec = build_corpus_atlas_chart(corpus, "sink").to_dict()
    for row in rows(spec):
        layer, head = row["layer"], row["head"]
        assert row["value"] == pytest.approx(corpus.means["sink"][layer, head], rel=1e-5)
        assert row["low"] == pytest.approx(corpus.low["sink"][layer, head], rel=1e-5)
        assert row["high"] == pytest.approx(corpus.high["sink"][layer, head], rel=1e-5)
        assert row["n"] == 3
    assert "mean over 3 texts" in spec["title"]["text"]


def test_selected_head_reads_streamlits_selection_state():
    assert selected_head({ATLAS_SELECTION: [{"layer": 3, "head": 5}]}) == (3, 5)
    assert selected_head({ATLAS_SELECTION: [{"layer": 1, "head": 0}, {"layer": 2, "head": 7}]}) == (2, 7)  # shift-click
    assert selected_head({ATLAS_SELECTION: [{"layer": 2.0, "head": "4"}]}) == (2, 4)
    for empty in (None, {}, {ATLAS_SELECTION: {}}, {ATLAS_SELECTION: []}, {"other": [{"layer": 1, "head": 1}]},
                  {ATLAS_SELECTION: [{"head": 1}]}):
        assert selected_head(empty) is None


def test_the_report_has_an_atlas_per_score_before_the_layers_and_the_centred_statistics(gpt2, result):
    from reports.html import render_report

    page = render_report(result, head=2)
    atlas, first_layer = page.index('<section id="atlas">'), page.index('<section id="layer-6">')
    assert atlas < page.index('<section id="same-vs-different">') < first_layer
    for score in HEAD_SCORE_NAMES:
        assert page.count(f'data-chart="chart-atlas-{score}"') == 1
    for score in HEAD_SCORE_NAMES:  # its own explanation under its heading, escaped as Jinja does
        block = page[page.index(f'<div class="chart" id="atlas-{score}">'):]
        block = block[:block.index("</div>")]
        assert f"<h3>{escape(SCORE_TITLES[score])}</h3>" in block
        assert f"<p>{escape(SCORE_EXPLANATIONS[score])}</p>" in block
    # readable without JavaScript: every score of every head is in a table
    scores = result.head_scores["induction"]
    table = page[page.index('id="atlas-induction"'):page.index('id="atlas-sink"')]
    assert len(re.findall(r'<th class="label">L\d+</th>', table)) == 8 and f"<td>{scores[6, 3]:.4g}</td>" in table
    stats = page[page.index('<section id="same-vs-different">'):first_layer]
    assert "adding a constant to every key" in stats and "softmax ignores it" in stats
    dp = result.layers[6].dp_stats
    assert f"{dp.rank_biserial_centered:.4g}" in stats
    assert abs(dp.same_head_dp_centered.mean()) < 1e-9 and "<td>0</td>" in stats  # centred: 0 up to rounding, shown 0


def test_an_induction_probe_report_says_so(gpt2):
    from analysis import analyze_induction_probe
    from reports.html import render_report

    page = render_report(analyze_induction_probe(gpt2, length=20, seed=3, layers=[6]))
    assert "on the induction probe (20 random tokens written twice, seed 3)" in page


# ---- the entropy atlas's maximum under sliding windows ---------------------------------------------------------------

def _tiny(name: str, path):
    from tests import checkpoints

    builders = {
        "mistral": checkpoints.tiny_mistral,  # window 8 on every layer
        "gemma2": checkpoints.tiny_gemma2,  # window 6 on layer 0, layer 1 global
        "gemma2-sliding": lambda p: checkpoints.tiny_gemma2(p, layer_types=("sliding_attention",) * 2),
        "qwen2-window": lambda p: checkpoints.tiny_qwen2(p, use_sliding_window=True, sliding_window=8,
                                                         max_window_layers=1),  # layers >= 1 windowed
        "llama": checkpoints.tiny_llama,  # causal, no window: unchanged
        # config.is_causal False: bidirectional, each query sees the keys within the window on both sides
        "gemma2-encoder": lambda p: checkpoints.tiny_gemma2(p, use_bidirectional_attention=True, is_causal=False),
        "mistral-encoder": lambda p: checkpoints.tiny_mistral(p, is_causal=False),  # 2 * 8 + 1 keys, every layer
        "bert": lambda p: checkpoints.tiny_bert(p, n_layer=2, n_head=4, hidden=32),  # encoder: unchanged
    }
    return builders[name](path)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    paths = {}

    def path(name):
        if name not in paths:
            paths[name] = _tiny(name, tmp_path_factory.mktemp(f"atlas-{name}"))
        return paths[name]
    return path


def eager_layer_max_entropy(path, token_ids) -> np.ndarray:
    """[layer]: the model's own most reachable mean entropy of rows 1..T-1 (what the entropy score averages): the
    mean of ln(keys the row sees), the row's nonzero weights in its eager output_attentions, widest head."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.as_tensor([list(token_ids)]), output_attentions=True)
    widths = [(weights[0] > 0).sum(dim=-1).double() for weights in out.attentions]  # per layer [head, q_pos]
    return np.array([float(w[:, 1:].log().mean(dim=-1).max()) for w in widths])


def entropy_legend(spec: dict) -> tuple[str, list]:
    (color,) = [layer["encoding"]["color"] for layer in spec["layer"] if "color" in layer["encoding"]]
    return color["title"], color["scale"]["domain"]


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma2-sliding", "qwen2-window", "llama", "bert",
                                  "gemma2-encoder", "mistral-encoder"])
def test_the_entropy_maximum_is_what_the_models_own_attention_allows(tiny_paths, name):
    from analysis import load_model
    from reports.charts import layer_max_entropies
    from tests.conftest import FIJI

    path = tiny_paths(name)
    result = analyze(load_model(str(path)), FIJI)
    truth = eager_layer_max_entropy(path, result.token_ids)  # [layer]
    assert result.n_tokens > 2 * (2 * 8 + 1)  # longer than every window here, a bidirectional one's both sides too
    np.testing.assert_allclose(layer_max_entropies(result.model, result.n_tokens), truth, rtol=1e-12)
    entropy = result.head_scores["entropy"]  # [layer, head]
    assert (entropy <= truth[:, None] + 1e-6).all()  # no head above its layer's maximum
    spec = build_atlas_chart(result, "entropy").to_dict()
    title, domain = entropy_legend(spec)
    assert title == f"Nats (max {truth.max():.2f})" and domain == [0, round(truth.max(), 3)]
    subtitle = spec["title"]["subtitle"]
    assert f"{truth.max():.2f} nats (the maximum)" in subtitle[1]
    lower = [layer for layer in range(len(truth)) if f"{truth[layer]:.2f}" != f"{truth.max():.2f}"]
    assert len(subtitle) == 2 + bool(lower)  # the layers that cannot reach the atlas's maximum, named
    if lower:
        (layer,) = lower
        assert subtitle[2].startswith(f"Layer {layer}: at most {truth[layer]:.2f} nats")


def test_the_report_and_its_read_back_state_the_windowed_maximum(tiny_paths, tmp_path, capsys):
    """A real report's rendered legend (vl-convert SVG); the results JSON read back (--from-report) keeps the
    windows, and a document from before them (no attention_windows) reads as no window."""
    import vl_convert

    from analysis.schema import validate_results
    from reports.__main__ import main
    from reports.html import DataPool
    from tests.reports.test_html import chart_blocks, embedded_results, pool_of

    path = tiny_paths("mistral")

    def legend(page: str) -> str:
        pool = DataPool.read(embedded_results(page), pool_of(page))
        svg = vl_convert.vegalite_to_svg(pool.spec(chart_blocks(page)["chart-atlas-entropy"]))
        (title,) = re.findall(r'role-legend-title".*?<text [^>]*>([^<]*)</text>', svg, re.DOTALL)
        return title

    report, again = tmp_path / "report.html", tmp_path / "again.json"
    assert main(["--model", str(path), "--html", str(report)]) == 0, capsys.readouterr().err
    truth = eager_layer_max_entropy(path, embedded_results(report.read_text())["token_ids"]).max()
    assert legend(report.read_text()) == f"Nats (max {truth:.2f})"
    assert main(["--from-report", str(report), "--json", str(again)]) == 0, capsys.readouterr().err
    data = validate_results(json.loads(again.read_text()))
    assert data["model"]["attention_windows"] == [8, 8]
    assert entropy_legend(build_atlas_chart(AnalysisResult.from_dict(data), "entropy").to_dict())[0] == (
        f"Nats (max {truth:.2f})")
    del data["model"]["attention_windows"]  # a document written before the windows were recorded
    validate_results(data)
    causal = np.log(np.arange(2, len(data["tokens"]) + 1)).mean()  # every earlier key
    old = build_atlas_chart(AnalysisResult.from_dict(data), "entropy").to_dict()
    assert entropy_legend(old)[0] == f"Nats (max {causal:.2f})"
    bad = {**data, "model": {**data["model"], "attention_windows": [8]}}
    with pytest.raises(HeadscopeError, match="attention_windows has 1 layers but the model has 2"):
        validate_results(bad)

"""analyze() against ground truth nobody typed in: the notebook's own code and the model's own attention."""

import numpy as np
import pytest
import torch

from analysis import analyze
from analysis.parity import PARITY_TOLERANCE
from analysis.results import ARRAY_FIELDS
from tests.conftest import FIJI, REPEATS
from tests.notebook import run_notebook
from tests.reference import assert_layer_rank_statistics_close

FIELDS = ["q_means", "q_stds", "k_means", "k_stds", "same_head_dp", "diff_head_dp", "final_to_prev",
          "self_attention", "first_self"]


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text", [FIJI, REPEATS])
@pytest.mark.parametrize("layer", [6, 0])
def test_every_field_equals_the_notebook(gpt2, text, layer):
    result = analyze(gpt2, text, layers=[layer]).layers[layer]
    notebook = run_notebook(gpt2.model, gpt2.tokenizer, text, layer)
    for name in FIELDS:
        assert getattr(result, name).shape == notebook[name].shape, name
        close(getattr(result, name), notebook[name])
    for name in ("grid", "final_to_prev", "self_attention"):
        close(result.kde[name], notebook["kde"][name])
    close(result.patterns, notebook["patterns"])
    close(result.sink_mass, notebook["patterns"][:, 1:, 0].mean(axis=1))
    assert result.parity_max_abs_err <= 1e-5


@pytest.mark.parametrize("text", [FIJI, REPEATS])
def test_the_gpu_route_equals_the_notebook_too(gpt2, text, monkeypatch):
    """What a GPU runs (the KDE and the Mann-Whitney ranks in torch, the fused sdpa kernel with its causal flag, the
    entropy from the pattern), here on the CPU."""
    import importlib

    from analysis.metrics import compute_mannwhitney

    expected_scores = analyze(gpt2, text, layers=[0, 6]).head_scores  # the CPU's routes
    monkeypatch.setattr(importlib.import_module("analysis.metrics"), "NUMPY_ON_CPU", False)
    monkeypatch.setitem(importlib.import_module("analysis.patterns").ENTROPY_FROM_SCORES, "cpu", False)
    result = analyze(gpt2, text, layers=[0, 6], attention="sdpa")
    for name, values in expected_scores.items():
        np.testing.assert_allclose(result.head_scores[name], values, rtol=0, atol=1e-5, err_msg=name)
    for layer in (0, 6):
        measured, notebook = result.layers[layer], run_notebook(gpt2.model, gpt2.tokenizer, text, layer)
        for name in FIELDS:
            scale = max(1.0, float(np.abs(notebook[name]).max()))  # sdpa rounds differently: to 1e-5 of the scale
            np.testing.assert_allclose(getattr(measured, name), notebook[name], rtol=0, atol=1e-5 * scale)
        for name in ("final_to_prev", "self_attention"):
            close(measured.kde[name], notebook["kde"][name])
        p, r = compute_mannwhitney(measured.same_head_dp, measured.diff_head_dp)
        assert measured.dp_stats.mannwhitney_p == pytest.approx(p, rel=1e-9)
        assert measured.dp_stats.rank_biserial == pytest.approx(r, abs=1e-12)
        assert measured.parity_max_abs_err <= 1e-5


def _eager_attentions(path, text, tokenizer):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


@pytest.mark.parametrize("fixture", ["gpt2", "minilm"])
def test_patterns_equal_the_models_own_eager_attention(request, fixture):
    loaded = request.getfixturevalue(fixture)
    result = analyze(loaded, FIJI)
    eager = _eager_attentions(loaded.info.path, FIJI, loaded.tokenizer)
    assert sorted(result.layers) == list(range(loaded.info.n_layers)) == list(range(len(eager)))
    for layer, expected in enumerate(eager):  # to float32 parity: another CPU's vector width rounds the scores
        assert result.layers[layer].parity_max_abs_err <= PARITY_TOLERANCE["float32"]  # differently (AVX2: 1.2e-6)
        np.testing.assert_allclose(result.layers[layer].patterns, expected, atol=PARITY_TOLERANCE["float32"])


def test_bert_is_not_causal(minilm):
    pattern = analyze(minilm, FIJI, layers=[2]).layers[2].patterns
    assert minilm.info.causal is False
    assert np.triu(pattern, k=1).sum() > 1.0  # queries read later keys
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)


def test_exclude_first_token_switch(gpt2):
    captured_q = analyze(gpt2, FIJI, layers=[6], exclude_first_token=False)
    notebook = run_notebook(gpt2.model, gpt2.tokenizer, FIJI, 6)
    q_all = torch.stack(notebook["Q_h"])  # [head, pos, d_head]: the notebook's split, first token kept
    close(captured_q.layers[6].q_means, q_all.mean(dim=(1, 2)).numpy())
    close(captured_q.layers[6].q_stds, q_all.reshape(q_all.shape[0], -1).std(dim=1).numpy())
    assert captured_q.exclude_first_token is False


def test_a_one_token_text_is_valid(gpt2):
    result = analyze(gpt2, "cat", layers=[6])
    layer = result.layers[6]
    assert result.n_tokens == 1
    assert layer.same_head_dp.size == 0 and layer.diff_head_dp.size == 0 and layer.final_to_prev.size == 0
    assert layer.kde is None  # no weight to estimate a density of (the notebook's scipy raises)
    assert result.warnings == (("The text has only 1 token: the dot products and the KDE need at least 2, so those "
                               "fields are empty."),)
    assert layer.first_self.tolist() == [1.0] * 12


@pytest.mark.parametrize("exclude_first_token", [True, False])
def test_a_two_token_text_has_the_notebooks_kde_and_dot_products_where_its_query_has_a_key(gpt2,
                                                                                         exclude_first_token):
    """Two tokens: the final token's weights on the first and on itself, one per head, are what the notebook's KDE
    estimates (it draws one); the dot products need a key, the first token, which is left out by default. With the
    first token kept they are the notebook's q.k with it (the warning said "the dot products need at least 3
    tokens ... so those fields are empty" beside the 12 dot products it gave)."""
    result = analyze(gpt2, "the cat", layers=[6], exclude_first_token=exclude_first_token)
    notebook = run_notebook(gpt2.model, gpt2.tokenizer, "the cat", 6)
    layer = result.layers[6]
    assert result.n_tokens == 2 and layer.kde is not None
    for name in ("grid", "final_to_prev", "self_attention"):
        close(layer.kde[name], notebook["kde"][name])
    for name in ("final_to_prev", "self_attention", "first_self"):
        close(getattr(layer, name), notebook[name])
    if exclude_first_token:
        assert layer.same_head_dp.size == 0 and layer.diff_head_dp.size == 0
        assert result.warnings == (("The text has only 2 tokens, and its query token has no key left to compare "
                                   "with, so the dot products are empty: use a longer text, or keep the first "
                                   "token."),)
    else:  # the final token's q.k with the first token's key, head by head (the notebook always leaves it out)
        q, k = notebook["Q_h"], notebook["K_h"]  # per head [pos, d_head]
        close(layer.same_head_dp, [float(q[h][-1] @ k[h][0]) for h in range(12)])
        assert layer.diff_head_dp.size == 12 * 11 and not result.warnings


def test_round_trip_through_json(gpt2):
    import json

    result = analyze(gpt2, REPEATS, layers=[0, 6])
    data = json.loads(json.dumps(result.to_dict(include_patterns=True), allow_nan=False))
    again = type(result).from_dict(data)
    assert again.to_dict(include_patterns=True) == data
    assert data["schema"] == "headscope.results/1"
    assert list(data["layers"]) == ["0", "6"]
    assert len(data["layers"]["6"]["patterns"]) == 12
    assert "patterns" not in result.to_dict()["layers"]["6"]


def test_patterns_beyond_the_budget_are_reduced_to_read_outs(gpt2, monkeypatch):
    import importlib

    kept = analyze(gpt2, FIJI, layers=[0, 6])
    capture_module = importlib.import_module("analysis.capture")  # the attribute analysis.capture is the function
    monkeypatch.setattr(capture_module, "PATTERN_BUDGET", 1024)  # bytes: smaller than any pattern here
    reduced = analyze(gpt2, FIJI, layers=[0, 6])
    forced = analyze(gpt2, FIJI, layers=[0, 6], keep_patterns=True)
    assert kept.layers[6].patterns is not None and forced.layers[6].patterns is not None
    assert reduced.layers[6].patterns is None and "were not kept" in reduced.warnings[-1]
    assert reduced.to_dict() == {**kept.to_dict(), "warnings": list(reduced.warnings)}


# ---- batches: each text's numbers equal its single-text run ---------------------------------------------------------

BATCH_TEXTS = [FIJI, "the cat", REPEATS, "", "cat", "Mary and John went to the store. John gave a drink to Mary."]


def assert_same_result(batched, single, tolerance=1e-5):
    """Equal to `tolerance` relative to each field's scale: a padded batch's matrix products round differently
    from a single text's (~1e-7 relative per layer), which unscaled dot products of magnitude ~10 carry as ~1e-5."""
    assert batched.tokens == single.tokens and batched.special_positions == single.special_positions
    np.testing.assert_array_equal(batched.token_ids, single.token_ids)
    assert sorted(batched.layers) == sorted(single.layers) and batched.warnings == single.warnings
    for name, scores in single.head_scores.items():
        np.testing.assert_allclose(batched.head_scores[name], scores, rtol=tolerance, atol=tolerance, err_msg=name)
    for layer, want in single.layers.items():
        got = batched.layers[layer]
        for name in ARRAY_FIELDS:
            assert getattr(got, name).shape == getattr(want, name).shape, (layer, name)
            scale = max(1.0, float(np.abs(getattr(want, name)).max(initial=0)))
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=tolerance * scale,
                                       err_msg=f"layer {layer} {name}")
        assert (got.kde is None) == (want.kde is None)
        if want.kde is not None:
            for name, curve in want.kde.items():
                np.testing.assert_allclose(got.kde[name], curve, atol=tolerance)
        assert_layer_rank_statistics_close(got, want, tolerance, f"layer {layer}")  # but for flips of near pairs
        assert got.parity_max_abs_err <= 1e-5


@pytest.fixture(scope="module")
def left_padded_llama(tmp_path_factory):
    from analysis import load_model
    from tests.checkpoints import tiny_llama

    loaded = load_model(str(tiny_llama(tmp_path_factory.mktemp("tiny-llama-batch"))))
    loaded.tokenizer.padding_side = "left"
    return loaded


@pytest.mark.parametrize("fixture, side", [("gpt2", "right"), ("left_padded_llama", "left"), ("minilm", "right")])
def test_a_padded_batch_gives_each_text_its_single_run(request, fixture, side):
    from analysis import HeadscopeError, analyze_batch
    from analysis.capture import pad_batch, text_input

    loaded = request.getfixturevalue(fixture)
    assert loaded.tokenizer.padding_side == side
    items = [text_input(loaded, text) for text in BATCH_TEXTS if text]
    encoded, spans = pad_batch(loaded, items)
    mask = encoded["attention_mask"].numpy()
    assert all(mask[row, start:stop].all() and mask[row].sum() == stop - start for row, (start, stop) in
               enumerate(spans))  # padding is never a text position
    assert (max(start for start, _ in spans) > 0) == (side == "left")  # shorter texts start later
    batched = analyze_batch(loaded, BATCH_TEXTS, batch_size=8, keep_patterns=True)
    assert isinstance(batched[3], HeadscopeError) and "empty" in str(batched[3])
    for text, result in zip(BATCH_TEXTS, batched):
        if text:
            single = analyze(loaded, text, keep_patterns=True)
            assert_same_result(result, single)
            for layer, want in single.layers.items():
                np.testing.assert_allclose(result.layers[layer].patterns, want.patterns, atol=1e-5)


def test_batch_size_splits_and_keeps_order(gpt2):
    from analysis import analyze_batch

    texts = [FIJI, REPEATS, "the cat sat", FIJI[:40]]
    by_two = analyze_batch(gpt2, texts, batch_size=2, layers=[6])
    by_four = analyze_batch(gpt2, texts, batch_size=4, layers=[6])
    assert [r.text for r in by_two] == [r.text for r in by_four] == texts
    for a, b in zip(by_two, by_four):
        assert_same_result(a, b)


def test_a_batch_larger_than_memory_is_split(gpt2, monkeypatch):
    """An out-of-memory pass is retried in halves; a single text that cannot fit becomes its error."""
    from analysis import HeadscopeError, analyze_batch, pipeline

    real, sizes = pipeline.run_pass, []

    def tight(loaded, items, *args, **kwargs):
        sizes.append(len(items))
        if len(items) > 1 or items[0].ids.size > 10:  # FIJI is longer than 10 tokens, the others shorter
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loaded, items, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pass", tight)
    results = analyze_batch(gpt2, ["the cat sat", "the dog ran far", FIJI], batch_size=4, layers=[0])
    assert sizes[0] == 3 and max(sizes[1:]) <= 2
    assert [type(r).__name__ for r in results] == ["AnalysisResult", "AnalysisResult", "HeadscopeError"]
    assert "does not fit" in str(results[2])
    with pytest.raises(HeadscopeError, match="at least 1"):
        analyze_batch(gpt2, ["x"], batch_size=0)

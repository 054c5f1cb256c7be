"""The chosen query token, the key mask and exclude_bos (issue 12), against ground truth nobody typed in: the
notebook's own tensors (GPT-2), the model's own eager attention and the plain loops of the notebook's dot products
with the keys spelled out position by position."""

import json

import numpy as np
import pytest
import torch

from analysis import HeadscopeError, analyze, analyze_batch, capture, load_model, summarize
from analysis.capture import resolve_query
from analysis.head_scores import compute_head_scores
from analysis.results import AnalysisResult
from tests import checkpoints
from tests.conftest import FIJI, REPEATS
from tests.notebook import run_notebook


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(str(checkpoints.tiny_llama(tmp_path_factory.mktemp("tiny-llama-query"))))


@pytest.fixture(scope="module")
def bert(bert_path):
    return load_model(str(bert_path))


def eager(loaded, text) -> list[np.ndarray]:
    """The model's own attention weights, per layer [head, q_pos, k_pos] (a second, stock eager copy)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(loaded.info.path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**loaded.tokenizer(text, return_tensors="pt"), output_attentions=True)
    return [w[0].numpy() for w in out.attentions]


def loop_dots(q, k, p, keys) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's loops (query head outer, key head inner) with the query row p and the key positions listed."""
    same, diff = [], []
    n_rep = q.shape[0] // k.shape[0]
    for qi in range(q.shape[0]):
        for ki in range(k.shape[0]):
            dp = [float(np.dot(q[qi, p].astype(np.float64), k[ki, j].astype(np.float64))) for j in keys]
            (same if ki == qi // n_rep else diff).extend(dp)
    return np.array(same), np.array(diff)


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [5, -4, 2])
def test_a_chosen_query_on_gpt2_equals_the_notebooks_tensors(gpt2, p):
    result = analyze(gpt2, FIJI, layers=[6], query_position=p)
    notebook = run_notebook(gpt2.model, gpt2.tokenizer, FIJI, 6)
    n = result.n_tokens
    at = p % n
    assert result.query == at and result.query_choice == "chosen" and result.query_token == result.tokens[at]
    q, k = torch.stack(notebook["Q_h"]).numpy(), torch.stack(notebook["K_h"]).numpy()  # [head, pos, d_head]
    same, diff = loop_dots(q, k, at, range(1, at))  # keys 1..P-1: the first token and the query left out
    layer = result.layers[6]
    close(layer.same_head_dp, same)
    close(layer.diff_head_dp, diff)
    close(layer.final_to_prev, notebook["patterns"][:, at, :at].reshape(-1))  # query to earlier keys
    close(layer.self_attention, notebook["self_attention"])  # the query does not touch these
    close(layer.q_means, notebook["q_means"])


def test_the_default_and_minus_one_are_the_final_token_on_causal_models(gpt2, llama):
    for loaded in (gpt2, llama):
        default = analyze(loaded, FIJI, layers=[1])
        last = analyze(loaded, FIJI, layers=[1], query_position=-1)
        assert default.query == last.query == default.n_tokens - 1
        assert default.query_choice == "the final token (default for causal models)"
        np.testing.assert_array_equal(default.layers[1].same_head_dp, last.layers[1].same_head_dp)
        np.testing.assert_array_equal(default.layers[1].final_to_prev, last.layers[1].final_to_prev)


@pytest.mark.parametrize("fixture", ["minilm", "bert"])
def test_encoders_default_to_the_last_word_and_compare_every_other_token(request, fixture):
    loaded = request.getfixturevalue(fixture)
    result = analyze(loaded, FIJI, layers=[1])
    n = result.n_tokens
    assert result.special_positions == (0, n - 1)  # [CLS] ... [SEP]
    assert result.query == n - 2 and result.query_token != "[SEP]"
    assert result.query_choice == "the last non-special token (default for encoders)"
    captured = capture(loaded, FIJI, pattern_layers=[1])
    p = result.query
    keys = [j for j in range(1, n) if j != p]  # bidirectional: later keys too, the first token left out
    same, diff = loop_dots(captured.q[1], captured.k[1], p, keys)
    close(result.layers[1].same_head_dp, same, 1e-4)
    close(result.layers[1].diff_head_dp, diff, 1e-4)
    weights = eager(loaded, FIJI)[1]  # [head, q_pos, k_pos]
    others = [j for j in range(n) if j != p]
    close(result.layers[1].final_to_prev, weights[:, p, others].reshape(-1))  # "query to other tokens"
    assert result.layers[1].kde is not None


def test_special_keys_can_be_left_out(minilm, llama):
    for loaded in (minilm, llama):
        result = analyze(loaded, FIJI, layers=[1], exclude_special_keys=True)
        off = analyze(loaded, FIJI, layers=[1])
        n, p, special = result.n_tokens, result.query, set(result.special_positions)
        assert special and result.exclude_special_keys and not off.exclude_special_keys
        captured = capture(loaded, FIJI, pattern_layers=[1])
        causal = loaded.info.causal
        keys = [j for j in range(1, p if causal else n) if j != p and j not in special]
        same, diff = loop_dots(captured.q[1], captured.k[1], p, keys)
        close(result.layers[1].same_head_dp, same, 1e-4)
        close(result.layers[1].diff_head_dp, diff, 1e-4)
        read = [j for j in range(p if causal else n) if j != p and j not in special]
        close(result.layers[1].final_to_prev, eager(loaded, FIJI)[1][:, p, read].reshape(-1))
        assert result.layers[1].final_to_prev.size < off.layers[1].final_to_prev.size  # <s> / [CLS] left out
        if not causal:  # [SEP] after the query: out of the dot products too (<s> and [CLS] already were)
            assert result.layers[1].same_head_dp.size < off.layers[1].same_head_dp.size


@pytest.mark.parametrize("fixture", ["gpt2", "bert", "llama", "minilm"])
def test_summarize_changes_the_query_without_the_model(request, fixture, monkeypatch):
    """The app's route: one capture, then any query token from the kept q, k and patterns, equal to a fresh pass."""
    loaded = request.getfixturevalue(fixture)
    captured = capture(loaded, REPEATS, pattern_layers=[1], keep_patterns=True)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    for p in (3, -2, None):
        fresh = analyze(loaded, REPEATS, layers=[1], query_position=p, exclude_special_keys=p == 3)
        with monkeypatch.context() as patched:
            patched.setattr(loaded.model, "forward", no_model)
            again = summarize(captured, loaded.info.to_dict(), [1], query_position=p, exclude_special_keys=p == 3)
        assert again.query == fresh.query and again.query_choice == fresh.query_choice
        for name in ("same_head_dp", "diff_head_dp", "final_to_prev", "self_attention"):
            close(getattr(again.layers[1], name), getattr(fresh.layers[1], name))


def test_another_query_needs_the_kept_pattern(gpt2):
    captured = capture(gpt2, FIJI, pattern_layers=[1], keep_patterns=False)
    same = summarize(captured, gpt2.info.to_dict(), [1], query_position=-1)  # the captured row itself: fine
    assert same.query == same.n_tokens - 1
    with pytest.raises(HeadscopeError, match="pattern was not kept.*query_position=4"):
        summarize(captured, gpt2.info.to_dict(), [1], query_position=4)



def test_a_read_out_with_other_key_exclusions_names_the_capture_that_gives_it(bert):
    """Captured at query 2 without its pattern, asked at query 2 with the special keys left out: the advice was
    'capture with query_position=2', the capture it already was; following the advice now gives the read-out, the
    pattern's own row less the special keys."""
    text = "hello [SEP] world again"
    captured = capture(bert, text, keep_patterns=False, query_position=2)
    with pytest.raises(HeadscopeError, match="pattern was not kept") as error:
        summarize(captured, bert.info.to_dict(), [0], query_position=2, exclude_special_keys=True)
    assert "query_position=2, exclude_special_keys=True" in str(error.value)
    again = capture(bert, text, keep_patterns=False, query_position=2, exclude_special_keys=True)
    result = summarize(again, bert.info.to_dict(), [0], query_position=2, exclude_special_keys=True)
    row = eager(bert, text)[0][:, 2]  # [head, k_pos]: the model's own weights of query 2
    keys = [i for i in range(len(result.tokens)) if i != 2 and i not in result.special_positions]
    np.testing.assert_allclose(result.layers[0].final_to_prev, row[:, keys].reshape(-1), rtol=0, atol=1e-5)

@pytest.mark.parametrize("p", [99, -99, 1.5, True])
def test_an_out_of_range_query_is_one_clear_error(gpt2, p):
    with pytest.raises(HeadscopeError, match=r"Query position .* is out of range: the text has \d+ token"):
        analyze(gpt2, FIJI, layers=[0], query_position=p)


def test_a_batch_gives_a_too_short_text_its_own_error(gpt2):
    results = analyze_batch(gpt2, ["cat", FIJI], layers=[0], query_position=-3)
    assert isinstance(results[0], HeadscopeError) and "out of range" in str(results[0])
    assert results[1].query == results[1].n_tokens - 3


def test_an_early_query_has_no_dot_products_and_says_so(gpt2):
    result = analyze(gpt2, FIJI, layers=[0], query_position=1)
    assert result.layers[0].same_head_dp.size == 0 and result.layers[0].diff_head_dp.size == 0
    assert any("has no keys to compare with" in w for w in result.warnings)
    close(result.layers[0].final_to_prev, result.layers[0].patterns[:, 1, :1].reshape(-1))
    assert resolve_query(np.zeros(5, bool), True, 0) == (0, "chosen")
    assert resolve_query(np.ones(3, bool), False) == (2, "the final token (every token is special)")


def test_a_query_with_no_keys_at_all_has_empty_read_outs_and_says_so(gpt2, llama, minilm):
    """The first token of a causal model, or a query whose every other key is special and left out, reads no key:
    an empty read-out and no KDE (its kernel sum once reshaped zero values and raised), on every route."""
    cases = [(gpt2, FIJI, {"query_position": 0}), (llama, FIJI, {"query_position": 1, "exclude_special_keys": True}),
             (minilm, "cat", {"exclude_special_keys": True})]  # [CLS] cat [SEP]: cat's only other keys are special
    for loaded, text, options in cases:
        result = analyze(loaded, text, layers=[0, 1], **options)
        for layer in result.layers.values():
            assert layer.final_to_prev.size == 0 and layer.kde is None and layer.same_head_dp.size == 0
        assert any("has no keys to compare with" in w for w in result.warnings)
    captured = capture(gpt2, FIJI, pattern_layers=[0], keep_patterns=True)  # the app: a click on the first token
    assert summarize(captured, gpt2.info.to_dict(), [0], query_position=0).layers[0].final_to_prev.size == 0
    three, long = analyze_batch(gpt2, ["the cat sat", FIJI], layers=[0], query_position=-3)  # -3: the first of three
    assert three.query == 0 and three.layers[0].final_to_prev.size == 0
    close(long.layers[0].final_to_prev, analyze(gpt2, FIJI, layers=[0], query_position=-3).layers[0].final_to_prev)


def test_exclude_bos_only_drops_a_special_first_token(gpt2, llama, minilm):
    for loaded, has_bos in ((gpt2, False), (llama, True), (minilm, True)):
        captured = capture(loaded, REPEATS, keep_patterns=True)
        on = summarize(captured, loaded.info.to_dict(), [0], exclude_bos=True)
        off = summarize(captured, loaded.info.to_dict(), [0], exclude_bos=False)
        assert on.bos_excluded is has_bos and off.bos_excluded is False and on.exclude_first_token is True
        expected = compute_head_scores(captured.patterns[0], captured.token_ids, exclude_bos=has_bos)
        # 1e-6: the pass divides by each row's exact sum, 1; compute_head_scores adds up the float32 weights
        close(on.head_scores["previous_token"][0], expected["previous_token"], 1e-6)
        # the statistics' switch is separate: the Q/K statistics drop position 0 either way
        np.testing.assert_array_equal(on.layers[0].q_means, off.layers[0].q_means)
        if not has_bos:
            np.testing.assert_array_equal(on.head_scores["previous_token"], off.head_scores["previous_token"])


def test_the_json_records_the_query_and_both_exclusions(minilm):
    result = analyze(minilm, FIJI, layers=[0], exclude_special_keys=True)
    data = json.loads(json.dumps(result.to_dict()))
    settings = data["settings"]
    assert settings["query_position"] == result.n_tokens - 2 and settings["query_token"] == result.query_token
    assert settings["query_choice"].startswith("the last non-special token")
    assert settings["exclude_special_keys"] is True and settings["exclude_bos"] is True
    assert settings["bos_excluded"] is True and settings["exclude_first_token"] is True
    again = AnalysisResult.from_dict(data)
    assert again.to_dict() == data
    for name in ("query_position", "query_token", "query_choice", "exclude_special_keys", "exclude_bos",
                 "bos_excluded"):  # a document from before issue 12: what its numbers meant then
        del settings[name]
    old = AnalysisResult.from_dict(data)
    assert old.query == old.n_tokens - 1 and old.exclude_special_keys is False
    assert old.exclude_bos is old.bos_excluded is True  # exclude_first_token was the head detector's exclude_bos


def test_half_precision_read_outs_and_head_scores_share_one_pattern(gpt2_path):
    """bfloat16: the read-outs and the head scores both come from the float32 rebuild of the model's q and k."""
    half = load_model(str(gpt2_path), dtype="bfloat16")
    result = analyze(half, REPEATS, layers=[6], keep_patterns=True)
    pattern = result.layers[6].patterns  # [head, q_pos, k_pos] float32: the rebuild
    assert pattern.dtype == np.float32
    p = result.query
    np.testing.assert_array_equal(result.layers[6].final_to_prev, pattern[:, p, :p].reshape(-1).astype(np.float64))
    np.testing.assert_array_equal(result.layers[6].first_self, pattern[:, 0, 0].astype(np.float64))
    expected = compute_head_scores(pattern, result.token_ids, exclude_bos=result.bos_excluded)
    for name, values in expected.items():
        np.testing.assert_allclose(result.head_scores[name][6], values, rtol=1e-6, atol=1e-9, err_msg=name)

"""The neuron view against the notebook's own q and k (c_attn hook) and the model's own eager attention."""

import numpy as np
import pytest
import torch

from analysis import HeadscopeError, load_model
from analysis.neuron import compute_neuron_view, neuron_view
from tests import checkpoints
from tests.conftest import FIJI, REPEATS
from tests.notebook import run_notebook

LAYER = 6


def _eager_rows(path, tokenizer, text, layer):
    """[head, q_pos, k_pos] of `layer` from a second copy of the checkpoint with the stock eager attention."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    return out.attentions[layer][0].numpy()


@pytest.mark.parametrize("head, query_pos, key_pos", [(0, -1, None), (5, 10, 3), (11, -1, 0)])
def test_bars_sum_to_the_notebooks_dot_product(gpt2, gpt2_path, head, query_pos, key_pos):
    view = neuron_view(gpt2, FIJI, LAYER, head, query_pos, key_pos)
    nb = run_notebook(gpt2.model, gpt2.tokenizer, FIJI, LAYER)
    q_nb = nb["Q_h"][head].double().numpy()  # [pos, d_head], the notebook's c_attn split
    k_nb = nb["K_h"][head].double().numpy()  # [pos, d_head]
    assert abs(view.products.sum() - view.dot) < 1e-5
    assert view.dot == pytest.approx(q_nb[view.query_pos] @ k_nb[view.key_pos], abs=1e-5)
    np.testing.assert_allclose(view.dots, k_nb @ q_nb[view.query_pos], atol=1e-5)
    np.testing.assert_allclose(view.products, q_nb[view.query_pos] * k_nb[view.key_pos], atol=1e-6)
    eager = _eager_rows(gpt2_path, gpt2.tokenizer, FIJI, LAYER)[head, view.query_pos]  # [k_pos]
    np.testing.assert_allclose(view.weights, eager, atol=1e-6)
    # the weights are the softmax of the scaled dot products over the keys the causal mask admits
    admitted = view.dots[: view.query_pos + 1] / np.sqrt(gpt2.info.d_head)
    softmax = np.exp(admitted - admitted.max()) / np.exp(admitted - admitted.max()).sum()
    np.testing.assert_allclose(view.weights[: view.query_pos + 1], softmax, atol=1e-6)
    assert (view.weights[view.query_pos + 1:] == 0).all()
    if key_pos is None:
        assert view.key_pos == int(np.argmax(eager))


def test_bars_are_sorted_by_magnitude(gpt2):
    view = neuron_view(gpt2, REPEATS, LAYER, 3)
    magnitudes = np.abs(view.products[view.order])
    assert (np.diff(magnitudes) <= 0).all() and sorted(view.order) == list(range(gpt2.info.d_head))
    data = view.to_dict()
    assert data["query_token"] == view.tokens[view.query_pos] and len(data["products"]) == gpt2.info.d_head


def test_grouped_query_head_reads_its_key_head_and_matches_eager(tmp_path):
    path = checkpoints.tiny_llama(tmp_path / "llama")
    llama = load_model(str(path))
    eager = _eager_rows(path, llama.tokenizer, REPEATS, 1)
    for head in range(llama.info.n_heads):
        view = neuron_view(llama, REPEATS, 1, head, -1, 2)
        assert view.kv_head == head // 4
        assert abs(view.products.sum() - view.dot) < 1e-5
        np.testing.assert_allclose(view.weights, eager[head, -1], atol=1e-6)


def test_pure_function_on_a_hand_built_pair():
    q = np.zeros((2, 3, 4), dtype=np.float32)  # [head, pos, d_head]
    k = np.zeros((1, 3, 4), dtype=np.float32)  # [kv_head, pos, d_head]
    q[1, 2] = [1, -2, 3, 0.5]
    k[0, 1] = [4, 1, -1, 2]
    view = compute_neuron_view(q, k, np.array([0.2, 0.7, 0.1]), head=1, query_pos=2)
    assert view.key_pos == 1 and view.kv_head == 0
    np.testing.assert_array_equal(view.products, [4, -2, -3, 1])
    assert view.dot == 0 and list(view.order) == [0, 2, 1, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"head": 12}, "Head 12 is out of range"),
    ({"query_pos": 500}, "Query position 500 is out of range"),
    ({"query_pos": 2, "key_pos": 5}, "comes after query position 2"),
])
def test_bad_positions_are_one_clear_error(gpt2, kwargs, message):
    args = {"head": 0, "query_pos": -1, "key_pos": None, **kwargs}
    with pytest.raises(HeadscopeError, match=message):
        neuron_view(gpt2, REPEATS, LAYER, **args)

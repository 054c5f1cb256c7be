"""Metrics on small synthetic tensors with named sizes and answers known by construction."""

import numpy as np
import pytest
import torch
from scipy import stats

from analysis.metrics import (
    compute_attention_summaries,
    compute_dot_products,
    compute_head_stats,
    compute_kde,
    compute_pattern,
    kde_grid,
    key_head_of,
)

N_HEADS, N_KV_HEADS, POS, D_HEAD = 8, 2, 6, 4


@pytest.fixture
def qk():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(N_HEADS, POS, D_HEAD)).astype(np.float32)  # [head, pos, d_head]
    k = rng.normal(size=(N_KV_HEADS, POS, D_HEAD)).astype(np.float32)  # [kv_head, pos, d_head]
    return q, k


def test_head_stats_are_torchs_unbiased_std_without_the_first_token(qk):
    q, _ = qk
    means, stds = compute_head_stats(q, exclude_first_token=True)
    torch_q = torch.from_numpy(q)
    np.testing.assert_allclose(means, [h[1:].mean().item() for h in torch_q], rtol=1e-6)
    np.testing.assert_allclose(stds, [h[1:].std().item() for h in torch_q], rtol=1e-6)
    means_all, _ = compute_head_stats(q, exclude_first_token=False)
    np.testing.assert_allclose(means_all, q.mean(axis=(1, 2)), rtol=1e-5)


def test_key_head_of_groups_query_heads():
    assert key_head_of(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert key_head_of(4, 4).tolist() == [0, 1, 2, 3]


def test_dot_products_follow_the_notebooks_loop_order_with_grouped_keys(qk):
    q, k = qk
    same, diff = compute_dot_products(q, k)
    expected_same, expected_diff = [], []
    for qi in range(N_HEADS):  # the notebook's loops, written out
        for ki in range(N_KV_HEADS):
            dp = q[qi, -1] @ k[ki, 1:-1].T
            (expected_same if ki == qi // (N_HEADS // N_KV_HEADS) else expected_diff).extend(dp)
    np.testing.assert_allclose(same, expected_same, rtol=1e-5)
    np.testing.assert_allclose(diff, expected_diff, rtol=1e-5)
    assert same.size == N_HEADS * (POS - 2)
    assert diff.size == N_HEADS * (N_KV_HEADS - 1) * (POS - 2)


def test_pattern_with_causal_mask_and_grouped_keys(qk):
    q, k = map(torch.from_numpy, qk)
    causal = torch.full((1, POS, POS), float("-inf")).triu(1)  # [1, q_pos, k_pos]
    pattern = compute_pattern(q, k, 0.5, causal)
    assert pattern.shape == (N_HEADS, POS, POS)
    assert torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(N_HEADS, POS))
    head = 5  # reads key head 1
    scores = (q[head] @ k[1].T) * 0.5 + causal[0]
    torch.testing.assert_close(pattern[head], torch.softmax(scores, -1))
    boolean = compute_pattern(q, k, 0.5, torch.ones(1, POS, POS, dtype=torch.bool).tril())
    torch.testing.assert_close(boolean, pattern)


def test_softcap_bounds_the_scores():
    q = torch.full((1, 2, 1), 100.0)
    k = torch.tensor([[[1.0], [-1.0]]])
    pattern = compute_pattern(q, k, 1.0, softcap=2.0)
    expected = torch.softmax(torch.tensor([2 * np.tanh(50), 2 * np.tanh(-50)]), -1)
    torch.testing.assert_close(pattern[0, 0], expected.float())


def test_summaries_on_a_hand_built_previous_token_pattern():
    pattern = np.zeros((2, POS, POS))  # [head, q_pos, k_pos]
    pattern[:, 0, 0] = 1.0
    for i in range(1, POS):
        pattern[:, i, i - 1] = 1.0
    out = compute_attention_summaries(pattern)
    assert out["first_self"].tolist() == [1.0, 1.0]
    assert out["self_attention"].tolist() == [0.0] * (2 * (POS - 1))
    assert out["final_to_prev"].tolist() == ([0.0] * (POS - 2) + [1.0]) * 2
    np.testing.assert_allclose(out["sink_mass"], [1 / (POS - 1)] * 2)


def test_kde_is_scipys_scott_kde_normalised_to_its_peak():
    values = np.array([0.1, 0.15, 0.2, 0.8, 0.82])
    grid = kde_grid()
    expected = stats.gaussian_kde(values)(grid)
    # float32 kernels
    np.testing.assert_allclose(compute_kde(values, grid), expected / expected.max(), rtol=0, atol=1e-6)
    assert grid.shape == (300,) and grid[0] == 0 and grid[-1] == 1
    assert compute_kde(np.array([0.5, 0.5]), grid) is None
    assert compute_kde(np.array([0.5]), grid) is None

"""Metrics on small synthetic tensors with named sizes and answers known by construction."""

import itertools

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
    capped, shifted, largest = compute_pattern(q, k, 0.5, causal, softcap=3.0, with_scores=True)
    for head in range(N_HEADS):  # each query head reads its own key head (4 query heads a key head)
        scores = (q[head] @ k[head // 4].T) * 0.5  # [q_pos, k_pos]
        torch.testing.assert_close(pattern[head], torch.softmax(scores + causal[0], -1))
        capped_scores = 3.0 * torch.tanh(scores / 3.0) + causal[0]  # [q_pos, k_pos]
        torch.testing.assert_close(capped[head], torch.softmax(capped_scores, -1))
        torch.testing.assert_close(shifted[head], capped_scores - capped_scores.amax(-1, keepdim=True))
        torch.testing.assert_close(largest[head], capped[head].amax(-1))
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


# ---- the device-side forms equal the numpy definitions (here on the CPU; the same code runs on a GPU) ---------------

def test_device_head_stats_and_dot_products_equal_numpy(qk, monkeypatch):
    from analysis import metrics
    from analysis.metrics import compute_centered_dot_products, compute_dot_products_t, compute_head_stats_t

    q, k = qk
    for exclude in (True, False):
        # both routes (a CPU's sum and norm, a GPU's std_mean), also where the mean is 100x the spread
        for by_norm, x in itertools.product((True, False), (q, k, (q + 100.0).astype(np.float32))):
            monkeypatch.setitem(metrics.HEAD_STATS_BY_NORM, "cpu", by_norm)
            means, stds = compute_head_stats(x, exclude)
            means_t, stds_t = compute_head_stats_t(torch.from_numpy(x), exclude)
            np.testing.assert_allclose(means_t.numpy(), means, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(stds_t.numpy(), stds, rtol=1e-10)
        same, diff = compute_dot_products(q, k, exclude)
        same_t, diff_t = compute_dot_products_t(torch.from_numpy(q), torch.from_numpy(k), exclude)
        np.testing.assert_allclose(same_t.numpy(), same, rtol=1e-12)
        np.testing.assert_allclose(diff_t.numpy(), diff, rtol=1e-12)
        same_c, diff_c = compute_centered_dot_products(q, k, exclude)
        same_ct, diff_ct = compute_dot_products_t(torch.from_numpy(q), torch.from_numpy(k), exclude, centered=True)
        np.testing.assert_allclose(same_ct.numpy(), same_c, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(diff_ct.numpy(), diff_c, rtol=1e-9, atol=1e-12)


def test_a_chosen_query_position_compares_it_with_the_keys_before_it(qk):
    from analysis.metrics import compared_keys, compute_dot_products_t

    q, k = qk
    assert compared_keys(POS) == (POS - 1, slice(1, POS - 1))
    assert compared_keys(POS, exclude_first_token=False, query_position=3) == (3, slice(0, 3))
    same, _ = compute_dot_products_t(torch.from_numpy(q), torch.from_numpy(k), True, query_position=3)
    expected = [q[h, 3].astype(np.float64) @ k[h // 4, pos].astype(np.float64) for h in range(N_HEADS)
                for pos in (1, 2)]
    np.testing.assert_allclose(same.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("n1, n2, ties", [(40, 300, False), (50, 200, True), (5, 30, False)])
def test_device_mannwhitney_equals_scipy(n1, n2, ties):
    from analysis.metrics import compute_mannwhitney, compute_mannwhitney_parts_t, mannwhitney_from_parts

    rng = np.random.default_rng(n1)
    same, diff = rng.normal(0.3, 1, n1), rng.normal(0, 1, n2)
    if ties:  # many equal values across and within the groups
        same, diff = np.round(same, 1), np.round(diff, 1)
    expected = stats.mannwhitneyu(same, diff, alternative="two-sided")
    p_ref, r_ref = compute_mannwhitney(same, diff)
    assert p_ref == pytest.approx(expected.pvalue, rel=1e-9)
    if n1 > 8:
        u1, tie_sum = compute_mannwhitney_parts_t(torch.from_numpy(same), torch.from_numpy(diff)).tolist()
        assert u1 == pytest.approx(expected.statistic, abs=1e-9)
        p, r = mannwhitney_from_parts(u1, tie_sum, n1, n2)
        assert p == pytest.approx(expected.pvalue, rel=1e-9) and r == pytest.approx(r_ref, abs=1e-12)


def test_device_kde_equals_scipy():
    from analysis.metrics import compute_kde_t

    rng = np.random.default_rng(3)
    values = rng.beta(0.5, 3, 5000)  # [n]: attention-like values piled near 0
    grid = kde_grid()
    expected = stats.gaussian_kde(values)(grid)
    for chunk in (777, None):  # several chunks, one chunk
        got = compute_kde_t(torch.from_numpy(values), torch.from_numpy(grid), chunk, numpy_on_cpu=False).numpy()
        np.testing.assert_allclose(got, expected / expected.max(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, compute_kde(values, grid), rtol=0, atol=1e-6)
    for numpy_on_cpu in (True, False):  # degenerate: NaN, which the host turns into None
        assert np.isnan(compute_kde_t(torch.tensor([0.5, 0.5]), torch.from_numpy(grid),
                                      numpy_on_cpu=numpy_on_cpu).numpy()).all()


@pytest.mark.parametrize("entropy_from_scores", [True, False])  # the CPU's route to the entropy, a GPU's
def test_pattern_reduction_in_blocks_of_one_row_equals_one_block(monkeypatch, entropy_from_scores):
    """The budget only decides the block size: a one-row block gives the same numbers as the whole pattern, and
    both equal head_scores' reduction of the whole pattern (entropy by xlogy), by either route to the entropy."""
    from analysis import patterns
    from analysis.head_scores import ScorePlan, compute_score_parts
    from analysis.patterns import reduce_pattern, rows_per_block

    monkeypatch.setitem(patterns.ENTROPY_FROM_SCORES, "cpu", entropy_from_scores)

    rng = np.random.default_rng(5)
    n = 9
    q = torch.from_numpy(rng.normal(size=(N_HEADS, n, D_HEAD)).astype(np.float32))  # [head, pos, d_head]
    k = torch.from_numpy(rng.normal(size=(N_KV_HEADS, n, D_HEAD)).astype(np.float32))  # [kv_head, pos, d_head]
    v = torch.from_numpy(rng.normal(size=(N_KV_HEADS, n, 3)).astype(np.float32))  # [kv_head, pos, d_v]
    mask = torch.ones(1, n, n, dtype=torch.bool).tril()  # [1, q_pos, k_pos]
    full = compute_pattern(q, k, 0.5, mask)  # [head, q_pos, k_pos]
    output = full @ v.repeat_interleave(N_HEADS // N_KV_HEADS, dim=0)  # [h, q, k] @ [h, k, d_v] -> [h, q, d_v]
    plan = ScorePlan.build(rng.integers(0, 4, n))
    assert rows_per_block(N_HEADS, n, budget=1) == 1 and rows_per_block(N_HEADS, n, budget=2**30) == n
    one = reduce_pattern(q[None], k[None], 0.5, mask, None, plan, budget=1, value=v[None], output=output[None],
                         keep=True)  # a stack of one layer
    whole = reduce_pattern(q[None], k[None], 0.5, mask, None, plan, budget=2**30, weights=full[None], keep=True)
    parts, fixed = compute_score_parts(full, plan)
    for reduced in (one, whole):
        np.testing.assert_allclose(reduced.parts[0].numpy(), parts.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(reduced.fixed[0].numpy(), fixed.numpy(), rtol=1e-6)
        np.testing.assert_allclose(reduced.pattern[0], full.numpy(), atol=1e-7)
        summaries = compute_attention_summaries(full.numpy())
        for name, values in summaries.items():
            np.testing.assert_allclose(reduced.readouts[name][0].numpy(), values, atol=1e-7)
        assert float(reduced.parity[0]) <= 1e-6
    wrong = reduce_pattern(q[None], k[None], 0.6, mask, None, plan, budget=1, value=v[None],
                           output=output[None])  # not the model's scale
    assert float(wrong.parity[0]) > 1e-3  # parity through the output notices a rebuild that is not the model's
    leaky = full.clone()  # [head, q_pos, k_pos]: a model that attended past the causal edge
    leaky[:, 0, -1] = 0.1
    leaked = reduce_pattern(q[None], k[None], 0.5, mask, None, plan, budget=1, weights=leaky[None])
    assert float(leaked.parity[0]) >= 0.1  # rows stop
    # at the causal edge (keys 0..stop-1 rebuilt), yet the model's weights beyond it are checked


def test_stacked_layers_reduce_as_each_alone_and_parity_names_the_layer():
    """Layers reduced as one [layer, ...] stack (capture's groups) give each layer's numbers alone, and parity is per
    layer: the model's weights wrong on one layer fail that layer only."""
    from analysis.head_scores import ScorePlan
    from analysis.patterns import reduce_pattern

    rng = np.random.default_rng(6)
    n, n_layers = 7, 3
    q = torch.from_numpy(rng.normal(size=(n_layers, N_HEADS, n, D_HEAD)).astype(np.float32))  # [l, h, pos, d]
    k = torch.from_numpy(rng.normal(size=(n_layers, N_KV_HEADS, n, D_HEAD)).astype(np.float32))  # [l, g, pos, d]
    mask = torch.ones(1, n, n, dtype=torch.bool).tril()  # [1, q_pos, k_pos]
    weights = torch.stack([compute_pattern(q[i], k[i], 0.5, mask) for i in range(n_layers)])  # [l, h, q_pos, k_pos]
    plan = ScorePlan.build(rng.integers(0, 4, n))
    wrong = weights.clone()
    wrong[1, 2, 4, 1] += 0.01  # layer 1, head 2, query 4, key 1
    for budget in (1, 2**30):  # one query row a block; one block
        stacked = reduce_pattern(q, k, 0.5, mask, None, plan, budget, weights=wrong, query_position=5, keep=True)
        for i in range(n_layers):
            alone = reduce_pattern(q[i:i + 1], k[i:i + 1], 0.5, mask, None, plan, budget, weights=weights[i:i + 1],
                                   query_position=5, keep=True)
            np.testing.assert_allclose(stacked.parts[i].numpy(), alone.parts[0].numpy(), rtol=1e-12)
            np.testing.assert_allclose(stacked.fixed[i].numpy(), alone.fixed[0].numpy(), rtol=1e-12)
            np.testing.assert_array_equal(stacked.pattern[i], alone.pattern[0])
            for name, values in alone.readouts.items():
                np.testing.assert_allclose(stacked.readouts[name][i].numpy(), values[0].numpy(), rtol=1e-12)
        assert stacked.parity[1] == pytest.approx(0.01, rel=1e-3)
        assert stacked.parity[0] <= 1e-6 and stacked.parity[2] <= 1e-6


@pytest.mark.parametrize("entropy_from_scores", [True, False])  # the CPU's route (the shift's row maxima), a GPU's
@pytest.mark.parametrize("budget", [1, 2**30])  # one query row a block; one block
def test_half_precision_parity_records_each_layers_largest_row_maximum(monkeypatch, entropy_from_scores, budget):
    """With q and k in half precision (the model's dtype) and something to check parity against, each layer gets
    score_max: the largest |row maximum| of its scaled scores over the keys the mask leaves, what the parity
    tolerance scales with; float32 q and k, or no parity, get none."""
    from analysis import patterns
    from analysis.head_scores import ScorePlan
    from analysis.patterns import reduce_pattern

    monkeypatch.setitem(patterns.ENTROPY_FROM_SCORES, "cpu", entropy_from_scores)
    rng = np.random.default_rng(7)
    n, n_layers, scaling = 9, 2, 0.5
    q = torch.from_numpy(rng.normal(size=(n_layers, N_HEADS, n, D_HEAD))).bfloat16()  # [l, h, pos, d]
    k = torch.from_numpy(rng.normal(size=(n_layers, N_KV_HEADS, n, D_HEAD))).bfloat16()  # [l, g, pos, d]
    k[1] = k[1].abs() + 1  # [g, pos, d]: layer 1's keys all positive, and its query row 3 all negative, so every
    q[1, :, 3] = -8  # score of that row is far below zero: the largest |row maximum| (not its even larger minimum)
    plan = ScorePlan.build(rng.integers(0, 4, n))
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # [q_pos, k_pos]
    expected = []
    for layer in range(n_layers):
        keys = k[layer].double().repeat_interleave(N_HEADS // N_KV_HEADS, dim=0)  # [head, pos, d]
        scores = q[layer].double() @ keys.transpose(-1, -2) * scaling  # [h, q, d] @ [h, d, k] -> [h, q, k]
        row_max = scores.masked_fill(~causal, -np.inf).amax(dim=-1)  # [head, q_pos]
        expected.append(row_max.abs().max().item())
    assert expected[1] > 2 * expected[0]  # layer 1's largest is that negative row's
    weights = torch.stack([compute_pattern(q[i].float(), k[i].float(), scaling, causal[None]) for i in range(n_layers)])
    for mask in (causal[None], None):  # the model's boolean mask; sdpa's causal flag (no mask)
        reduced = reduce_pattern(q, k, scaling, mask, None, plan, budget, weights=weights)
        np.testing.assert_allclose(reduced.score_max.numpy(), expected, rtol=1e-6)
        assert float(reduced.parity.max()) <= 1e-6
    assert reduce_pattern(q.float(), k.float(), scaling, None, None, plan, budget, weights=weights).score_max is None
    assert reduce_pattern(q, k, scaling, None, None, plan, budget).score_max is None  # no parity, nothing to scale


def test_kde_of_narrow_values_equals_scipy_and_rows_equal_single_curves():
    """Narrow values take the windowed route (only grid points within 12 bandwidths); an uneven grid the dense one."""
    from analysis.metrics import compute_kde_rows

    rng = np.random.default_rng(4)
    grid = kde_grid()
    rows = np.stack([np.abs(rng.normal(0, scale, 3000)) for scale in (1e-3, 1e-2, 0.3)])  # [curve, n]
    for values in rows:
        expected = stats.gaussian_kde(values)(grid)
        np.testing.assert_allclose(compute_kde(values, grid), expected / expected.max(), rtol=0, atol=1e-7)
    uneven = np.sort(rng.uniform(0, 1, 50))  # [grid]
    expected = stats.gaussian_kde(rows[0])(uneven)
    np.testing.assert_allclose(compute_kde(rows[0], uneven), expected / expected.max(), rtol=0, atol=1e-6)
    few = rng.normal(0.5, 0.1, 20)  # few values on an uneven grid: dense too (windows need even steps)
    uneven = np.sort(rng.uniform(0, 1, 300))  # [grid]
    expected = stats.gaussian_kde(few)(uneven)
    np.testing.assert_allclose(compute_kde(few, uneven), expected / expected.max(), rtol=0, atol=1e-6)
    batched = compute_kde_rows(np.concatenate([rows, np.full((1, 3000), 0.5)]), grid)  # [curve + 1, grid]
    for values, curve in zip(rows, batched):
        np.testing.assert_allclose(curve, compute_kde(values, grid), rtol=0, atol=1e-12)
    assert np.isnan(batched[-1]).all()  # all equal: degenerate


def test_the_windows_leave_out_under_the_tolerance_and_a_low_peak_is_summed_again(monkeypatch):
    """The host's windows reach c(n) bandwidths, where the kernels left out sum to under KDE_TOLERANCE of a peak of
    at least 1/2: the curves equal those of KDE_CUTOFF's wider windows to that tolerance, and scipy's. A curve whose
    peak is lower (values between grid points) is summed again at KDE_CUTOFF, so it is KDE_CUTOFF's curve exactly."""
    from analysis import metrics
    from analysis.metrics import KDE_CUTOFF, KDE_TOLERANCE, compute_kde_rows

    rng = np.random.default_rng(12)
    grid, step = kde_grid(), kde_grid()[1]
    rows = np.stack([np.abs(rng.normal(0, scale, 756)) for scale in (2e-3, 1e-2, 3e-2)]
                    + [grid[150] + step / 2 + rng.normal(0, step / 10, 756)])  # [curve, n]: the last peaks low
    cutoffs = []
    windowed = metrics._kde_windowed
    monkeypatch.setattr(metrics, "_kde_windowed", lambda *args: cutoffs.append(args[-1]) or windowed(*args))
    curves = compute_kde_rows(rows, grid)  # [curve, grid]
    assert cutoffs[0] == pytest.approx(np.sqrt(2 * np.log(2 * 756 / KDE_TOLERANCE))) and cutoffs[0] < 8
    assert cutoffs[1:] == [KDE_CUTOFF]  # the low peak's curve, again
    monkeypatch.setattr(metrics, "KDE_TOLERANCE", 1e-300)  # c(n) past KDE_CUTOFF: every window KDE_CUTOFF's
    wide = compute_kde_rows(rows, grid)
    np.testing.assert_allclose(curves[:3], wide[:3], rtol=0, atol=KDE_TOLERANCE)
    np.testing.assert_array_equal(curves[3], wide[3])
    for values, curve in zip(rows[:3], curves):
        expected = stats.gaussian_kde(values)(grid)
        np.testing.assert_allclose(curve, expected / expected.max(), rtol=0, atol=1e-7)


def test_dense_kde_far_from_the_grid_is_none_and_near_it_is_scipys():
    """Wide curves take the dense route, whose exponents are floored only for values within the grid: values far
    outside it underflow everywhere, as scipy's do, and draw no curve rather than the floor's flat line."""
    rng = np.random.default_rng(11)
    far = 5.0 + rng.normal(0, 0.05, 400)  # [n]: a bandwidth of ~0.015, 4.4 grid steps: dense
    assert not stats.gaussian_kde(far)(kde_grid()).any()
    assert compute_kde(far, kde_grid()) is None
    near = np.concatenate([far, rng.uniform(0, 1, 400)])  # half within the grid (so no floor): still scipy's
    expected = stats.gaussian_kde(near)(kde_grid())
    np.testing.assert_allclose(compute_kde(near, kde_grid()), expected / expected.max(), rtol=0, atol=1e-7)


def test_kde_between_grid_points_is_none_without_a_warning():
    """Values so narrow that every kernel underflows at every grid point (a random model's uniform attention at
    1024 tokens) draw no curve, as scipy's all-zero density would not, and print nothing (the CLI's stderr)."""
    import warnings

    from analysis.metrics import compute_kde_t

    values = 0.0015 + np.random.default_rng(9).normal(0, 1e-7, 1000)  # between grid points 0 and 1/299
    assert not stats.gaussian_kde(values)(kde_grid()).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_kde(values, kde_grid()) is None
        assert np.isnan(compute_kde_t(torch.from_numpy(values), kde_grid(), numpy_on_cpu=False).numpy()).all()


def test_device_kde_of_narrow_values_takes_the_window_and_equals_scipy(monkeypatch):
    """The torch route's windowed sums (the widest window under a third of the grid) equal scipy, each row of a batch
    equals its curve alone, a degenerate row stays NaN, and with the window forced off (dense) the curves agree."""
    from analysis import metrics
    from analysis.metrics import compute_kde_t

    rng = np.random.default_rng(8)
    grid = kde_grid()
    rows = np.stack([np.abs(rng.normal(0, scale, 3000)) for scale in (1e-3, 1e-2, 3e-2)] + [np.full(3000, 0.5)])
    windows = []
    windowed = metrics._kde_windowed_t

    def spy(values, bandwidth, start, step, n_grid, width):
        windows.append(width)
        return windowed(values, bandwidth, start, step, n_grid, width)

    monkeypatch.setattr(metrics, "_kde_windowed_t", spy)
    batched = compute_kde_t(torch.from_numpy(rows), grid, numpy_on_cpu=False).numpy()  # [curve, grid]
    assert len(windows) == 1 and 2 < windows[0] < grid.size / 3  # the batch's widest window: its widest curve's
    for values, curve in zip(rows[:3], batched):
        expected = stats.gaussian_kde(values)(grid)
        np.testing.assert_allclose(curve, expected / expected.max(), rtol=0, atol=1e-7)
        alone = compute_kde_t(torch.from_numpy(values), grid, numpy_on_cpu=False).numpy()
        np.testing.assert_allclose(curve, alone, rtol=0, atol=1e-12)
    assert np.isnan(batched[-1]).all()
    monkeypatch.setattr(metrics, "KDE_CUTOFF", 1e6)  # every window wider than the grid: the dense sums
    dense = compute_kde_t(torch.from_numpy(rows[:3]), grid, numpy_on_cpu=False).numpy()
    assert len(windows) == 4  # three single curves above, none here
    np.testing.assert_allclose(dense, batched[:3], rtol=0, atol=1e-7)


def test_both_dot_products_at_once_equal_two_calls(qk):
    from analysis.metrics import compute_both_dot_products_t, compute_dot_products_t

    q, k = torch.from_numpy(qk[0]), torch.from_numpy(qk[1])
    skip = np.zeros(q.shape[1], dtype=bool)
    skip[2] = True
    for kwargs in ({}, {"causal": False}, {"skip": skip}, {"query_position": 3}):
        for exclude in (True, False):
            both = compute_both_dot_products_t(q, k, exclude, **kwargs)
            for centered, found in zip((False, True), both):
                expected = compute_dot_products_t(q, k, exclude, centered=centered, **kwargs)
                for got, want in zip(found, expected):
                    assert got.shape == want.shape
                    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)

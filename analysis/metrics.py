"""The notebook's measurements as pure functions.

Shapes: q [head, pos, d_head], k [kv_head, pos, d_head], pattern [head, q_pos, k_pos]. Query head h
reads key head h // (H / G); for models without grouped-query attention G == H.

Two forms of each measurement: the numpy functions (`compute_head_stats`, `compute_dot_products`,
`compute_kde`, `compute_mannwhitney`, ...) are the readable definitions, and the `*_t` functions compute the
same numbers in torch on whatever device the tensors live on (the model's), batched over heads, so only
per-head results cross to the host. The tests hold the two forms equal.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from analysis.heads import key_head_of
from analysis.keys import compared_keys, query_keys  # noqa: F401  (torch-free, shared with reports)

KDE_POINTS = 300
KDE_CHUNK = 8192
KDE_CUTOFF = 12.0  # bandwidths: further away a kernel is below exp(-72) of its peak
# The host's windowed KDE leaves out the kernels further than c(n) = sqrt(2 ln(2n / KDE_TOLERANCE)) bandwidths from
# their value (7.5 for GPT-2's 756 values of 64 tokens, 7.7 for 3,060 at 256): together at most n exp(-c^2 / 2) =
# KDE_TOLERANCE / 2 at any grid point, within KDE_TOLERANCE of a curve whose peak is at least 1/2. A curve with a
# lower peak is summed again at KDE_CUTOFF. (Its float32 kernels are rounded at ~6e-8 of themselves anyway.)
KDE_TOLERANCE = 1e-9
KDE_DENSE_VALUES = 2048  # values of all curves per block of the CPU's dense kernels (~2.4 MiB on a 300-point
# grid; GPT-2's 64 tokens, 12 curves of 756 values: 4.9 ms against 5.2 ms for 3072 and 6.0 ms for 8192)
KDE_FLOOR = -87.0  # the lowest exponent of a dense float32 kernel (exp(-87) ~ 1.6e-38, float32's smallest normal)
# On the CPU the KDE and the Mann-Whitney test run as their numpy definitions (faster there than torch's small
# ops; the dense KDE's kernels alone are made by torch, _kde_dense_t); False runs the torch route a GPU runs, on the
# CPU too (the tests do, to hold it to the notebook).
NUMPY_ON_CPU = True
# The head statistics of q and k: on the CPU each from a sum and a vector norm, q and k apart (no pass that writes
# the squares, no copy that joins them: GPT-2's shape at 1024 tokens, 33 ms less of ~380); on a GPU one std_mean of
# both joined (one launch). benchmarks/op_count counts a GPU's route by setting "cpu" to the "cuda" value.
HEAD_STATS_BY_NORM = {"cpu": True, "cuda": False}


def compute_pattern(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None = None,
                    softcap: float | None = None, with_scores: bool = False, out: torch.Tensor | None = None,
                    with_max: bool = False):
    """softmax(q k^T * scaling + mask) per query head, in float32, as the model's eager attention does. The mask
    [1, q_pos, m] (additive or bool) covers the last m keys: all of them as a model's mask does, or fewer (the
    square of a causal block of rows, where every earlier key is seen: no pass over the rest).

    with_scores: (pattern, shifted scores, each row's largest weight) where the scores (scaled, soft-capped, masked)
    have their row maximum subtracted, so each row's entropy is -sum(p * shifted) - log(max p), with no log of the
    pattern (a tenth of xlogy's cost on the CPU; both terms are >= 0, so nothing cancels). A boolean mask masks
    with the dtype's lowest finite value, as transformers' eager masks do, so masked entries give p * score = 0.
    `out`: a [head, q_pos, k_pos] float32 tensor (a view, such as rows of a larger array) the pattern is written to.
    with_max: each row's largest score [head, q_pos] (scaled, soft-capped, masked: the dtype's lowest value for a row
    with no key) comes last as well, what analysis.parity's half-precision tolerance scales with; with_scores has
    it anyway (the shift), without it it costs one reduction over the scores.
    """
    n_heads, n_rows, n_kv, n_keys = q.shape[0], q.shape[1], k.shape[0], k.shape[-2]
    rep = n_heads // n_kv  # query heads per key head, consecutive
    # grouped-query attention: a key head's query heads in one product, so k is never repeated per query head
    groups = q if rep == 1 else q.reshape(n_kv, rep * n_rows, q.shape[-1])  # [kv_head, rep * q_pos, d_head]
    k_t = k.transpose(-1, -2)  # [kv_head, d_head, k_pos]
    if mask is not None:
        mask = additive_mask(mask, q.dtype)  # [1, q_pos, m]
    # a mask over every key is added in the product's epilogue (not to grouped rows, which it would have to repeat)
    whole = mask is not None and mask.shape[-1] == n_keys and not softcap and rep == 1
    if softcap:
        scores = torch.matmul(groups, k_t).mul_(scaling)  # [g, r*q, d] @ [g, d, k] -> [g, r*q, k]
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    else:  # scaled (and masked) in the product: beta=0 neither copies nor reads the bias
        bias = mask if whole else q.new_zeros(())  # [1, q_pos, k_pos] or a scalar
        scores = torch.baddbmm(bias.expand(groups.shape[0], groups.shape[1], n_keys), groups, k_t,
                               beta=1.0 if whole else 0.0, alpha=scaling)  # [g, r*q, d] @ [g, d, k] -> [g, r*q, k]
    scores = scores.view(n_heads, n_rows, n_keys)  # [head, q_pos, k_pos]
    if mask is not None and not whole:
        scores[..., n_keys - mask.shape[-1]:].add_(mask)  # [1, q_pos, m] over heads: the last m keys
    if not with_scores:
        top = scores.amax(dim=-1) if with_max else None  # [head, q_pos]: each row's largest score
        pattern = torch.softmax(scores, dim=-1, out=out)  # [head, q_pos, k_pos]
        return (pattern, top) if with_max else pattern
    top = scores.amax(dim=-1, keepdim=True)  # [head, q_pos, 1]: each row's largest score
    scores.sub_(top)  # [head, q_pos, k_pos]: <= 0, the row's maximum at 0
    pattern = torch.softmax(scores, dim=-1, out=out)  # [head, q_pos, k_pos]
    found = (pattern, scores, pattern.amax(dim=-1))  # ..., [head, q_pos]: each row's largest weight (amax: no indices)
    return (*found, top.squeeze(-1)) if with_max else found  # ..., [head, q_pos]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A mask as eager attention adds it, in `dtype`: a boolean one (True: attend) as 0 and the dtype's lowest finite
    value, as transformers' eager masks; an additive one as it is."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def compute_head_stats(x: np.ndarray, exclude_first_token: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per head mean and (unbiased, torch's default) std over positions and dimensions."""
    x = x[:, 1:] if exclude_first_token else x  # [head, pos, d_head]
    flat = x.reshape(x.shape[0], -1).astype(np.float64)  # [head, pos * d_head]
    if flat.shape[1] < 2:
        return np.empty(0), np.empty(0)
    return flat.mean(axis=1), flat.std(axis=1, ddof=1)


def compute_dot_products(q: np.ndarray, k: np.ndarray, exclude_first_token: bool = True, query_position: int = -1,
                         *, causal: bool = True, skip=None) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled q.k of the query (default the final one) with its keys (compared_keys): (same head, different heads).

    Ordered as the notebook's loops: query head outer, key head inner, key position innermost.
    """
    p, keys_at = compared_keys(q.shape[1], exclude_first_token, query_position, causal=causal, skip=skip)
    final_q = q[:, p].astype(np.float64)  # [head, d_head]
    keys = k[:, keys_at].astype(np.float64)  # [kv_head, k_pos, d_head]
    dots = np.einsum("hd,gkd->hgk", final_q, keys)  # [head, d] . [kv_head, k, d] -> [head, kv_head, k]
    same = key_head_of(q.shape[0], k.shape[0])[:, None] == np.arange(k.shape[0])[None, :]  # [head, kv_head]
    return dots[same].reshape(-1), dots[~same].reshape(-1)


def compute_attention_summaries(pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The notebook's softmax read-outs, concatenated head by head, plus the sink mass (copies, not views)."""
    return {
        "final_to_prev": pattern[:, -1, :-1].reshape(-1).copy(),  # final query to every earlier key
        "self_attention": np.diagonal(pattern[:, 1:, 1:], axis1=1, axis2=2).reshape(-1).copy(),  # [head * (pos-1)]
        "first_self": pattern[:, 0, 0].copy(),  # [head]
        "sink_mass": pattern[:, 1:, 0].mean(axis=1) if pattern.shape[1] > 1 else np.empty(0),  # [head]
    }


def compute_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """scipy's gaussian_kde (Scott's bandwidth) on `grid`, divided by its maximum; None if degenerate.

    Evaluated as one vectorised kernel sum: for 1-D data gaussian_kde's bandwidth is
    std(values, ddof=1) * n ** (-1/5), and the normalising constant cancels in the division by the maximum.
    Kernels in float32, sums in float64: within ~1e-7 of scipy, at a fifth of the float64 cost. On an evenly
    spaced grid (kde_grid) each value only visits the grid points within c(n) bandwidths of it (when that is under a
    third of the grid): the kernels left out sum to under KDE_TOLERANCE of the curve's peak, far under float32's
    rounding.
    """
    [curve] = compute_kde_rows(np.asarray(values, dtype=np.float64).reshape(1, -1), grid)
    return None if np.isnan(curve).any() else curve


def compute_kde_rows(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """compute_kde of each row of values [curve, n] at once: [curve, grid] float64, a row of NaN where degenerate
    (fewer than 2 values, or all equal)."""
    values = np.asarray(values, dtype=np.float64)  # [curve, n]
    n_curves, n = values.shape
    out = np.full((n_curves, grid.size), np.nan)  # [curve, grid]
    live = (np.ptp(values, axis=1) > 0) if n >= 2 else np.zeros(n_curves, dtype=bool)  # [curve]
    if not live.any():
        return out
    values = values[live]  # [live, n]
    bandwidth = values.std(axis=1, ddof=1) * n ** (-1 / 5)  # [live]
    step = _even_step(grid)  # None: an uneven grid, every curve dense
    density = np.zeros((values.shape[0], grid.size))  # [live, grid]
    narrow = np.zeros(values.shape[0], dtype=bool)  # [live]: summed in windows of grid points
    if step is not None:
        cutoff = min(KDE_CUTOFF, math.sqrt(2 * math.log(2 * n / KDE_TOLERANCE)))  # bandwidths: c(n)
        narrow = _kde_windows(values, grid, bandwidth, step, cutoff, np.ones_like(narrow), density)
        # a curve whose peak is under 1/2 may have lost more than KDE_TOLERANCE of it there: again at KDE_CUTOFF
        low = narrow & (n * math.exp(-cutoff ** 2 / 2) > KDE_TOLERANCE * density.max(axis=1))  # [live]
        if cutoff < KDE_CUTOFF and low.any():
            narrow = (narrow & ~low) | _kde_windows(values, grid, bandwidth, step, KDE_CUTOFF, low, density)
    if not narrow.all():
        wide = ~narrow  # [live]
        # on the CPU torch makes the kernels on every core (its exp is ~4x numpy's there), in blocks of
        # KDE_DENSE_VALUES values over all curves; the exponents floored where that cannot move a curve
        inside = bool(((values[wide] >= grid[0]) & (values[wide] <= grid[-1])).all())  # every value within the grid
        chunk = max(1, KDE_DENSE_VALUES // int(wide.sum()))
        density[wide] = _kde_dense_t(torch.from_numpy(values[wide]), torch.from_numpy(grid),
                                     torch.from_numpy(bandwidth[wide, None]), chunk,
                                     floor=KDE_FLOOR if inside and step is not None else None).numpy()  # [wide, grid]
    with np.errstate(invalid="ignore"):  # every kernel below float32's range at every grid point: 0/0, NaN, no curve
        out[live] = density / density.max(axis=1, keepdims=True)
    return out


def _kde_windows(values, grid, bandwidth, step, cutoff: float, chosen: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Of the `chosen` curves [live] bool, those whose window of `cutoff` bandwidths each side spans under a third
    of the grid (its gathers cost ~3x a dense kernel) are summed by _kde_windowed into `density` [live, grid];
    returns which ones [live] bool."""
    widths = np.ceil(2 * cutoff * bandwidth / step).astype(np.int64) + 2  # [live]: grid points a value visits
    done = chosen & (3 * widths < grid.size)  # [live]
    if done.any():
        density[done] = _kde_windowed(values[done], grid, bandwidth[done], step, widths[done], cutoff)  # [done, grid]
    return done


def _kde_windowed(values, grid, bandwidth, step, widths, cutoff: float = KDE_CUTOFF) -> np.ndarray:
    """The kernel sums of compute_kde_rows on an evenly spaced grid, each value visiting only the grid points from
    the first one within `cutoff` bandwidths below it (`widths` [curve] of them): [curve, grid] float64, not
    normalised. The distances come from the value's offset to that first point plus whole grid steps (float64,
    then float32 kernels), and the values that share a first point are summed before they are spread on the grid."""
    n_curves, n = values.shape
    n_grid = grid.size
    density = np.zeros((n_curves, n_grid))  # [curve, grid]
    for curve, (row, h, width) in enumerate(zip(values, bandwidth, widths)):
        row = np.sort(row)  # [n]: the sum does not depend on the order; sorted, equal first points are adjacent
        first = np.clip(np.floor((row - cutoff * h - grid[0]) / step), -width, n_grid).astype(np.int64)  # [n]
        base = (grid[0] + first * step - row) / h  # [n]: from the value to its first grid point, in bandwidths
        starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])  # [group]: runs of one first point
        total = np.zeros((starts.size, width))  # [group, width]
        chunk = max(1, KDE_CHUNK * KDE_POINTS // width)  # bounded memory: one [chunk, width] block at a time
        steps = np.arange(width) * (step / h)  # [width]
        for start in range(0, n, chunk):
            z = np.empty((min(chunk, n - start), width), dtype=np.float32)  # [chunk, width]
            np.add(base[start:start + chunk, None], steps, out=z, casting="same_kind")  # summed in float64, rounded
            # to float32 as it is written (no float64 block)
            np.square(z, out=z)
            z *= -0.5
            np.exp(z, out=z)  # float32 kernels, summed in float64
            here = starts[(starts >= start) & (starts < start + chunk)] - start  # [group in chunk]
            if here.size == 0 or here[0] != 0:  # the chunk continues the previous chunk's last group
                here = np.r_[0, here]
            sums = np.add.reduceat(z, here, axis=0, dtype=np.float64)  # [group in chunk, width]
            groups = np.searchsorted(starts, start + here, side="right") - 1  # [group in chunk]: distinct
            total[groups] += sums
        index = first[starts][:, None] + np.arange(width) + width  # [group, width]: in grid + a margin each side
        spread = np.bincount(index.reshape(-1), weights=total.reshape(-1), minlength=n_grid + 2 * width)
        density[curve] = spread[width:width + n_grid]
    return density


def kde_grid() -> np.ndarray:
    return np.linspace(0, 1, KDE_POINTS)


# ---- the notebook's same-head vs different-head comparison as a statistic -----------------------------------------

def compute_centered_dot_products(q: np.ndarray, k: np.ndarray, exclude_first_token: bool = True,
                                  dots: tuple[np.ndarray, np.ndarray] | None = None, query_position: int = -1, *,
                                  causal: bool = True, skip=None) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's dot products with each key head's mean key (over the compared positions) removed.

    Adding one vector c to every key adds q.c to every score of a query row, and softmax ignores a constant
    added to a whole row: the mean key changes no attention weight. Yet q.mean_key is usually most of the raw
    dot product, so comparing raw same-head and different-head means mostly compares that constant. After
    centering, each (query head, key head) group of dot products has mean zero and what remains, the spread
    across keys, is what decides where the final token attends.

    `dots`: the raw (same, diff) of compute_dot_products, if already computed; q.(k - mean) = q.k - q.mean.
    """
    p, keys_at = compared_keys(q.shape[1], exclude_first_token, query_position, causal=causal, skip=skip)
    compared = k[:, keys_at]  # [kv_head, k_pos, d_head]: the keys compute_dot_products uses
    if compared.shape[1] == 0:
        return np.empty(0), np.empty(0)
    if dots is None:
        dots = compute_dot_products(q, k, exclude_first_token, query_position, causal=causal, skip=skip)
    mean_key = compared.mean(axis=1, dtype=np.float64)  # [kv_head, d_head]
    offset = q[:, p].astype(np.float64) @ mean_key.T  # [head, d] @ [d, kv_head] -> [head, kv_head]
    return center_dot_products(*dots, offset)


def center_dot_products(same: np.ndarray, diff: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw (same [head * k_pos], diff [head * (kv_head - 1) * k_pos]) less each (query head, key head) group's
    offset [head, kv_head], q.mean_key: the centered dot products in the same order. The device sends the raw ones
    and the offsets, and the host centers them here with the device's own float64 subtraction (bit for bit the
    numbers compute_both_dot_products_t made there, at half the bytes to copy)."""
    n_heads, n_kv = offset.shape
    n_keys = same.size // n_heads if n_heads else 0
    if n_keys < 2:  # q.(k - mean_key) is exactly 0 for a single key (compute_both_dot_products_t)
        return np.zeros_like(same), np.zeros_like(diff)
    own = key_head_of(n_heads, n_kv)[:, None] == np.arange(n_kv)[None, :]  # [head, kv_head]
    same = same.reshape(n_heads, n_keys) - offset[own][:, None]  # [head, k_pos]
    diff = diff.reshape(n_heads, n_kv - 1, n_keys) - offset[~own].reshape(n_heads, n_kv - 1)[..., None]  # [h, g-1, k]
    return same.reshape(-1), diff.reshape(-1)


def compute_mannwhitney(same: np.ndarray, diff: np.ndarray) -> tuple[float | None, float | None]:
    """Two-sided Mann-Whitney U p-value and rank-biserial effect size r = 2U/(n1 n2) - 1 of same vs diff.

    r > 0: same-head dot products tend to exceed different-head ones (r = 1: every one does). None where
    either group is empty (fewer than 3 tokens, or a single key head). Equal to scipy.stats.mannwhitneyu
    (method "auto", two-sided, continuity correction): scipy itself for small groups (its exact test), and
    for groups of more than 8 its normal approximation with tie correction computed from one sort, several
    times faster than scipy's general ranking on the tens of thousands of values a layer gives.
    """
    same, diff = np.asarray(same, dtype=np.float64), np.asarray(diff, dtype=np.float64)
    n1, n2 = same.size, diff.size
    if n1 == 0 or n2 == 0:
        return None, None
    if n1 <= 8 or n2 <= 8:
        from scipy.stats import mannwhitneyu

        result = mannwhitneyu(same, diff, alternative="two-sided")
        u1, p = float(result.statistic), float(result.pvalue)
    else:
        pooled = np.sort(np.concatenate([same, diff]))  # [n]
        same = np.sort(same)  # [n1]: U sums over them, so their order is free; sorted, the lookups run in order
        below = np.searchsorted(pooled, same, side="left")  # [n1]: values smaller than each same-head value
        new_run = pooled[1:] != pooled[:-1]  # [n - 1]: where a run of equal values ends
        if new_run.all():  # no ties (the usual case for float64 dot products): each rank is below + 1
            u1, tie_sum = float(below.sum() + n1 - n1 * (n1 + 1) / 2), 0.0
        else:
            upto = np.searchsorted(pooled, same, side="right")  # [n1]: values smaller or equal
            u1 = float((below + upto + 1).sum() / 2 - n1 * (n1 + 1) / 2)  # average 1-based ranks, less their minimum
            bounds = np.concatenate([[0], np.flatnonzero(new_run) + 1, [pooled.size]])
            ties = np.diff(bounds).astype(np.float64)  # [group]: size of each run of equal values
            tie_sum = float((ties ** 3 - ties).sum())
        return mannwhitney_from_parts(u1, tie_sum, n1, n2)
    r = 2.0 * u1 / (n1 * n2) - 1.0
    return (p if np.isfinite(p) else None), (r if np.isfinite(r) else None)


# ---- the same measurements in torch, on the tensors' own device (the model's), batched over heads ----------------

def compute_head_stats_t(x: torch.Tensor, exclude_first_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """As compute_head_stats, in torch on x's device: x [..., head, pos, d_head] -> (mean, std) [..., head] float64
    (leading dims batched, e.g. [layer]); ([..., 0], [..., 0]) when fewer than 2 values."""
    x = x[..., 1:, :] if exclude_first_token else x  # [..., head, pos, d_head], a view
    if x.shape[-2] * x.shape[-1] < 2:
        empty = x.new_empty((*x.shape[:-3], 0), dtype=torch.float64)  # [..., 0]
        return empty, empty
    flat = x.to(torch.float64, memory_format=torch.contiguous_format).reshape(*x.shape[:-2], -1)  # [..., head,
    # pos * d_head]: one copy (x is a strided view of the model's projection, whose order .double() would keep, so
    # that the reshape copied it again: 124 against 51 us a GPT-2 layer's q at 256 tokens)
    if not HEAD_STATS_BY_NORM[device_kind(flat.device)]:  # one launch on a GPU
        std, mean = torch.std_mean(flat, dim=-1, correction=1)  # [..., head] each
        return mean, std
    # One pass for the sum and one for the sum of squares (a norm: no pass that writes the squares), with a row's
    # result the same whatever the leading dims: ~15x faster than the two passes of numpy's form on the CPU. The
    # model's values and their squares are exact in float64, so the one-pass variance loses only
    # ~(mean / std)^2 * 1e-16 of itself to the subtraction.
    n = flat.shape[-1]
    total = flat.sum(dim=-1)  # [..., head]
    squares = torch.linalg.vector_norm(flat, dim=-1).square_()  # [..., head]: sum of x^2
    mean = total / n  # [..., head]
    var = (squares - total * mean).div_(n - 1).clamp_(min=0)  # [..., head]: unbiased, as numpy's ddof=1
    return mean, var.sqrt_()


def device_kind(device) -> str:
    """The key of the per-device settings (capture's budgets, TEXTS_AT_ONCE, corpus.READ_AHEAD, ...): "cuda" for a
    GPU, "cpu" for the rest."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def to_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (numpy or a list) as a tensor on `device`. Off the CPU through page-locked memory, without
    waiting: a pageable copy waits for every operation queued on the device, so each of a pass's plans drained the
    GPU's queue."""
    host = torch.as_tensor(np.asarray(values), dtype=dtype)
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _head_index(n_heads: int, n_kv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query heads [head], each one's key head [head], its other key heads [head, kv_head - 1]) on the device,
    made once per shape and device rather than copied to the device at every layer."""
    own = key_head_of(n_heads, n_kv)  # [head]
    others = np.array([[g for g in range(n_kv) if g != own[h]] for h in range(n_heads)],
                      dtype=np.int64).reshape(n_heads, n_kv - 1)  # [head, kv_head - 1]: [head, 0] for one key head
    return (torch.arange(n_heads, device=device), torch.as_tensor(own, device=device),
            torch.as_tensor(others, device=device))


def _query_and_keys(q: torch.Tensor, k: torch.Tensor, exclude_first_token: bool, query_position: int, causal: bool,
                    skip) -> tuple[torch.Tensor, torch.Tensor]:
    """The query row and its compared keys (compared_keys) in float64: [..., head, d_head], [..., kv_head, k_pos,
    d_head] of q [..., head, pos, d_head] and k [..., kv_head, pos, d_head]."""
    p, keys_at = compared_keys(q.shape[-2], exclude_first_token, query_position, causal=causal, skip=skip)
    if not isinstance(keys_at, slice):
        keys_at = to_device(keys_at, k.device)  # [k_pos] index
    final_q = q[..., p, :].double()  # [..., head, d_head]
    keys = k[..., keys_at, :].double()  # [..., kv_head, k_pos, d_head]
    return final_q, keys


def compute_dot_products_t(q: torch.Tensor, k: torch.Tensor, exclude_first_token: bool = True,
                           query_position: int = -1, centered: bool = False, *, causal: bool = True,
                           skip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """As compute_dot_products (centered=False) or compute_centered_dot_products (True), in float64 on the
    tensors' device: (same [..., head * keys], diff [..., head * (kv_head - 1) * keys]) in the notebook's loop
    order, for q [..., head, pos, d_head] and k [..., kv_head, pos, d_head] (leading dims batched, e.g. [layer]).
    The query at `query_position`, its keys as compared_keys(causal=, skip=) says."""
    final_q, keys = _query_and_keys(q, k, exclude_first_token, query_position, causal, skip)
    if centered and keys.shape[-2]:  # q . (k - mean k): exactly 0 for a single key, where q.k - q.mean is noise
        keys = keys - keys.mean(dim=-2, keepdim=True)  # [..., kv_head, k_pos, d_head]
    dots = torch.einsum("...hd,...gkd->...hgk", final_q, keys)  # [.., head, d] . [.., g, k, d] -> [.., head, g, k]
    return _same_and_diff(dots)


def compute_both_dot_products_t(q: torch.Tensor, k: torch.Tensor, exclude_first_token: bool = True,
                                query_position: int = -1, *, causal: bool = True,
                                skip=None) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """compute_dot_products_t's raw and centered results, ((same, diff), (same, diff)), from one product of the
    query with its keys: the centered ones are q.k - q.mean_key, as compute_centered_dot_products takes them (the
    same numbers to rounding as q.(k - mean_key), with one product over the keys instead of two)."""
    (same, diff), offset = compute_dot_products_offset_t(q, k, exclude_first_token, query_position, causal=causal,
                                                         skip=skip)
    return (same, diff), _center_t(same, diff, offset)


def compute_dot_products_offset_t(q: torch.Tensor, k: torch.Tensor, exclude_first_token: bool = True,
                                  query_position: int = -1, *, causal: bool = True,
                                  skip=None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((same, diff), offset): compute_dot_products_t's raw dot products and each (query head, key head) group's
    offset q.mean_key [..., head, kv_head] float64, which center_dot_products (host) and _center_t (device)
    subtract, the same float64 operation on either side."""
    final_q, keys = _query_and_keys(q, k, exclude_first_token, query_position, causal, skip)
    raw = torch.einsum("...hd,...gkd->...hgk", final_q, keys)  # [.., head, d] . [.., g, k, d] -> [.., head, g, k]
    if keys.shape[-2]:
        offset = torch.einsum("...hd,...gd->...hg", final_q, keys.mean(dim=-2))  # [.., h, d] . [.., g, d] -> [.., h, g]
    else:  # no key: nothing to center
        offset = raw.new_zeros(raw.shape[:-1])  # [..., head, kv_head]
    return _same_and_diff(raw), offset


def _center_t(same: torch.Tensor, diff: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """center_dot_products on the device, for leading dims too: same [..., head * k], diff [..., head * (g-1) * k],
    offset [..., head, kv_head]."""
    lead, (n_heads, n_kv) = offset.shape[:-2], offset.shape[-2:]
    n_keys = same.shape[-1] // n_heads if n_heads else 0
    if n_keys < 2:  # q.(k - mean_key) is exactly 0 for a single key, where q.k - q.mean_key would be rounding noise
        return torch.zeros_like(same), torch.zeros_like(diff)
    heads, own, others = _head_index(n_heads, n_kv, offset.device)  # [head], [head], [head, g - 1]
    same = same.view(*lead, n_heads, n_keys) - offset[..., heads, own][..., None]  # [..., head, k]
    others = offset[..., heads[:, None], others]  # [..., head, kv_head - 1]: each query head's other key heads
    diff = diff.view(*lead, n_heads, n_kv - 1, n_keys) - others[..., None]  # [..., head, kv_head - 1, k]
    return same.flatten(-2), diff.flatten(-3)


def _same_and_diff(dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dots [..., head, kv_head, k] -> (each query head with its own key head [..., head * k], with the others
    [..., head * (kv_head - 1) * k]), in the notebook's loop order."""
    heads, own, others = _head_index(dots.shape[-3], dots.shape[-2], dots.device)  # [head], [head], [head, g - 1]
    same = dots[..., heads, own, :]  # [..., head, k]: index tensors, no device sync
    diff = dots[..., heads[:, None], others, :]  # [..., head, kv_head - 1, k]
    return same.flatten(-2), diff.flatten(-3)


def compute_mannwhitney_parts_t(same: torch.Tensor, diff: torch.Tensor, padded: bool = False) -> torch.Tensor:
    """The Mann-Whitney U of same vs diff and its tie term sum(t^3 - t), from one sort on the device: [..., 2]
    float64 for same [..., n1] and diff [..., n2] (leading dims batched, e.g. [layer]: one sort for all layers).
    `padded`: +inf values are padding, left out (rows of different lengths in one tensor: analysis.batched).

    compute_mannwhitney's large-sample route, split so the device does the sorting and ranking and the host
    only turns two numbers into a p-value (mannwhitney_from_parts)."""
    same = same.contiguous()  # [..., n1]
    pooled = torch.sort(torch.cat([same, diff], dim=-1), dim=-1).values  # [..., n]: padding sorts last
    below = torch.searchsorted(pooled, same, right=False)  # [..., n1]: values smaller than each same-head value
    upto = torch.searchsorted(pooled, same, right=True)  # [..., n1]: values smaller or equal
    ranks = below + upto + 1  # [..., n1]: twice each value's average 1-based rank
    # each value's run of equal values has t = (equal or smaller) - (smaller) members; summing t^2 - 1 over the
    # values sums t (t^2 - 1) = t^3 - t over the runs, with no device sync (unlike unique_consecutive)
    runs = torch.searchsorted(pooled, pooled, right=True).sub_(torch.searchsorted(pooled, pooled))  # [..., n]
    ties = runs.double().square_().sub_(1)  # [..., n]
    del runs
    if padded:  # padding ranks above every value, so the values' ranks stand; only its own terms go
        n1 = torch.isfinite(same).sum(dim=-1).double()  # [...]
        ranks, ties = ranks.masked_fill(same == torch.inf, 0), ties.masked_fill_(pooled == torch.inf, 0)
    else:
        n1 = same.shape[-1]
    u1 = ranks.sum(dim=-1).double() / 2 - n1 * (n1 + 1) / 2  # [...]: average 1-based ranks, less their minimum
    return torch.stack([u1, ties.sum(dim=-1)], dim=-1)  # [..., 2]


def mannwhitney_from_parts(u1: float, tie_sum: float, n1: int, n2: int) -> tuple[float | None, float | None]:
    """Two-sided p (normal approximation, tie and continuity corrected, as scipy's) and rank-biserial r."""
    from scipy.special import ndtr

    n = n1 + n2
    spread = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_sum / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (max(u1, n1 * n2 - u1) - n1 * n2 / 2 - 0.5) / spread
    p = float(np.clip(2 * ndtr(-z), 0.0, 1.0))
    r = rank_biserial(u1, n1, n2)
    return (p if np.isfinite(p) else None), (r if np.isfinite(r) else None)


def rank_biserial(u1: float, n1: int, n2: int) -> float:
    """The rank-biserial effect size r = 2U/(n1 n2) - 1 of a Mann-Whitney U (n1, n2 >= 1)."""
    return 2.0 * u1 / (n1 * n2) - 1.0


def compute_kde_t(values: torch.Tensor, grid, chunk: int | None = None,
                  numpy_on_cpu: bool | None = None) -> torch.Tensor:
    """As compute_kde, on values' device, for values [..., n] (leading dims batched, e.g. [layer, curve]: one
    kernel sum for all of them): [..., grid] float64, each curve normalised to its peak, all NaN where degenerate
    (fewer than 2 values, or all equal): the host turns that into None. `grid`: numpy or a tensor ([grid]; numpy
    spares a device its copy back to check the spacing). On the CPU it is compute_kde itself unless
    numpy_on_cpu=False (the tests run the torch route there too).

    On an evenly spaced grid, where every window of KDE_CUTOFF bandwidths spans under a third of it, each value
    visits only the grid points of the widest such window (_kde_windowed_t): that width decides the shapes, so
    it is read on the host (the one device sync), and the traffic is the values times the window, not times
    the grid (on the Llama shape at 1024 tokens, ~11 GiB of dense kernel sums). Else a dense kernel sum."""
    host_grid = grid if isinstance(grid, np.ndarray) else grid.cpu().numpy()  # [grid]
    values = values.double()  # [..., n]
    lead, n = values.shape[:-1], values.shape[-1]
    if n < 2:  # no curve (a query with no keys has none at all)
        return torch.full((*lead, host_grid.size), float("nan"), dtype=torch.float64, device=values.device)
    if (NUMPY_ON_CPU if numpy_on_cpu is None else numpy_on_cpu) and values.device.type == "cpu":
        curves = compute_kde_rows(values.reshape(-1, n).numpy(), np.asarray(host_grid, dtype=np.float64))
        return torch.from_numpy(curves).reshape(*lead, host_grid.size)  # [..., grid]
    grid = torch.as_tensor(host_grid, dtype=torch.float64, device=values.device)  # [grid]
    bandwidth = values.std(dim=-1, correction=1, keepdim=True) * n ** (-1 / 5)  # [..., 1]
    degenerate = (values.amax(dim=-1) == values.amin(dim=-1))[..., None]  # [..., 1] bool
    step = _even_step(host_grid)
    width = None
    if step:  # the widest window, on the host; a degenerate curve (bandwidth 0) spans nothing
        widest = torch.where(degenerate, 0.0, bandwidth).amax()
        width = math.ceil(2 * KDE_CUTOFF * float(widest) / step) + 2
    if width is not None and 3 * width < host_grid.size:
        density = _kde_windowed_t(values.reshape(-1, n), bandwidth.reshape(-1, 1), float(host_grid[0]), step,
                                  host_grid.size, width).reshape(*lead, host_grid.size)  # [..., grid]
    else:
        density = _kde_dense_t(values, grid, bandwidth, chunk)  # [..., grid]
    return torch.where(degenerate, torch.full_like(density, float("nan")),
                       density / density.amax(dim=-1, keepdim=True))  # [..., grid]


def _kde_values(device: torch.device) -> int:
    """Values whose kernels at every grid point one dense block of the torch KDE holds, all curves together."""
    return KDE_CHUNK if device.type == "cpu" else 2**17


def _even_step(grid: np.ndarray) -> float | None:
    """The spacing of an evenly spaced grid (kde_grid's), else None."""
    step = (grid[-1] - grid[0]) / (grid.size - 1) if grid.size > 1 else 0.0
    return float(step) if step > 0 and np.allclose(np.diff(grid), step, rtol=1e-9, atol=0) else None


def _kde_dense_t(values: torch.Tensor, grid: torch.Tensor, bandwidth: torch.Tensor, chunk: int | None,
                 floor: float | None = None) -> torch.Tensor:
    """Every value's kernel at every grid point: [..., grid] float64 sums, not normalised.

    `floor`: the lowest exponent (KDE_FLOOR; None: none). The exp of a smaller one is a subnormal number or 0, up to
    ~170x slower for torch to make on the CPU. compute_kde_rows floors only values within an even grid, whose dense
    curves have a bandwidth of at least 4 grid steps (else they are narrow): every value then has a grid point where
    its kernel is above 0.99, so the peak is at least that and the floor adds at most n * exp(KDE_FLOOR) ~ n * 1.6e-38
    to any point. (Values far outside the grid, whose every kernel there underflows, would otherwise draw the
    floor's flat line instead of no curve.)"""
    lead, n = values.shape[:-1], values.shape[-1]
    scaled_grid = (grid / bandwidth).float()  # [..., grid]
    scaled = (values / bandwidth).float()  # [..., n]
    density = torch.zeros(scaled_grid.shape, dtype=torch.float64, device=values.device)  # [..., grid]
    if chunk is None:  # a GPU takes [300, 131072] float32 (150 MiB) in one go, shared by the curves
        chunk = max(1, _kde_values(values.device) // max(1, math.prod(lead)))
    for start in range(0, n, chunk):  # bounded memory: one [..., grid, chunk] float32 block at a time
        z = scaled_grid[..., :, None] - scaled[..., None, start:start + chunk]  # [..., grid, chunk]
        z.square_().mul_(-0.5)
        if floor is not None:
            z.clamp_(min=floor)
        density += z.exp_().sum(dim=-1, dtype=torch.float64)  # float32 kernels, f64 sums
    return density


def _kde_windowed_t(values: torch.Tensor, bandwidth: torch.Tensor, start: float, step: float, n_grid: int,
                    width: int) -> torch.Tensor:
    """_kde_windowed's sums in torch: values [curve, n] float64, bandwidth [curve, 1], an even grid of n_grid
    points from `start` by `step`; each value visits the `width` grid points from the first one within
    KDE_CUTOFF bandwidths below it. [curve, grid] float64, not normalised.

    Deterministic (no scatter, whose float64 atomics would sum in a different order at every run): sorted,
    the values that share a first grid point are contiguous, so each (first point, offset) sum is a difference
    of prefix sums; a grid point adds its `width` offsets' sums."""
    n_curves, n = values.shape
    device = values.device
    offsets = torch.arange(width, device=device)  # [width]
    points = torch.arange(-width, n_grid + 1, device=device)  # [J]: every first point a value can have
    # a grid point g gathers offset w from first point g - w, at index g - w + width of `points`
    at = torch.arange(n_grid, device=device)[:, None] - offsets[None, :] + width  # [grid, width]
    out = []
    # bounded memory: [curves, width, n] blocks of float32 kernels and float64 prefix sums, a quarter of the dense
    # route's [grid, values] elements (~110 MiB on a GPU)
    per_chunk = max(1, _kde_values(device) * KDE_POINTS // 4 // (n * width))
    for lo in range(0, n_curves, per_chunk):
        rows, h = torch.sort(values[lo:lo + per_chunk], dim=-1).values, bandwidth[lo:lo + per_chunk]  # [c, n], [c, 1]
        first = torch.floor((rows - KDE_CUTOFF * h - start) / step).clamp_(-width, n_grid)  # [c, n], sorted
        base = (start + first * step - rows) / h  # [c, n]: from the value to its first grid point, in bandwidths
        z = (base[:, None, :] + offsets[:, None] * (step / h)[..., None]).float()  # [c, width, n]
        kernels = z.square_().mul_(-0.5).exp_()  # [c, width, n] float32 kernels
        # prefix sums along the innermost dim: a GPU scans an outer one with a thread per column (47 ms a call on
        # the Llama shape at 4096 tokens, half of the analysis)
        prefix = torch.nn.functional.pad(kernels.cumsum(dim=-1, dtype=torch.float64), (1, 0))  # [c, w, n + 1]
        first = first.long().contiguous()  # [c, n]
        bounds = points.expand(first.shape[0], -1).contiguous()  # [c, J]
        below = torch.searchsorted(first, bounds, right=False)[:, None].expand(-1, width, -1)  # [c, w, J]: < j
        upto = torch.searchsorted(first, bounds, right=True)[:, None].expand(-1, width, -1)  # [c, w, J]: <= j
        sums = prefix.gather(2, upto) - prefix.gather(2, below)  # [c, width, J]: the values of each first point
        out.append(sums[:, offsets, at].sum(dim=-1))  # [c, grid, width] -> [c, grid]
    return out[0] if len(out) == 1 else torch.cat(out)


def compute_qk_measures_t(q: torch.Tensor, k: torch.Tensor, exclude_first_token: bool = True,
                          query_position: int = -1, *, causal: bool = True, skip=None) -> dict[str, torch.Tensor]:
    """The q/k measurements of one or more layers on q's device, run in the pass: the head stats and the dot
    products, raw and centered ({name: [..., values]}). q [..., head, pos, d_head], k [..., kv_head, pos, d_head]
    (leading dims batched, e.g. [layer]) in the model's dtype (promoted to float64 here, exactly); the dot
    products' query and keys: compared_keys's `query_position`, `causal` and `skip`."""
    out = {}
    if q.shape[-2:] == k.shape[-2:] and not HEAD_STATS_BY_NORM[device_kind(q.device)]:  # one set of launches
        means, stds = compute_head_stats_t(torch.cat([q, k], dim=-3), exclude_first_token)  # [..., head + kv_head]
        n_heads = q.shape[-3] if means.shape[-1] else 0
        out["q_means"], out["k_means"], out["q_stds"], out["k_stds"] = (
            means[..., :n_heads], means[..., n_heads:], stds[..., :n_heads], stds[..., n_heads:])
    else:
        out["q_means"], out["q_stds"] = compute_head_stats_t(q, exclude_first_token)
        out["k_means"], out["k_stds"] = compute_head_stats_t(k, exclude_first_token)
    raw, offset = compute_dot_products_offset_t(q, k, exclude_first_token, query_position, causal=causal, skip=skip)
    out["same_head_dp"], out["diff_head_dp"] = raw
    out["same_head_dp_centered"], out["diff_head_dp_centered"] = _center_t(*raw, offset)
    out["dp_offset"] = offset  # [..., head, kv_head]: what a pass sends to the host in place of the centered ones
    return out


SPREAD_INPUTS = ("same_head_dp", "diff_head_dp", "same_head_dp_centered", "diff_head_dp_centered", "final_to_prev",
                 "self_attention")  # what compute_spread_measures_t reads


def compute_spread_measures_t(measures: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the measurements of many layers of one text need beyond compute_qk_measures_t, for all of them at once:
    the Mann-Whitney parts of every layer's two comparisons from one batched sort, and the KDEs of every layer's
    two read-outs from one batched kernel sum: {name: [layer, ...] tensor}. `measures`: {name: [layer, ...]},
    compute_qk_measures_t's dot products and, for the KDEs, the read-outs final_to_prev and self_attention.

    "mannwhitney*" ([layer, 2]: U and the tie term) only where both groups have more than 8 values (the host asks
    scipy's exact test otherwise) and off the CPU (there the host runs compute_mannwhitney: numpy's sort is many
    times faster than torch's on the CPU); "kde_*" ([layer, 300]) of the read-outs, NaN where they are too few or all
    equal (compute_kde_t), as the notebook's scipy has none there.
    """
    out: dict[str, torch.Tensor] = {}
    same = measures["same_head_dp"]  # [layer, n1]
    n_layers, n1, n2 = same.shape[0], same.shape[-1], measures["diff_head_dp"].shape[-1]
    if n1 > 8 and n2 > 8 and not (NUMPY_ON_CPU and same.device.type == "cpu"):
        parts = compute_mannwhitney_parts_t(
            torch.cat([same, measures["same_head_dp_centered"]]),  # [2 * layer, n1]
            torch.cat([measures["diff_head_dp"], measures["diff_head_dp_centered"]]))  # [2 * layer, 2]
        out["mannwhitney"], out["mannwhitney_centered"] = parts[:n_layers], parts[n_layers:]
    if "final_to_prev" in measures:  # the read-outs of pattern layers
        grid = kde_grid()  # [300] on the host: compute_kde_t reads its spacing there
        curves = ("final_to_prev", "self_attention")
        groups = [curves] if len({measures[name].shape[-1] for name in curves}) == 1 else [(name,) for name in curves]
        for group in groups:  # equal lengths: one kernel sum for both
            kde = compute_kde_t(torch.cat([measures[name] for name in group]), grid)  # [curves * layer, 300]
            for c, name in enumerate(group):
                out["kde_" + name] = kde[c * n_layers:(c + 1) * n_layers]  # [layer, 300]
    return out


def compute_layer_measures_t(q: torch.Tensor, k: torch.Tensor, readouts: dict[str, torch.Tensor],
                             exclude_first_token: bool = True, query_position: int = -1, *, causal: bool = True,
                             skip=None) -> dict[str, torch.Tensor]:
    """Every q/k measurement of one layer on q's device, plus the KDEs of its read-outs: {name: tensor}, as
    compute_qk_measures_t and compute_spread_measures_t give them (the pass runs those for all layers at once).
    readouts as patterns.reduce_pattern gives them; the dot products' query and keys: compared_keys's
    `query_position`, `causal` and `skip`."""
    out = compute_qk_measures_t(q, k, exclude_first_token, query_position, causal=causal, skip=skip)
    spread = compute_spread_measures_t({name: t[None] for name, t in {**out, **readouts}.items()})  # [1, ...]
    return {**out, **{name: values[0] for name, values in spread.items()}}

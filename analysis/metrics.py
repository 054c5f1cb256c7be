"""The notebook's measurements as pure functions.

Shapes: q [head, pos, d_head], k [kv_head, pos, d_head], pattern [head, q_pos, k_pos]. Query head h
reads key head h // (H / G); for models without grouped-query attention G == H.
"""

from __future__ import annotations

import numpy as np
import torch

KDE_POINTS = 300
KDE_CHUNK = 8192


def compute_pattern(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) per query head, in float32, as the model's eager attention does."""
    n_rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(n_rep, dim=0) if n_rep > 1 else k  # [head, k_pos, d_head]
    k_t = k.transpose(-1, -2)  # [head, d_head, k_pos]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask is not None and not softcap:  # scale and mask fused: [h, q, d] @ [h, d, k] -> [h, q, k]
        scores = torch.baddbmm(mask.to(q.dtype).expand(q.shape[0], -1, -1), q, k_t, alpha=scaling)
    else:
        scores = torch.matmul(q, k_t).mul_(scaling)  # [h, q, d] @ [h, d, k] -> [h, q, k]
        if softcap:
            scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
        if mask is not None:
            scores.add_(mask.to(q.dtype))  # [1, q_pos, k_pos] broadcast over heads
    return torch.softmax(scores, dim=-1)  # [head, q_pos, k_pos]


def key_head_of(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """[head] -> the key head each query head reads."""
    return np.arange(n_heads) // (n_heads // n_kv_heads)


def compute_head_stats(x: np.ndarray, exclude_first_token: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per head mean and (unbiased, torch's default) std over positions and dimensions."""
    x = x[:, 1:] if exclude_first_token else x  # [head, pos, d_head]
    flat = x.reshape(x.shape[0], -1).astype(np.float64)  # [head, pos * d_head]
    if flat.shape[1] < 2:
        return np.empty(0), np.empty(0)
    return flat.mean(axis=1), flat.std(axis=1, ddof=1)


def compute_dot_products(q: np.ndarray, k: np.ndarray, exclude_first_token: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled q.k of the final query with the previous keys: (same head, different heads).

    Ordered as the notebook's loops: query head outer, key head inner, key position innermost.
    """
    start = 1 if exclude_first_token else 0
    final_q = q[:, -1].astype(np.float64)  # [head, d_head]
    keys = k[:, start:-1].astype(np.float64)  # [kv_head, k_pos, d_head]
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
    Kernels in float32, sums in float64: within ~1e-7 of scipy, at a fifth of the float64 cost.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.ptp(values) == 0:
        return None
    bandwidth = values.std(ddof=1) * values.size ** (-1 / 5)
    scaled_grid = (grid / bandwidth).astype(np.float32)  # [grid]
    scaled = (values / bandwidth).astype(np.float32)  # [n]
    density = np.zeros(grid.size)
    for start in range(0, scaled.size, KDE_CHUNK):  # bounded memory: one [grid, chunk] float32 block at a time
        z = np.subtract.outer(scaled_grid, scaled[start:start + KDE_CHUNK])  # [grid, chunk]
        np.square(z, out=z)
        z *= -0.5
        np.exp(z, out=z)  # float32 kernels (~1e-7 relative), summed in float64
        density += z.sum(axis=1, dtype=np.float64)
    return density / density.max()


def kde_grid() -> np.ndarray:
    return np.linspace(0, 1, KDE_POINTS)

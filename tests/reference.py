"""Reference implementations: slow, readable definitions that only the tests use, as oracles for the engine.

Nothing in analysis/, reports/ or the app imports this module. Each function is the plainest transcription
of a definition, so a test can hold the engine's fast route equal to it:

- `capture_c_attn`: the course notebook's own route to q and k for GPT-2 (hook `attn.c_attn`, split Q, K, V,
  then split into heads), against the engine's attention-interface capture.
- `compute_*_score` and the detection patterns: TransformerLens's head detector ("mul" error measure) and the
  pattern-free scores as dense numpy over whole [head, q_pos, k_pos] patterns, against the engine's sparse,
  in-forward-pass route (`analysis.head_scores.compute_score_parts` / `combine_score_parts`).
  See analysis/head_scores.py's docstring for the definitions and the exclusion options.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.capture import tokenize
from analysis.errors import HeadscopeError

# ---- the notebook's capture route (GPT-2 only) ----------------------------------------------------------------------


def capture_c_attn(loaded, text: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's own route for GPT-2: hook attn.c_attn, split Q, K, V, then split into heads."""
    model, info = loaded.model, loaded.info
    if info.family != "GPT-2":
        raise HeadscopeError("The c_attn hook route exists for GPT-2 only.")
    seen = {}
    hook = model.h[layer].attn.c_attn.register_forward_hook(lambda mod, args, out: seen.setdefault("qkv", out.detach()))
    inputs = {name: t.to(info.device) for name, t in tokenize(loaded, text).items() if name != "special_tokens_mask"}
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        hook.remove()
    d_model = info.n_heads * info.d_head
    q, k, _ = torch.split(seen["qkv"][0].float(), d_model, dim=1)  # [pos, d_model] each
    q = q.view(-1, info.n_heads, info.d_head).transpose(0, 1)  # [head, pos, d_head]
    k = k.view(-1, info.n_heads, info.d_head).transpose(0, 1)  # [head, pos, d_head]
    return q.cpu().numpy(), k.cpu().numpy()


# ---- detection patterns (TransformerLens's get_*_detection_pattern) ----------------------------------------------


def compute_previous_token_pattern(n: int) -> np.ndarray:
    """[q_pos, k_pos] with ones on the first sub-diagonal."""
    return np.eye(n, k=-1)


def compute_duplicate_token_pattern(token_ids, causal: bool = True) -> np.ndarray:
    """[q_pos, k_pos]: 1 where another key the query sees holds its token (an earlier one on a causal model, any
    other on an encoder); the diagonal is zero."""
    ids = np.asarray(token_ids).reshape(-1)  # [pos]
    same = ids[:, None] == ids[None, :]  # [q_pos, k_pos]
    seen = np.tril(same, k=-1) if causal else same & ~np.eye(ids.size, dtype=bool)  # [q_pos, k_pos]
    return seen.astype(np.float64)


def compute_induction_pattern(token_ids, causal: bool = True) -> np.ndarray:
    """[q_pos, k_pos]: the duplicate pattern shifted one key to the right (attend to what followed last time); a
    copy at the last position has no successor."""
    duplicate = compute_duplicate_token_pattern(token_ids, causal)  # [q_pos, k_pos]
    shifted = np.zeros_like(duplicate)  # [q_pos, k_pos]
    shifted[:, 1:] = duplicate[:, :-1]  # column 0 stays zero; causal: stays lower-triangular since j < i => j + 1 <= i
    return shifted


def compute_detection_score(patterns: np.ndarray, detection: np.ndarray, exclude_bos: bool = False,
                            exclude_current_token: bool = False) -> np.ndarray:
    """TransformerLens's "mul" score per head: sum(A * P) / sum(A) over the kept entries. [head]; never mutates."""
    a = np.asarray(patterns, dtype=np.float64)  # [head, q_pos, k_pos], a copy only if not float64 already
    keep = np.ones(a.shape[-2:])  # [q_pos, k_pos]
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(keep, 0)
    kept = a * keep  # [head, q_pos, k_pos], a new array: `patterns` is untouched
    with np.errstate(invalid="ignore", divide="ignore"):
        return (kept * detection).sum(axis=(1, 2)) / kept.sum(axis=(1, 2))


def compute_previous_token_score(patterns, exclude_bos=False, exclude_current_token=False) -> np.ndarray:
    return compute_detection_score(patterns, compute_previous_token_pattern(np.shape(patterns)[-1]), exclude_bos,
                                   exclude_current_token)


def compute_duplicate_token_score(patterns, token_ids, exclude_bos=False, exclude_current_token=False,
                                  causal=True) -> np.ndarray:
    return compute_detection_score(patterns, compute_duplicate_token_pattern(token_ids, causal), exclude_bos,
                                   exclude_current_token)


def compute_induction_score(patterns, token_ids, exclude_bos=False, exclude_current_token=False,
                            causal=True) -> np.ndarray:
    return compute_detection_score(patterns, compute_induction_pattern(token_ids, causal), exclude_bos,
                                   exclude_current_token)


# ---- pattern-free scores -------------------------------------------------------------------------------------------


def _rows_after_first(patterns) -> np.ndarray:
    return np.asarray(patterns, dtype=np.float64)[:, 1:]  # [head, q_pos - 1, k_pos]


def compute_sink_score(patterns) -> np.ndarray:
    """Mean attention queries 1..T-1 pay to position 0, per head (NaN for one token)."""
    rows = _rows_after_first(patterns)  # [head, q_pos - 1, k_pos]
    return rows[:, :, 0].mean(axis=1) if rows.shape[1] else np.full(rows.shape[0], np.nan)


def compute_self_score(patterns) -> np.ndarray:
    """Mean attention a query pays to itself, rows 1..T-1, per head (NaN for one token)."""
    rows = _rows_after_first(patterns)  # [head, q_pos - 1, k_pos]
    diagonal = np.diagonal(rows, offset=1, axis1=1, axis2=2)  # [head, q_pos - 1]: rows[:, i, i + 1] = A[:, i+1, i+1]
    return diagonal.mean(axis=1) if rows.shape[1] else np.full(rows.shape[0], np.nan)


def compute_row_entropy(patterns) -> np.ndarray:
    """Shannon entropy (nats) of every query row: [head, q_pos]; 0 * log 0 = 0."""
    a = np.asarray(patterns, dtype=np.float64)  # [head, q_pos, k_pos]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, -a * np.log(a), 0.0)  # [head, q_pos, k_pos], a new array
    return terms.sum(axis=2)


def compute_entropy_score(patterns) -> np.ndarray:
    """Mean attention entropy (nats) of query rows 1..T-1, per head (NaN for one token)."""
    rows = compute_row_entropy(patterns)[:, 1:]  # [head, q_pos - 1]
    return rows.mean(axis=1) if rows.shape[1] else np.full(rows.shape[0], np.nan)


# ---- rank statistics of two runs of one text ------------------------------------------------------------------------


def rank_flips(same, diff, rel: float = 1e-4) -> int:
    """How many same/different-head pairs of dot products lie within `rel` of the largest magnitude of each other:
    the pairs whose order float rounding can flip between two runs of one text (padded or alone, in one batch or
    another, on one CPU or another). A flip moves the Mann-Whitney U by 1 (by 1/2 into or out of a tie), so the
    rank-biserial r = 2U/(n1 n2) - 1 by 2/(n1 n2): 2.5e-4 for 4 heads and 13 keys, far beyond any float tolerance."""
    same, diff = np.ravel(same).astype(np.float64), np.sort(np.ravel(diff).astype(np.float64))
    near = rel * max(np.abs(same).max(initial=0.0), np.abs(diff).max(initial=0.0))
    return int((np.searchsorted(diff, same + near, side="right") - np.searchsorted(diff, same - near)).sum())


def assert_rank_statistics_close(got: tuple, want: tuple, same, diff, tolerance: float = 1e-6, where: str = "",
                                 rel: float = 1e-4):
    """got's (Mann-Whitney p, rank-biserial r) equal want's, computed from the dot products `same` and `diff`, but
    for the flips rank_flips(rel=) allows: r within 2 flips / (n1 n2); p, on the normal approximation's groups (more
    than 8 each), within the p-values of U moved by as many flips. With no near pair both equal to `tolerance`.
    `rel`: at least twice what the two runs' dot products may differ by, relative to the largest."""
    from analysis.metrics import mannwhitney_from_parts

    (got_p, got_r), (want_p, want_r) = got, want
    if want_r is None or np.isnan(want_r):
        assert got_r is None or np.isnan(got_r), where
        return
    n1, n2 = np.size(same), np.size(diff)
    flips = rank_flips(same, diff, rel)
    assert abs(got_r - want_r) <= 2 * flips / (n1 * n2) + tolerance, (where, got_r, want_r, flips)
    if got_p is None or want_p is None:
        assert got_p is want_p, where
    elif not flips:
        assert abs(got_p - want_p) <= tolerance * max(1.0, abs(want_p)), (where, got_p, want_p)
    elif min(n1, n2) > 8:  # scipy's exact test below: p moves in steps of its own; r's bound stands for both
        u = (want_r + 1) * n1 * n2 / 2
        _, counts = np.unique(np.concatenate([np.ravel(same), np.ravel(diff)]), return_counts=True)
        tie_sum = float((counts.astype(np.float64) ** 3 - counts).sum())
        moved = [u - flips, u + flips, *([n1 * n2 / 2] if abs(u - n1 * n2 / 2) <= flips else [])]
        ps = [mannwhitney_from_parts(max(0.0, min(value, n1 * n2)), tie_sum, n1, n2)[0] for value in moved]
        assert min(ps) - tolerance <= got_p <= max(ps) + tolerance, (where, got_p, ps, flips)


def assert_layer_rank_statistics_close(got, want, tolerance: float = 1e-6, where: str = "", rel: float = 1e-4):
    """assert_rank_statistics_close for both comparisons of two LayerResults of one text: of the raw dot products
    and of the centred ones."""
    for suffix, dps in (("", (want.same_head_dp, want.diff_head_dp)),
                        ("_centered", (want.dp_stats.same_head_dp_centered, want.dp_stats.diff_head_dp_centered))):
        stats = [tuple(getattr(layer.dp_stats, name + suffix) for name in ("mannwhitney_p", "rank_biserial"))
                 for layer in (got, want)]
        assert_rank_statistics_close(*stats, *dps, tolerance, f"{where}{suffix}", rel)

"""Whole-model head scores: what kind of head is each layer x head, from the one forward pass.

Shapes: patterns [head, q_pos, k_pos] (rows sum to 1), token_ids [pos].

`previous_token`, `duplicate_token` and `induction` are TransformerLens's head detector with its default
"mul" error measure: score = sum(A * P) / sum(A), where A is the attention pattern and P the 0/1 detection
pattern, a [q_pos, k_pos] matrix over the pairs the query can see:
  previous_token   P[i, i-1] = 1 (the first sub-diagonal);
  duplicate_token  P[i, j] = 1 where j != i and token j is token i: every other copy of the query's token;
  induction        P[i, j+1] = 1 where j != i, token j is token i and j + 1 is a position: the token right after
                   every other copy.
On a causal model the query sees only earlier keys, so j < i: TransformerLens's lower-triangular patterns (the
duplicate pattern with its diagonal zeroed; the induction pattern that shifted one key to the right). On a
bidirectional encoder it sees every key, so the other copies after it count too (and the token after each, when
that copy is not the last position): a head that attends to the other copies on both sides scores 1, as a causal
duplicate-token head does (with only the earlier copies, such a head scored about 0.5, and the first copy's
queries nothing). Results written before this (an encoder's, headscope.results/1 without
settings.score_definition) hold the earlier-copies-only numbers: analysis.results.SCORE_DEFINITIONS.
The sums run over every entry of A, which under a causal mask is the lower triangle; for a bidirectional
encoder the denominator also counts attention to later tokens, so the score stays "the fraction of this
head's attention that goes where P says". TransformerLens's options:
  exclude_bos            drop attention paid to position 0 (column 0 of A) from both sums;
  exclude_current_token  drop attention paid to the current token (the diagonal of A) from both sums.
TransformerLens implements the options by writing zeros into the pattern it was given (fixed upstream in
PR #1745); here nothing is written: the exclusions are masks, or sums subtracted afterwards.
A score whose denominator is zero (e.g. one token with the first excluded) is NaN.

`sink`, `self` and `entropy` need no detection pattern: the mean attention queries 1..T-1 pay to position 0,
the mean of the diagonal over rows 1..T-1, and the mean Shannon entropy (nats) of rows 1..T-1. Row 0 is left
out of all three because under a causal mask it can only attend to itself.

`compute_score_parts` keeps, for one layer's weights and per head, each detection sum split into what the
exclusions would remove (so the exclusions can be chosen later without running the model again), plus the three
pattern-free scores; `combine_score_parts` turns those into scores. Inside the forward pass
analysis.patterns.reduce_pattern accumulates the same parts a block of query rows at a time (ScorePlan.rows).
The dense numpy definitions (`compute_previous_token_score`, ...) live with the tests (tests/reference.py), which
hold the two routes equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.metrics import to_device

DETECTION_SCORES = ("previous_token", "duplicate_token", "induction")
PATTERN_SCORES = ("sink", "self", "entropy")
HEAD_SCORES = DETECTION_SCORES + PATTERN_SCORES
# The parts of each detection sum, in this order: all entries, column 0, the diagonal, the (0, 0) entry.
# Kept sum = all - bos * column0 - current * diagonal + bos * current * corner (the corner was removed twice).
PARTS = ("all", "first_key", "current", "corner")


# ---- the fast route, run inside the forward pass ---------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ScorePlan:
    """Where each detection pattern is 1, as index pairs, built once per forward pass from the token ids.

    The detection patterns are sparse (T-1 previous-token pairs; one pair per other copy of a token that the query
    sees: the earlier ones on a causal model, every other one on an encoder), so the weights are gathered at those
    pairs instead of multiplied by a dense T x T mask.
    """

    n: int
    q_index: torch.Tensor  # [pair]: query positions of the previous, duplicate and induction pairs, by query
    k_index: torch.Tensor  # [pair]
    parts: torch.Tensor  # [pair, score * part]: pair p counts towards (score, part) where 1
    q_host: np.ndarray | None = None  # [pair]: q_index on the host, sorted, to find a block of query rows' pairs

    def rows(self, start: int, stop: int) -> slice:
        """The pairs whose query lies in rows start..stop-1 (the pairs are sorted by query)."""
        return slice(int(np.searchsorted(self.q_host, start)), int(np.searchsorted(self.q_host, stop)))

    @classmethod
    def build(cls, token_ids, device="cpu", causal: bool = True) -> ScorePlan:
        q_index, k_index, parts = score_pairs(token_ids, causal)
        return cls(n=np.asarray(token_ids).size, q_index=to_device(q_index, device),
                   k_index=to_device(k_index, device), parts=to_device(parts, device),
                   q_host=q_index)


def score_pairs(token_ids, causal: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ScorePlan's pairs on the host: (q_index [pair], k_index [pair], parts [pair, score * part]), by query.
    `causal`: the query sees the earlier copies of its token only; else (an encoder) the later ones too."""
    ids = np.asarray(token_ids).reshape(-1)  # [pos]
    n = ids.size
    dup_q, dup_k = duplicate_pairs(ids)  # [pair] each: k < q
    prev_q = np.arange(1, n)  # [n - 1]
    pairs = [(prev_q, prev_q - 1), (dup_q, dup_k), (dup_q, dup_k + 1)]  # previous, duplicate, induction
    if not causal:  # the same pairs seen from the earlier copy (q < k), and the token after that later copy where
        # there is one (a causal model's pairs stay as they were, in their order: its sums are unchanged)
        after = dup_q + 1 < n  # [pair]: the later copy is not the last position
        pairs[1] = (np.concatenate([dup_q, dup_k]), np.concatenate([dup_k, dup_q]))  # [2 * pair] each
        pairs[2] = (np.concatenate([dup_q, dup_k[after]]), np.concatenate([dup_k + 1, dup_q[after] + 1]))
    q_index = np.concatenate([q for q, _ in pairs])  # [pair]
    k_index = np.concatenate([k for _, k in pairs])  # [pair]
    parts = np.zeros((q_index.size, len(DETECTION_SCORES), len(PARTS)))  # [pair, score, part]
    start = 0
    for score, (q, k) in enumerate(pairs):
        rows = slice(start, start + q.size)
        parts[rows, score] = np.stack([np.ones(q.size), k == 0, q == k, (q == 0) & (k == 0)], axis=1)
        start += q.size
    parts = parts.reshape(q_index.size, len(DETECTION_SCORES) * len(PARTS))  # [pair, score * part]
    order = np.argsort(q_index, kind="stable")  # [pair]: by query row, so a block of rows is one slice
    return q_index[order], k_index[order], parts[order]


def duplicate_pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (q, k) with k < q and ids[k] == ids[q], by q then k ([pair] each), from the positions sorted by token:
    a position pairs with the earlier positions of its token (no T x T comparison: 0.14 s at 4096 tokens)."""
    order = np.argsort(ids, kind="stable")  # [pos]: by token, then position
    tokens = ids[order]  # [pos]
    first = np.r_[True, tokens[1:] != tokens[:-1]]  # [pos]: the first position of its token
    start = np.maximum.accumulate(np.where(first, np.arange(ids.size), 0))  # [pos]: where its token's run starts
    earlier = np.arange(ids.size) - start  # [pos]: how many earlier positions its token has
    q = np.repeat(order, earlier)  # [pair]
    offset = np.arange(q.size) - np.repeat(np.cumsum(earlier) - earlier, earlier)  # [pair]: 0 .. earlier - 1
    k = order[np.repeat(start, earlier) + offset]  # [pair]
    by_query = np.lexsort((k, q))  # [pair]
    return q[by_query], k[by_query]


def compute_score_parts(weights: torch.Tensor, plan: ScorePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's weights [head, q_pos, k_pos] -> (detection parts [head, 4 (3 scores + denominator), 4 parts],
    pattern-free scores [head, 3]) on the weights' device. Reads the weights, never writes them.

    The sums are float64: an exclusion is applied later by subtracting a part from a sum of ~T entries, and a
    float32 sum, even of one row (~1e-7 of it), would swamp the small kept mass of a head that attends almost only
    to the first token or to itself (a score off by 1e-3, above 1, or 0 where nothing is kept and 0/0 is NaN).
    """
    h, n = weights.shape[0], weights.shape[-1]
    gathered = weights[:, plan.q_index, plan.k_index].double()  # [head, pair]
    numerators = gathered @ plan.parts  # [h, pair] @ [pair, 3*4] -> [h, 3*4]
    numerators = numerators.view(h, len(DETECTION_SCORES), len(PARTS))  # [head, score, part]
    diagonal = weights.diagonal(dim1=-2, dim2=-1)  # [head, pos], a view
    denominator = torch.stack([
        weights.sum(dim=(-2, -1), dtype=torch.float64),
        weights[:, :, 0].sum(dim=-1, dtype=torch.float64),
        diagonal.sum(dim=-1, dtype=torch.float64),
        weights[:, 0, 0].double(),
    ], dim=-1)  # [head, 4 parts]
    parts = torch.cat([numerators, denominator[:, None]], dim=1)  # [head, 4, 4 parts]
    if n < 2:
        return parts, torch.full((h, len(PATTERN_SCORES)), float("nan"), dtype=torch.float64, device=weights.device)
    rows = weights[:, 1:]  # [head, q_pos - 1, k_pos], a view
    rows32 = rows.float()  # a view for float32 weights
    entropy = torch.xlogy(rows32, rows32).sum(dim=-1).neg_().mean(dim=-1, dtype=torch.float64)  # [head]; 0 log 0 = 0
    fixed = torch.stack([rows[:, :, 0].mean(dim=-1, dtype=torch.float64),
                         diagonal[:, 1:].mean(dim=-1, dtype=torch.float64), entropy], dim=-1)  # [head, 3]
    return parts, fixed


def combine_score_parts(parts: np.ndarray, fixed: np.ndarray, exclude_bos: bool = False,
                        exclude_current_token: bool = False) -> dict[str, np.ndarray]:
    """parts [..., 4, 4] and fixed [..., 3] (e.g. [layer, head, ...]) -> {score name: [...]} in float64.

    A denominator that is zero up to rounding (nothing kept) gives NaN, as TransformerLens's 0/0 does.
    """
    parts = np.asarray(parts, dtype=np.float64)
    signs = np.array([1.0, -float(exclude_bos), -float(exclude_current_token),
                      float(exclude_bos and exclude_current_token)])  # inclusion-exclusion over PARTS
    kept = parts @ signs  # [..., 4]: three numerators, then the denominator
    denominator = np.where(kept[..., 3] > 1e-9 * parts[..., 3, 0], kept[..., 3], np.nan)
    scores = {name: kept[..., i] / denominator for i, name in enumerate(DETECTION_SCORES)}
    fixed = np.asarray(fixed, dtype=np.float64)
    scores.update({name: fixed[..., i] for i, name in enumerate(PATTERN_SCORES)})
    return scores


def compute_head_scores(patterns, token_ids, exclude_bos: bool = False, exclude_current_token: bool = False,
                        causal: bool = True) -> dict[str, np.ndarray]:
    """Every score of one layer's patterns [head, q_pos, k_pos] by the fast route: {name: [head]}. `causal`: the
    model's (an encoder's query also sees the later copies of its token)."""
    patterns = np.asarray(patterns)
    if not patterns.flags.writeable:  # torch cannot wrap a read-only array
        patterns = patterns.copy()
    weights = torch.from_numpy(patterns)  # shares memory; compute_score_parts only reads it
    parts, fixed = compute_score_parts(weights, ScorePlan.build(token_ids, causal=causal))
    return combine_score_parts(parts.numpy(), fixed.numpy(), exclude_bos, exclude_current_token)


# ---- moved to analysis.metrics (the other measurements); re-exported for old imports -------------------------------

from analysis.metrics import compute_centered_dot_products, compute_mannwhitney  # noqa: F401

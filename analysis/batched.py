"""A corpus pass measured for all its texts at once: the route a GPU takes.

A corpus pass (analysis.corpus) needs only small numbers from each text: the head scores' sums, the Q/K statistics
and the Mann-Whitney parts of the dot products, on every layer. Measured text by text (analysis.capture's route,
the CPU's), that is a few dozen operations per text and layer group. On a GPU every operation is a launch, and at a
few dozen tokens a text the launches cost more than the batched forward pass, so more texts per pass would buy
nothing. Here the operations run once for every text of the pass, on the padded rows: what belongs to which text
(its positions, its query's keys, its head-score pairs) is masks and index lists made once per pass on the host
(TextsPlan). Each text's numbers equal its text-by-text numbers to float rounding (tests/analysis/test_batched.py).

Shapes: q [text, layer, head, W, d_head], k [text, layer, kv_head, W, d_head], W the pass's padded width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.head_scores import DETECTION_SCORES, PARTS, PATTERN_SCORES, score_pairs
from analysis.keys import compared_keys
from analysis.metrics import _head_index, additive_mask, compute_mannwhitney_parts_t, to_device
from analysis.patterns import rows_per_block

SUMS = len(DETECTION_SCORES) * len(PARTS)  # the detection sums of one head: (score, part)


@dataclass(frozen=True, eq=False)
class TextsPlan:
    """Where each text of a padded pass lies and what its measurements read, made once per pass: [text, W] masks
    and the texts' head-score pairs as one list, on the device."""

    starts: torch.Tensor  # [text] long: each text's first position in its row
    lengths: torch.Tensor  # [text] float64: its number of tokens
    rows: torch.Tensor  # [text, W] bool: its positions
    later: torch.Tensor  # [text, W] bool: its positions after its first (what sink, self and entropy average)
    stats: torch.Tensor  # [text, W] bool: what the Q/K statistics average (less the first if it is excluded)
    keys: torch.Tensor  # [text, W] bool: the keys its query's dot products use (metrics.compared_keys)
    query: torch.Tensor  # [text] long: its query's row
    pairs: tuple[np.ndarray, ...]  # the detection sums' entries of every text (host): text, sum, q_pos, k_pos
    _blocks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, texts, width: int, exclude_first_token: bool, causal: bool, device) -> TextsPlan:
        """`texts`: per text (token ids [pos], (start, stop) in its row, its query position (0 its first token),
        [pos] bool keys to skip or None)."""
        n_texts = len(texts)
        rows, later, stats, keys = (np.zeros((n_texts, width), dtype=bool) for _ in range(4))  # [text, W] each
        entries = []
        for b, (ids, (start, stop), query, skip) in enumerate(texts):
            rows[b, start:stop] = True
            later[b, start + 1:stop] = True
            stats[b, start + int(exclude_first_token):stop] = True
            _, at = compared_keys(stop - start, exclude_first_token, query, causal=causal, skip=skip)
            keys[b, start:stop][at] = True
            q_index, k_index, counts = score_pairs(ids, causal)  # its pairs, relative to its first position
            pair, column = np.nonzero(counts)  # [entry] each: pair `pair` counts towards sum `column`
            entries.append((np.full(pair.size, b), b * SUMS + column, q_index[pair] + start, k_index[pair] + start))
        pairs = tuple(np.concatenate(parts) for parts in zip(*entries))  # [entry] each
        queries = [span[0] + query for _, span, query, _ in texts]  # [text]: rows in the padded batch
        to = functools.partial(to_device, device=device)
        return cls(starts=to([span[0] for _, span, _, _ in texts]),
                   lengths=to([span[1] - span[0] for _, span, _, _ in texts], dtype=torch.float64), rows=to(rows),
                   later=to(later), stats=to(stats), keys=to(keys), query=to(queries), pairs=pairs)

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """The entries whose query lies in rows start..stop-1, ordered by sum: (text [entry], q_pos - start
        [entry], k_pos [entry], entries per sum [text * SUMS]), for torch.segment_reduce."""
        if (start, stop) not in self._blocks:
            text, sums, q, k = self.pairs
            inside = (q >= start) & (q < stop)  # [entry]
            order = np.argsort(sums[inside], kind="stable")  # [entry]
            counts = np.bincount(sums[inside], minlength=len(self.starts) * SUMS)  # [text * SUMS]
            to = functools.partial(to_device, device=self.rows.device)
            self._blocks[start, stop] = (to(text[inside][order]), to(q[inside][order] - start),
                                         to(k[inside][order]), to(counts))
        return self._blocks[start, stop]


def reduce_scores_texts(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None,
                        softcap: float | None, plan: TextsPlan, budget: int,
                        causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The head scores' parts of every text and layer at once, as patterns.reduce_pattern gives them one text at a
    time: (parts [text, layer, head, 4, 4], fixed [text, layer, head, 3]) float64.

    The pattern softmax(q k^T * scaling + mask) is rebuilt in float32 for every text a block of query rows at a time
    (a block holds every head of every layer of every text: patterns.rows_per_block of `budget`). `mask`
    [text or 1, 1, W, W], additive or boolean, as the model got it (padding included); None: `causal`'s own.
    """
    n_texts, n_layers, n_heads, width = q.shape[:4]
    q = q.flatten(1, 2).float()  # [text, layer * head, W, d_head]
    k = k.flatten(1, 2).float()  # [text, layer * kv_head, W, d_head]
    heads = q.shape[1]
    if heads > k.shape[1]:  # layer-major stacks: key head j serves query heads j * rep .. + rep - 1
        k = k.repeat_interleave(heads // k.shape[1], dim=1)  # [text, layer * head, W, d_head]
    q, k_t = q.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2)  # [text * lh, W, d], [text * lh, d, W]
    if mask is None and causal:
        mask = torch.ones(width, width, dtype=torch.bool, device=q.device).tril_()[None, None]  # [1, 1, W, W]
    rows = rows_per_block(n_texts * heads, width, budget)
    sums = q.new_zeros((n_texts * SUMS, heads), dtype=torch.float64)  # [text * SUMS, lh]
    first_key, diagonal, entropy, others = [], [], [], []  # blocks of [text, lh, rows] float32
    zero = q.new_zeros(())
    for start in range(0, width, rows):
        stop = min(width, start + rows)
        keys = stop if causal else width  # a causal block's rows attend to keys 0..stop-1 only
        scores = torch.baddbmm(zero.expand(q.shape[0], stop - start, keys), q[:, start:stop], k_t[..., :keys],
                               beta=0.0, alpha=scaling)  # [t*lh, rows, d] @ [t*lh, d, keys] -> [t*lh, rows, keys]
        if softcap:
            scores = torch.tanh(scores.div_(softcap)).mul_(softcap)  # [text * lh, rows, keys]
        scores = scores.view(n_texts, heads, stop - start, keys)  # [text, lh, rows, keys]
        if mask is not None:
            scores.add_(additive_mask(mask[:, :, start:stop, :keys]))  # [text or 1, 1, rows, keys] over the heads
        pattern = torch.softmax(scores, dim=-1)  # [text, lh, rows, keys]
        del scores
        text, q_pos, k_pos, counts = plan.block(start, stop)  # [entry] x 3, [text * SUMS]
        gathered = pattern[text, :, q_pos, k_pos].double()  # [entry, lh]
        sums += torch.segment_reduce(gathered, "sum", lengths=counts, axis=0)  # [text * SUMS, lh]
        first = plan.starts.clamp(max=keys - 1).view(-1, 1, 1, 1).expand(n_texts, heads, stop - start, 1)
        first_key.append(pattern.gather(-1, first)[..., 0])  # [text, lh, rows]: a row's weight on its text's first
        own = pattern.diagonal(offset=start, dim1=-2, dim2=-1)  # [text, lh, rows]: A[i, i], a view
        diagonal.append(own.clone())
        entropy.append(torch.special.entr(pattern).sum(dim=-1))  # [text, lh, rows]: -p log p, 0 where p is 0
        own.zero_()  # then each row's weight off its text's first key and itself (as patterns.reduce_pattern)
        others.append(pattern.scatter_(-1, first, 0.0).sum(dim=-1))  # [text, lh, rows]
        del pattern, own
    diagonal = torch.cat(diagonal, dim=-1)  # [text, lh, W]: A[i, i]
    by_row = torch.stack([torch.cat(first_key, dim=-1), diagonal, torch.cat(entropy, dim=-1),
                          torch.cat(others, dim=-1)])  # [4, text, lh, W]
    where = torch.stack([plan.rows, plan.later])[:, None, :, None]  # [2, 1, text, 1, W]: a text's rows, its later
    totals = torch.where(where, by_row, 0.0).sum(dim=-1, dtype=torch.float64)  # [2, 4, text, lh]
    corner = diagonal.gather(-1, plan.starts.view(-1, 1, 1).expand(n_texts, heads, 1))[..., 0].double()  # [t, lh]
    total = totals[0, 3] + totals[0, 0] + totals[0, 1] - corner  # [text, lh]: every weight of its rows
    denominator = torch.stack([total, totals[0, 0], totals[0, 1], corner], dim=-1)  # [text, lh, 4 parts]
    numerators = sums.view(n_texts, SUMS, heads).transpose(1, 2)  # [text, lh, SUMS]
    parts = torch.cat([numerators.reshape(n_texts, heads, len(DETECTION_SCORES), len(PARTS)),
                       denominator[:, :, None]], dim=2)  # [text, lh, 4, 4 parts]
    fixed = (totals[1, :3] / (plan.lengths - 1)[:, None]).permute(1, 2, 0)  # [text, lh, 3]: sink, self, entropy
    # over the rows after the first (0 / 0: NaN for one token)
    return (parts.view(n_texts, n_layers, n_heads, len(DETECTION_SCORES) + 1, len(PARTS)),
            fixed.reshape(n_texts, n_layers, n_heads, len(PATTERN_SCORES)))


def compute_qk_texts_t(q: torch.Tensor, k: torch.Tensor, plan: TextsPlan) -> dict[str, torch.Tensor]:
    """The q/k measurements of every text and layer at once, in float64 from the model's q and k (exactly):
    {q_means, q_stds [text, layer, head], k_means, k_stds [text, layer, kv_head] (NaN from fewer than 2 values),
    mannwhitney, mannwhitney_centered [text, layer, 2] (U and the tie term of the same- vs different-head dot
    products, raw and centered, as metrics.compute_mannwhitney_parts_t), dp_counts [text, layer, 2] (how many dot
    products each group holds)}: metrics.compute_qk_measures_t's numbers, reduced as far as the
    corpus reads them."""
    n_texts, n_layers, n_heads, _, d_head = q.shape
    n_kv = k.shape[2]
    out = {}
    outside = ~plan.stats[:, None, None, :, None]  # [text, 1, 1, W, 1]: what the statistics leave out
    count = plan.stats.sum(dim=-1).double()[:, None, None] * d_head  # [text, 1, 1]: values per head
    pairs = (("both", torch.cat([q, k], dim=2)),) if q.shape[-2:] == k.shape[-2:] else (("q", q), ("k", k))
    for name, x in pairs:  # one float64 copy each, reduced in place (two passes, as numpy's ddof=1)
        x = x.double().masked_fill_(outside, 0.0)  # [text, layer, g, W, d_head]
        mean = x.sum(dim=(-2, -1)) / count  # [text, layer, g]
        var = x.sub_(mean[..., None, None]).masked_fill_(outside, 0.0).square_().sum(dim=(-2, -1))  # [text, l, g]
        del x
        out[name + "_means"] = torch.where(count > 1, mean, torch.nan)  # NaN from fewer than 2 values
        out[name + "_stds"] = torch.where(count > 1, var / (count - 1), torch.nan).sqrt_()
    if len(pairs) == 1:
        for stat in ("_means", "_stds"):
            out["q" + stat], out["k" + stat] = out.pop("both" + stat).split([n_heads, n_kv], dim=-1)
    n_keys = plan.keys.sum(dim=-1).double()  # [text]
    at = plan.query.view(-1, 1, 1, 1, 1).expand(n_texts, n_layers, n_heads, 1, d_head)
    final_q = q.gather(3, at)[..., 0, :].double()  # [text, layer, head, d_head]
    k = k.double()  # [text, layer, kv_head, W, d_head]
    dots = k.new_empty((n_texts, n_layers, 2, n_heads, n_kv, k.shape[-2]))  # [text, layer, 2, head, kv_head, W]
    dots[:, :, 0] = torch.einsum("tlhd,tlgwd->tlhgw", final_q, k)  # [t, l, h, d] . [t, l, g, w, d] -> [t, l, h, g, w]
    mean_key = k.masked_fill_(~plan.keys[:, None, None, :, None], 0.0).sum(dim=-2) / n_keys[:, None, None, None]
    del k  # mean_key: [text, layer, kv_head, d_head], each key head's mean over the query's keys
    offset = torch.einsum("tlhd,tlgd->tlhg", final_q, mean_key)  # [t, l, h, d] . [t, l, g, d] -> [t, l, h, g]
    torch.sub(dots[:, :, 0], offset[..., None], out=dots[:, :, 1])  # centered: q.k - q.mean_key
    dots[:, :, 1].masked_fill_((n_keys <= 1).view(-1, 1, 1, 1, 1), 0.0)  # 0 for a single key, as
    # compute_both_dot_products_t
    dots.masked_fill_(~plan.keys[:, None, None, None, None], torch.inf)  # the positions that are not the query's
    # keys: +inf, padding that compute_mannwhitney_parts_t leaves out
    heads, own, others = _head_index(n_heads, n_kv, q.device)  # [head], [head], [head, kv_head - 1]
    same = dots[..., heads, own, :].flatten(-2)  # [text, layer, 2, head * W]
    diff = dots[..., heads[:, None], others, :].flatten(-3)  # [text, layer, 2, head * (kv_head - 1) * W]
    del dots
    parts = compute_mannwhitney_parts_t(same, diff, padded=True)  # [text, layer, 2, 2]
    out["mannwhitney"], out["mannwhitney_centered"] = parts[:, :, 0], parts[:, :, 1]
    counts = torch.stack([n_keys * n_heads, n_keys * n_heads * (n_kv - 1)], dim=-1)  # [text, 2]
    out["dp_counts"] = counts[:, None].expand(n_texts, n_layers, 2)  # [text, layer, 2]
    return out

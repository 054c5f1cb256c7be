"""Attention patterns, rebuilt from q, k and the mask a block of query rows at a time, and reduced on the device to
what the measurements read: the read-outs, the head scores' sums and the parity figure. One call reduces one layer
or a stack of layers that share a mask (analysis.capture's groups): inside, "head" runs over every layer's heads,
layer-major.

No [head, T, T] tensor of a whole layer is made unless the pattern is kept for the heatmaps: a block holds
`rows_per_block` query rows of every head, sized to WORK_BUDGET (analysis.capture decides both budgets).
Parity proves the rebuild is what the model used: against the model's own weights where eager attention ran,
else (a fused kernel such as sdpa) the rebuilt pattern times v against the attention output the kernel returned.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from analysis.head_scores import DETECTION_SCORES, PARTS, PATTERN_SCORES, ScorePlan
from analysis.metrics import compute_pattern, device_kind, query_keys, to_device

# A causal block rebuilds only keys 0..stop-1, so B blocks do (B + 1) / 2B of the T x T work. On the CPU (where the
# launches are cheap) a causal pattern of more than 2 * CAUSAL_ROWS tokens goes in blocks of CAUSAL_ROWS query rows,
# the fastest measured on GPT-2's shape (256 tokens: 2.5x faster than one block and 1.25x faster than 32 rows;
# 1024 tokens: 2.3x faster than one block); on a GPU the work budget alone decides (more blocks, more launches).
CAUSAL_ROWS = 64
TEMPORARIES = 3  # [head, rows, T] float32 tensors alive at once in a block: the scores, the pattern, a spare
# Each row's entropy -sum p log p: on the CPU from the shifted scores the rebuild already made (no log of T x T
# values, a tenth of xlogy's cost there); on a GPU, where an elementwise pass costs its memory traffic and a log is
# as cheap as a product, from the pattern alone (torch.special.entr then a sum: two passes over the block instead
# of the row maxima, the shift, the product and its sum).
ENTROPY_FROM_SCORES = {"cpu": True, "cuda": False}
HALF_DTYPES = (torch.float16, torch.bfloat16)  # a model run in these: a parity tolerance that scales with its scores
NO_KEY = torch.finfo(torch.float32).min / 2  # a row maximum below this is a row whose every key is masked


@dataclass(eq=False)
class PatternReduction:
    """Device tensors, except `pattern` (host numpy, only when kept)."""

    parts: torch.Tensor  # [layer, head, 4, 4] float64: head_scores.compute_score_parts's detection sums
    fixed: torch.Tensor  # [layer, head, 3] float64: sink, self, entropy
    readouts: dict[str, torch.Tensor] | None  # [layer, ...]: metrics.compute_attention_summaries's fields
    parity: torch.Tensor | None  # [layer] float32: max abs error against the model's weights or output
    score_max: torch.Tensor | None  # [layer] float32: largest |row maximum of the scores| (half precision, eager)
    pattern: np.ndarray | None  # [layer, head, q_pos, k_pos] float32


def rows_per_block(n_heads: int, n: int, budget: int) -> int:
    """Query rows of every head whose float32 temporaries fit `budget` bytes (at least one row)."""
    return int(min(n, max(1, budget // (TEMPORARIES * 4 * n_heads * n))))


def reduce_pattern(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None,
                   softcap: float | None, plan: ScorePlan, budget: int, *, readouts: bool = True,
                   query_position: int = -1, weights: torch.Tensor | None = None, value: torch.Tensor | None = None,
                   output: torch.Tensor | None = None, keep: bool = False, rebuild=compute_pattern,
                   causal: bool = True, skip=None) -> PatternReduction:
    """q [layer, head, T, d_head], k [layer, kv_head, T, d_head] as the model used them: one or more layers that
    share the mask [1, T, T] (additive or bool; None: `causal`'s own, as sdpa's causal flag, or none), scaling and
    softcap, reduced together (every operation once for all of them; a block of query rows holds every head of
    every layer). `causal`: the model's attention is causal (each block then rebuilds only keys up to its last row).

    Parity against `weights` [layer, head, T, T] (eager) if given, else `value` [layer, kv_head, T, d_v] and the
    kernel's `output` [layer, head, T, d_v]; neither: no parity. With parity against eager `weights`, when q comes in
    half precision (the model's dtype), `score_max` is each layer's largest |row maximum of the scores| (scaled,
    soft-capped, masked), what analysis.parity's tolerance scales with (the model's eager attention rounds its scores
    in that dtype; a fused kernel does not, so against its output there is none): on the CPU the rebuild's shift has
    the row maxima anyway, on a GPU they cost one reduction over each block's scores. Everything is float32 from the
    model's q and k, whatever its dtype; sums over rows are float64 as in head_scores.compute_score_parts. `rebuild`:
    metrics.compute_pattern. The read-outs and the head scores' sums come from this one float32 rebuild, whatever
    the model's dtype. "final_to_prev" is row `query_position` at metrics.query_keys(causal=, skip=): earlier
    keys, or every other. Every result has the leading [layer] dimension.
    """
    n_layers, layer_heads = q.shape[0], q.shape[1]
    with_max = q.dtype in HALF_DTYPES and weights is not None  # only the model's eager weights carry its rounding
    # of the scores (a fused kernel keeps them in float32: its output is held to the absolute bound)
    q, k = q.flatten(0, 1).float(), k.flatten(0, 1).float()  # [layer * head, T, d_head], [layer * kv_head, ...]
    weights = None if weights is None else weights.flatten(0, 1)  # [layer * head, T, T]
    value = None if value is None else value.flatten(0, 1)  # [layer * kv_head, T, d_v]
    output = None if output is None else output.flatten(0, 1)  # [layer * head, T, d_v]
    n_heads, n, n_kv = q.shape[0], q.shape[1], k.shape[0]
    rep = n_heads // n_kv  # both stacks are layer-major, so key head j still serves query heads j * rep .. + rep - 1
    v = value.float() if value is not None and weights is None else None  # [kv_head, T, d_v]
    if v is not None:  # against the output, parity is divided by the layer's largest |v|: |P v - P' v| <= the rows'
        # sum |P - P'| * max |v|, so the figure is in units of attention weight whatever the size of v (in v's units a
        # model with large values warned on an exact rebuild, and one with small values hid a wrong one)
        v_scale = v.reshape(n_layers, -1).abs().amax(dim=-1).clamp_(min=torch.finfo(torch.float32).tiny)  # [layer]
    rows = rows_per_block(n_heads, n, budget)
    if causal and q.device.type == "cpu" and n > 2 * CAUSAL_ROWS:
        rows = min(rows, CAUSAL_ROWS)  # short blocks skip more masked keys
    p_query = query_position % n
    f64 = {"dtype": torch.float64, "device": q.device}
    from_scores = ENTROPY_FROM_SCORES[device_kind(q.device)]
    numerators = None  # [head, 3 * 4]: accumulated over the blocks (no zeros to start from: one launch less)
    parity = None  # [layer] float32, where there is something to compare with
    score_max = None  # [layer] float32, where with_max
    first_key, diagonal, entropy, others, final_row = [], [], [], [], None  # blocks of [head, rows] float32
    kept = np.zeros((n_heads, n, n), dtype=np.float32) if keep else None  # [head, q_pos, k_pos] on the host
    # on the CPU the rebuild writes each block into the kept array itself (no copy; the masked keys stay 0)
    into = torch.from_numpy(kept) if keep and q.device.type == "cpu" else None  # [head, q_pos, k_pos]
    # the kernel's causal flag (no mask): every key before a block is seen, within it keys up to the row
    square = None if mask is not None or not causal else torch.full(
        (1, rows, rows), torch.finfo(torch.float32).min, device=q.device).triu_(1)  # [1, rows, rows] additive
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # a causal block's rows can only attend to keys 0..stop-1: the rest of its rows is 0, not rebuilt
        width = stop if causal else n
        if mask is not None:
            block_mask = mask[:, start:stop, :width]  # [1, rows, width]
        else:  # [1, rows, rows]: on the block's last `rows` keys; or no mask at all
            block_mask = None if square is None else square[:, :stop - start, :stop - start]
        out = {} if into is None else {"out": into[:, start:stop, :width]}  # [head, rows, width], a view
        if with_max:
            out["with_max"] = True  # the rows' largest scores come last: [head, rows]
        if from_scores:  # [head, rows, width] x 2, [head, rows]: softmax, scores less the row's max, max weight
            found = rebuild(q[:, start:stop], k[:, :width], scaling, block_mask, softcap, with_scores=True, **out)
            (pattern, shifted, largest), top = found[:3], found[3] if with_max else None
        else:  # the pattern [head, rows, width], or (the pattern, the rows' largest scores)
            found = rebuild(q[:, start:stop], k[:, :width], scaling, block_mask, softcap, **out)
            pattern, top, shifted = (*found, None) if with_max else (found, None, None)
        del found  # the block's tensors go with their names (del pattern below)
        if top is not None:  # [head, rows] -> [layer]: |largest score| over the layer's rows, 0 for a row with no key
            top = torch.where(top > NO_KEY, top, 0.0).abs_().view(n_layers, -1).amax(dim=-1)  # [layer]
            score_max = top if score_max is None else torch.maximum(score_max, top)
        pairs = plan.rows(start, stop)
        if pairs.stop > pairs.start:
            gathered = pattern[:, plan.q_index[pairs] - start, plan.k_index[pairs]].double()  # [head, pair]
            found = gathered @ plan.parts[pairs]  # [h, pair] @ [pair, 3*4] -> [h, 3*4]
            numerators = found if numerators is None else numerators.add_(found)
        first_key.append(pattern[:, :, 0].clone())  # [head, rows]
        own = pattern.diagonal(offset=start, dim1=-2, dim2=-1)  # [head, rows]: A[h, i, i], a view
        diagonal.append(own.clone())
        if shifted is not None:  # -sum p log p = -sum p * shifted - log(max p); masked p * score is 0 * finite
            entropy.append(shifted.mul_(pattern).sum(dim=-1).neg_().sub_(largest.log_()))  # [head, rows]
        else:
            entropy.append(torch.special.entr(pattern).sum(dim=-1))  # [head, rows]: -p log p, 0 where p is 0
        if readouts and start <= p_query < stop:
            final_row = pattern[:, p_query - start].clone()  # [head, width]: every key query_keys can name
        if weights is not None:
            difference = torch.sub(pattern, weights[:, start:stop, :width], out=shifted)  # [head, rows, width]
            difference = difference.view(n_layers, -1)  # [layer, head * rows * width]
            found = torch.maximum(difference.amax(dim=-1), difference.amin(dim=-1).neg_())  # [layer]: no abs pass
            # (aminmax over a dim is 20x slower than amax and amin on the CPU)
            if width < n:  # the model's own weights past the causal edge must be 0 too
                beyond = weights[:, start:stop, width:]  # [head, rows, T - width], a view
                beyond = torch.maximum(beyond.amax(dim=(-2, -1)), beyond.amin(dim=(-2, -1)).neg_())  # [head]
                found = torch.maximum(found, beyond.view(n_layers, -1).amax(dim=-1).float())  # [layer]
            parity = found if parity is None else torch.maximum(parity, found)
        elif v is not None:
            mixed = pattern.reshape(n_kv, rep * (stop - start), width) @ v[:, :width]  # [g, r*rows, w] @ [g, w, d_v]
            mixed = mixed.view(n_heads, stop - start, -1)  # [head, rows, d_v]
            found = (mixed - output[:, start:stop].float()).abs_().view(n_layers, -1).amax(dim=-1).div_(v_scale)
            parity = found if parity is None else torch.maximum(parity, found)
        if kept is not None and into is None:  # off the CPU through page-locked memory
            kept[:, start:stop, :width] = send_to_host({0: pattern}, pattern.dtype).wait(pageable=False)[0]
        # last, each row's weight off the first key and itself, summed apart (the diagonal zeroed): the exclusions
        # subtract those two from the denominators' total, so a total of whole rows (or each row taken as 1) would
        # leave its float32 rounding (~1e-7 a row) in the small kept mass of a head that attends almost only there
        # (a sink or self head)
        own.zero_()
        others.append(pattern[:, :, 1:].sum(dim=-1))  # [head, rows]
        if into is not None:  # the pattern is the kept heatmap itself: its diagonal back
            own.copy_(diagonal[-1])
        del pattern, own
    if numerators is None:  # no detection pair at all (one token)
        numerators = torch.zeros(n_heads, len(DETECTION_SCORES) * len(PARTS), **f64)  # [head, 3 * 4]
    first_key, diagonal, entropy, others = (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)  # [h, T]
                                            for blocks in (first_key, diagonal, entropy, others))
    first_sum, own_sum = first_key.sum(dim=-1, dtype=torch.float64), diagonal.sum(dim=-1, dtype=torch.float64)  # [h]
    corner = diagonal[:, 0].double()  # [head]: A[0, 0], both a first key and a diagonal weight
    total = others.sum(dim=-1, dtype=torch.float64) + first_sum + own_sum - corner  # [head]: every weight
    denominator = torch.stack([total, first_sum, own_sum, corner], dim=-1)  # [head, 4 parts]
    parts = torch.cat([numerators.view(n_heads, len(DETECTION_SCORES), len(PARTS)), denominator[:, None]],
                      dim=1)  # [head, 4, 4 parts]
    if n < 2:
        fixed = torch.full((n_heads, len(PATTERN_SCORES)), float("nan"), **f64)  # [head, 3]
    else:
        fixed = torch.stack([first_key[:, 1:].mean(dim=-1, dtype=torch.float64),
                             diagonal[:, 1:].mean(dim=-1, dtype=torch.float64),
                             entropy[:, 1:].mean(dim=-1, dtype=torch.float64)], dim=-1)  # [head, 3]
    out = None
    if readouts:
        _, keys = query_keys(n, p_query, causal=causal, skip=skip)
        if not isinstance(keys, slice):
            keys = to_device(keys, q.device)  # [k_pos] index
        out = {
            "final_to_prev": final_row[:, keys].reshape(n_layers, -1),  # [layer, head * keys]: query P to its keys
            "self_attention": diagonal[:, 1:].reshape(n_layers, -1),  # [layer, head * (T-1)]
            "first_self": diagonal[:, 0].view(n_layers, -1),  # [layer, head]
            "sink_mass": fixed[:, 0].view(n_layers, -1) if n > 1 else first_key.new_empty(
                (n_layers, 0), dtype=torch.float64),  # [layer, head] ([layer, 0] for one token)
        }
    return PatternReduction(parts=parts.view(n_layers, layer_heads, *parts.shape[1:]),
                            fixed=fixed.view(n_layers, layer_heads, -1), readouts=out, parity=parity,
                            score_max=score_max,
                            pattern=None if kept is None else kept.reshape(n_layers, layer_heads, n, n))


@dataclass(eq=False)
class HostCopy:
    """Device tensors on their way to the host as one buffer (send_to_host); `wait` gives them as numpy arrays.
    Off the CPU the buffer is page-locked memory (torch's cached buffers: a pageable copy ran at ~1 GB/s on an
    H200), filled by the device in stream order while the host goes on; `wait` waits for it, then copies it into
    pageable memory, so that results that are kept (a cache, the app's session) hold none of the page-locked kind."""

    shapes: dict[object, tuple[int, ...]]  # key -> shape, in the buffer's order
    buffer: torch.Tensor  # [total] on the host (page-locked off the CPU)
    done: torch.Event | None = None  # off the CPU: recorded after the copy

    def wait(self, pageable: bool = True) -> dict[object, np.ndarray]:
        """{key: numpy array}; pageable=False: views of the page-locked buffer, to be copied from at once."""
        if self.done is not None:
            self.done.synchronize()
        host = self.buffer.numpy()  # [total]
        if self.done is not None and pageable:
            host = copy_out(host)
        out, offset = {}, 0
        for key, shape in self.shapes.items():
            size = math.prod(shape)
            out[key] = host[offset:offset + size].reshape(shape)
            offset += size
        return out


COPY_THREADS = 8  # at most; each copies a part of a large buffer out of page-locked memory
COPY_PART = 8 * 2**20  # bytes: buffers of more than one such part are copied by several threads
_COPY_POOL: list = []  # the copying threads, started at the first large copy


def copy_out(source: np.ndarray) -> np.ndarray:
    """A copy of a 1-D array in fresh pageable memory, by several threads when it is large: the copy is mostly
    first touches of new pages, which threads take in parallel (256 MiB out of page-locked memory on an H200's
    host: 77 ms by one thread, 16 ms by 8; benchmarks/gpu_profile.py's copy_probe)."""
    threads = min(COPY_THREADS, os.cpu_count() or 1, source.nbytes // COPY_PART)
    if threads < 2:
        return source.copy()
    if not _COPY_POOL:
        _COPY_POOL.append(ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="headscope-copy"))
    out = np.empty_like(source)
    bounds = np.linspace(0, source.size, threads + 1).astype(int)
    list(_COPY_POOL[0].map(lambda i: np.copyto(out[bounds[i]:bounds[i + 1]], source[bounds[i]:bounds[i + 1]]),
                           range(threads)))  # numpy lets go of the GIL while it copies
    return out


def send_to_host(tensors: dict, dtype: torch.dtype = torch.float64) -> HostCopy:
    """{key: device tensor} on their way to the host in one copy, as `dtype` (one cat, which promotes at once)."""
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    if not tensors:
        return HostCopy(shapes, torch.empty(0, dtype=dtype))
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).detach().to(dtype)  # [total], a copy of its own
    if flat.device.type == "cpu":
        return HostCopy(shapes, flat)
    buffer = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)  # [total]
    buffer.copy_(flat, non_blocking=True)
    done = torch.Event(device=flat.device)
    done.record()
    return HostCopy(shapes, buffer, done)


def to_host(tensors: dict) -> dict[object, np.ndarray]:
    """{key: device tensor} -> {key: float64 numpy array of the same shape}, in one device-to-host copy."""
    return send_to_host(tensors).wait()

"""One forward pass -> every layer's q and k exactly as the attention used them, reduced on the model's device.

headscope registers a capturing attention function with transformers' AttentionInterface. While a recorder is
active in the current context it runs the model's fused sdpa kernel, with sdpa's own masks (capturing_mask: None
where the kernel's causal flag masks), or the model's own eager attention where the recorder's route says so or
sdpa cannot reproduce it (soft-capping), and records the query, key and value it was given (post-rotary,
post-QK-norm, K at its own key-head count). For every layer it rebuilds softmax(q k^T * scaling + mask) from
those q and k a block of query rows at a time (analysis.patterns) and reduces it on the device to the read-outs,
the head scores' sums and the parity figure (the rebuild against what the model's own kernel returned), so only
per-head numbers and the bounded samples the charts draw cross to the host. Consecutive layers that share a mask
and shapes are reduced as one stack (GROUP_BUDGET), one set of operations for all of them. In measuring mode
(analyze) the q/k measurements run with them, the rest (Mann-Whitney ranks, KDEs) for all layers at once after
the pass (_Recorder.flush), and q and k never leave the device; `capture` keeps them (numpy) so the app can
change layers without a model call. The pass ends at the last layer's attention (_PassDone): nothing after it (that
layer's MLP, the final norm, a head) feeds a measurement.

Several texts run as one padded batch (the tokenizer's padding side, the attention mask respected); each text
is measured on its own positions only, so its numbers equal its single-text run. A corpus pass on a GPU measures
its texts at once instead (TEXTS_AT_ONCE, analysis.batched): their positions are masks over the padded rows.
The recorder lives in a ContextVar, so two threads can analyse with one shared model.
"""

from __future__ import annotations

import inspect
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis import metrics
from analysis.batched import TextsPlan, compute_qk_texts_t, reduce_scores_texts
from analysis.errors import HeadscopeError
from analysis.head_scores import ScorePlan
from analysis.metrics import (
    SPREAD_INPUTS,
    center_dot_products,
    compute_pattern,
    compute_qk_measures_t,
    compute_spread_measures_t,
    device_kind,
)
from analysis.patterns import reduce_pattern, send_to_host

CAPTURE_ATTENTION = "headscope"
EMPTY_TEXT = "The text is empty: type a sentence to analyse."
TOO_LONG = "The text is {n} tokens long but {model} accepts at most {limit}: shorten it."
UNREADABLE = ("The tokenizer cannot read this text ({kind}: {message}): remove unusual characters such as lone "
              "surrogates.")
NO_EAGER = "{cls} has no eager attention function to capture through."
MASK_ROUTE = ("{cls} needs eager attention in a pass whose masks were made for the fused kernel (its scores would go "
              "unmasked): analyse this model with attention='eager'.")
# The one place that decides what T x T memory headscope spends:
PATTERN_BUDGET = 256 * 2**20  # bytes of kept float32 T x T patterns (heatmaps) by default (keep_patterns=None)
WORK_BUDGET = {"cpu": 48 * 2**20, "cuda": 384 * 2**20}  # bytes of float32 temporaries of one block of query rows
# "auto": the fused sdpa kernel on a GPU, where eager attention's T x T weights cost time and memory, and the
# model's own eager attention on the CPU while one layer's weights fit EAGER_BUDGET (every number then bit-equal
# to the notebook's eager model; sdpa's different rounding reaches later layers' q and k at ~1e-5), sdpa beyond.
EAGER_BUDGET = 16 * 2**20  # bytes of one layer's float32 [batch, head, T, T] eager weights on the CPU
ATTENTION_ROUTES = ("auto", "eager", "sdpa")
BAD_ROUTE = "Unknown attention route '{route}': use one of " + ", ".join(ATTENTION_ROUTES) + "."
# The numbers wait on the device for one batched measurement and one copy to the host after the pass; a layer's
# dot products are ~16 MiB at 4096 tokens on a Llama shape, so on a GPU they go earlier once the waiting ones pass
# these bytes (a twelfth of WORK_BUDGET: the batched Mann-Whitney sort and ranks take about seven times their size,
# so the flush's peak stays under the blocks': benchmarks/op_count.py's peak_mib, 262 MiB on the Llama shape at
# 4096 tokens against 468 with a sixth). None: only after the pass (the CPU's memory is the host's).
PENDING_BUDGET = {"cpu": None, "cuda": WORK_BUDGET["cuda"] // 12}
# Consecutive layers that share a mask, scaling and shapes are measured as one group while their float32 q, k
# (repeated to the query heads), v and output and their eager weights fit these bytes per text: stacked along a
# layer dimension, one set of operations for all of them (patterns.reduce_pattern, metrics.compute_qk_measures_t),
# so the launches and the Python overhead per layer shrink with the group's size (a GPU's forward is launch-bound
# below a few thousand tokens). On the Llama shape of the benchmarks that is 4 layers at 1024 tokens and 1 at 4096,
# where memory counts. On the CPU, where launches are cheap, larger stacks were slower (their blocks leave the
# cache: GPT-2's shape, 256 tokens, 77 ms for groups of 32 MiB against 60 ms for 8 MiB).
GROUP_BUDGET = {"cpu": 8 * 2**20, "cuda": 128 * 2**20}
# Closed groups wait, holding their tensors, while they fit these bytes together, and are measured after the pass:
# on the CPU, measuring between the forward's layers was slower (GPT-2's shape, 64 tokens: ~3 ms of ~17); on a GPU
# at once, so that its work overlaps the forward's next layers.
HOLD_BUDGET = {"cpu": 32 * 2**20, "cuda": 0}
# A corpus pass (every layer's q/k measurements and head-score sums, no read-outs) is measured for all its texts at
# once on a GPU, where a few dozen launches per text cost more than the batched forward pass itself
# (analysis.batched; a pass of one text has fewer operations text by text); text by text on the CPU, where each
# text's numbers are then bit-equal whatever its batch.
TEXTS_AT_ONCE = {"cpu": False, "cuda": True}
# Bytes of one chunk of such texts' float64 q, k and dot products (measure_texts): fewer chunks, fewer launches
# (on the Llama shape, 32 texts of ~90 tokens went in 8 chunks at WORK_BUDGET's 384 MiB, a few dozen launches and
# a plan each: the corpus's host-bound cost on an H200).
TEXTS_BUDGET = {"cpu": WORK_BUDGET["cpu"], "cuda": 4 * WORK_BUDGET["cuda"]}
READOUTS = ("final_to_prev", "self_attention", "first_self", "sink_mass")
CENTERED = ("same_head_dp_centered", "diff_head_dp_centered")  # made on the host from the raw ones and "dp_offset"
MEASURE_NAMES = ("q_means", "q_stds", "k_means", "k_stds", "same_head_dp", "diff_head_dp", "same_head_dp_centered",
                 "diff_head_dp_centered", "mannwhitney", "mannwhitney_centered", "dp_counts")  # what Capture.measures
# can hold (a corpus pass measured at once keeps the Mann-Whitney parts and the groups' sizes, not the dot products)
QUERY_RANGE = ("Query position {p} is out of range: the text has {n} token(s), so use 0..{last} (or -1..-{n} "
               "counting from the end).")
QUERY_DEFAULTS = {True: "the final token (default for causal models)",
                  False: "the last non-special token (default for encoders)"}
QUERY_ALL_SPECIAL = "the final token (every token is special)"

_RECORDER: ContextVar[_Recorder | None] = ContextVar("headscope_recorder", default=None)


def patterns_fit(n_heads: int, n_tokens: int, n_layers: int) -> bool:
    """Whether `n_layers` float32 T x T patterns fit PATTERN_BUDGET (the default of keep_patterns)."""
    return pattern_bytes(n_heads, n_tokens, n_layers) <= PATTERN_BUDGET


def resolve_query(special, causal: bool, query_position: int | None = None) -> tuple[int, str]:
    """(the absolute query position P, how it was chosen) for a text with special-token flags `special` [pos].

    None: the final token on a causal model (the notebook's choice), on an encoder the last token that is not a
    special one ([SEP] is appended by the tokenizer), or the final token if every token is special. An int
    counts from the end when negative; out of range raises HeadscopeError."""
    special = np.asarray(special, dtype=bool)  # [pos]
    n = special.size
    if query_position is None:
        words = np.flatnonzero(~special)  # [pos]
        if not causal and words.size == 0:
            return n - 1, QUERY_ALL_SPECIAL
        return (n - 1 if causal else int(words[-1])), QUERY_DEFAULTS[causal]
    if isinstance(query_position, bool) or not isinstance(query_position, int | np.integer) \
            or not -n <= query_position < n:
        raise HeadscopeError(QUERY_RANGE.format(p=query_position, n=n, last=n - 1))
    return int(query_position) % n, "chosen"


def work_budget(device) -> int:
    return WORK_BUDGET[device_kind(device)]


@dataclass(frozen=True, eq=False)
class Capture:
    """What one forward pass recorded: numpy only, picklable (cacheable by Streamlit)."""

    text: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray  # [pos]
    special: np.ndarray  # [pos] bool: BOS/CLS/SEP and other special tokens
    q: tuple[np.ndarray, ...]  # per layer [head, pos, d_head] float32
    k: tuple[np.ndarray, ...]  # per layer [kv_head, pos, d_head] float32
    summaries: dict[int, dict[str, np.ndarray]]  # requested layers: the pattern's read-outs (READOUTS)
    parity: dict[int, float]  # requested layers: max |rebuild - the model's own weights or output|
    patterns: dict[int, np.ndarray]  # requested layers when kept: [head, q_pos, k_pos] float32
    score_parts: np.ndarray | None = None  # every layer: [layer, head, 4, 4] float64, see head_scores.PARTS
    score_fixed: np.ndarray | None = None  # every layer: [layer, head, 3] float64: sink, self, entropy
    query_position: int | None = None  # the absolute row P whose read-out `summaries` hold (None: the final one)
    key_skip: np.ndarray | None = None  # [pos] bool: keys left out of that read-out (None: none)
    measures: dict[int, dict[str, np.ndarray]] | None = None  # measured passes: per layer, the q/k measurements
    # (metrics.compute_qk_measures_t's names, "mannwhitney*" parts where the device ranked them)
    exclude_first_token: bool | None = None  # what those measurements were taken with
    parity_score_max: dict[int, float] = field(default_factory=dict)  # requested layers of a half-precision model:
    # the largest |row maximum of the scores|, what the parity tolerance scales with (analysis.parity)


@dataclass
class TextInput:
    """One text ready for the model: its token ids [pos], special-token flags [pos] and other model inputs."""

    text: str
    ids: np.ndarray  # [pos] int64
    special: np.ndarray  # [pos] bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. token_type_ids [pos]


@dataclass
class _Text:
    """What the pass records for one text of the batch."""

    index: int  # row in the batch
    span: tuple[int, int]  # its positions in the padded row
    ids: np.ndarray  # [pos]
    keep_patterns: bool
    plan: ScorePlan | None = None
    query_position: int | None = None  # absolute; None: the recorder's
    skip: np.ndarray | None = None  # [pos] bool: keys left out of the query's dot products and read-out
    q: list[np.ndarray] = field(default_factory=list)  # capture mode: per layer [head, pos, d_head] float32
    k: list[np.ndarray] = field(default_factory=list)
    device: dict[tuple, torch.Tensor] = field(default_factory=dict)  # (layers, name) -> [layer, ...] small tensor
    host: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # the same, moved in one copy
    patterns: dict[int, np.ndarray] = field(default_factory=dict)
    measured: list[tuple[int, ...]] = field(default_factory=list)  # groups whose spread measures wait (flush)
    together: dict[str, np.ndarray] | None = None  # a pass measured at once (TEXTS_AT_ONCE): {name: [text, layer,
    # ...]} of every layer, shared by the pass's texts (this one is row `index`), so the corpus reduces them at once


@dataclass(eq=False)
class _Group:
    """Consecutive layers measured as one stack (GROUP_BUDGET)."""

    shares: tuple  # what its layers share: the mask's id, scaling, softcap, shapes, dtype, wanted, kept
    mask: torch.Tensor | None  # held, so that the mask's id stays its own
    scaling: float
    softcap: float | None
    wanted: bool  # read-outs, parity and q/k measurements (a pattern layer), or the head scores' sums only
    keep: bool  # the T x T patterns kept
    layers: list[tuple] = field(default_factory=list)  # (layer, query, key, value, weights, output)
    bytes: int = 0  # per text (GROUP_BUDGET's measure)


@dataclass
class _Recorder:
    texts: list[_Text]
    pattern_layers: frozenset[int] | None  # None: every layer
    keep_qk: bool = True  # capture mode: q and k to the host
    measure: bool = False  # analyze mode: the q/k measurements in the pass, on the device
    measure_all: bool = False  # and on every layer, not only the pattern layers (the corpus: no read-outs)
    exclude_first_token: bool = True
    query_position: int = -1
    attention: str = "auto"  # ATTENTION_ROUTES
    keep_layers: frozenset[int] | None = None  # whose patterns are kept (None: every pattern layer)
    n_layers: int = 0
    causal: bool = True  # the model's masks (loading.attention_is_causal): the query's keys, earlier ones (causal)
    # or every other one, and the fused kernel's causal flag where it gets no mask
    n_heads: int = 0  # the model's query heads: what the mask function's route needs
    sdpa_masks: bool = False  # the pass's masks are sdpa's (None: the kernel's causal flag), for the fused kernel
    pending: int = 0  # bytes of device tensors waiting for the host
    groups: list[_Group] = field(default_factory=list)  # closed, then the open one: waiting to be measured
    held: int = 0  # their bytes, every text of the batch (GROUP_BUDGET's measure)
    plans: dict = field(default_factory=dict)  # (first text, last + 1, device) -> TextsPlan (TEXTS_AT_ONCE)
    together: dict = field(default_factory=dict)  # (layers, name) -> chunks of [text, layer, ...] waiting (the same)
    together_host: dict = field(default_factory=dict)  # name -> per group (layers, [text, layer, ...] on the host)
    copies: list = field(default_factory=list)  # each flush's HostCopy, in order, until collected
    stop_after: int | None = None  # attention calls after which the pass ends (_PassDone): the model's layer count

    def fused(self, batch: int, heads: int, n: int, device: torch.device) -> bool:
        """Whether a layer of `heads` heads over a [batch, n] pass on `device` runs the fused sdpa kernel."""
        if self.attention != "auto":
            return self.attention == "sdpa"
        return device.type != "cpu" or batch * heads * n * n * 4 > EAGER_BUDGET

    def record(self, query, key, value, attention_mask, scaling, softcap, weights, output) -> None:
        """One layer's tensors (layer order): they join the open group when they share its mask, scaling and
        shapes and fit GROUP_BUDGET, else they open the next; past HOLD_BUDGET the waiting groups are measured."""
        layer = self.n_layers  # attention modules run once each, in layer order
        self.n_layers += 1
        wanted = self.pattern_layers is None or layer in self.pattern_layers
        keep = wanted and (self.keep_layers is None or layer in self.keep_layers)
        shares = (id(attention_mask), scaling, softcap, weights is None, tuple(query.shape), tuple(key.shape),
                  tuple(value.shape), query.dtype, wanted, keep)
        size = 4 * (2 * query.numel() + value.numel() + output.numel()) + (  # float32 q, repeated k, v, output
            0 if weights is None else weights.numel() * weights.element_size())
        per_text = size // query.shape[0]  # what groups count: so each text's groups, blocks of query rows and sums'
        # rounding never depend on its batch
        kind = device_kind(query.device)
        group = self.groups[-1] if self.groups else None
        if group is None or group.shares != shares or group.bytes + per_text > GROUP_BUDGET[kind]:
            if self.held + size > HOLD_BUDGET[kind]:
                self.measure_groups()
            group = _Group(shares, attention_mask, scaling, softcap, wanted, keep)
            self.groups.append(group)
        group.layers.append((layer, query, key, value, weights, output))
        group.bytes += per_text
        self.held += size

    def measure_groups(self) -> None:
        for group in self.groups:
            self.measure_group(group)
        self.groups, self.held = [], 0

    def measure_group(self, group: _Group) -> None:
        """Measure a group's layers as one [layer, ...] stack: text by text, or a corpus group's texts at once
        where TEXTS_AT_ONCE says so; past PENDING_BUDGET the waiting numbers go to the host."""
        device = group.layers[0][1].device
        kind = device_kind(device)
        layers = tuple(entry[0] for entry in group.layers)
        if self.measure_all and not group.wanted and not self.keep_qk and len(self.texts) > 1 and TEXTS_AT_ONCE[kind]:
            self.measure_texts(group, layers, work_budget(device))
        else:
            self.measure_each(group, layers, work_budget(device))
        budget = PENDING_BUDGET[kind]
        if budget is not None and self.pending > budget:  # bounded device memory
            self.flush()

    def measure_each(self, group: _Group, layers: tuple[int, ...], budget: int) -> None:
        """Measure a group's layers text by text, each on its own positions."""
        attention_mask, wanted, entries = group.mask, group.wanted, group.layers
        device = entries[0][1].device

        def stacked(index: int, where: tuple) -> torch.Tensor | None:
            """[layer, ...]: every layer's tensor `index` at `where`, stacked (a view for a single layer)."""
            if entries[0][index] is None:
                return None
            parts = [entry[index][where] for entry in entries]
            return parts[0][None] if len(parts) == 1 else torch.stack(parts)

        if self.keep_qk:  # a copy to the host per layer for every text of the batch, in the model's dtype
            host_q = [entry[1].cpu().float().numpy() for entry in entries]  # per layer [batch, head, pos, d_head]
            host_k = [entry[2].cpu().float().numpy() for entry in entries]  # per layer [batch, kv_head, pos, d_head]
        for text in self.texts:
            b, positions = text.index, slice(*text.span)
            q = stacked(1, (b, slice(None), positions))  # [layer, head, pos, d_head]
            k = stacked(2, (b, slice(None), positions))  # [layer, kv_head, pos, d_head]
            if self.keep_qk:  # copies of the text's own positions, apart from the batch and the model's memory
                text.q.extend(np.array(x[b, :, positions]) for x in host_q)  # per layer [head, pos, d_head]
                text.k.extend(np.array(x[b, :, positions]) for x in host_k)  # per layer [kv_head, pos, d_head]
            mask = None
            if attention_mask is not None:
                row = attention_mask[b if attention_mask.shape[0] > 1 else 0]  # [1, q_pos, k_pos]
                mask = row[:, positions, positions]  # [1, pos, pos]
            if text.plan is None or text.plan.q_index.device != device:
                text.plan = ScorePlan.build(text.ids, device, self.causal)  # an encoder's pairs: later copies too
            p = self.query_position if text.query_position is None else text.query_position
            against_output = wanted and entries[0][4] is None  # parity against the kernel's output, not weights
            reduced = reduce_pattern(
                q, k, group.scaling, mask, group.softcap, text.plan, budget, readouts=wanted, query_position=p,
                causal=self.causal, skip=text.skip,
                weights=stacked(4, (b, slice(None), positions, positions)) if wanted else None,  # [l, h, pos, pos]
                value=stacked(3, (b, slice(None), positions)) if against_output else None,  # [layer, kv_head, pos, d_v]
                output=stacked(5, (b, positions)).transpose(1, 2) if against_output else None,  # [l, head, pos, d_v]
                keep=group.keep and text.keep_patterns,
                rebuild=compute_pattern if wanted else metrics.compute_pattern)  # the analysed layers' rebuild is
            # looked up here, so a test can replace it and see parity fail on those layers alone
            found = {"parts": reduced.parts, "fixed": reduced.fixed}  # [layer, ...] each
            if wanted:
                found.update(reduced.readouts)
                if reduced.parity is not None:
                    found["parity"] = reduced.parity
                if reduced.score_max is not None:
                    found["score_max"] = reduced.score_max
                if reduced.pattern is not None:
                    text.patterns.update(zip(layers, reduced.pattern))  # [head, q_pos, k_pos] each
            if self.measure and (wanted or self.measure_all):
                found.update(compute_qk_measures_t(q, k, self.exclude_first_token, p, causal=self.causal,
                                                   skip=text.skip))
                text.measured.append(layers)
            text.device.update({(layers, name): tensor for name, tensor in found.items()})
            self.pending += sum(tensor.numel() for tensor in found.values()) * 8  # bytes waiting for the host

    def measure_texts(self, group: _Group, layers: tuple[int, ...], budget: int) -> None:
        """Measure a corpus group's layers for every text of the batch at once (analysis.batched), in chunks of
        texts whose float64 q, k, dot products and their ranks fit TEXTS_BUDGET; `budget`: the blocks' (WORK_BUDGET)."""
        q = torch.stack([entry[1] for entry in group.layers], dim=1)  # [batch, layer, head, W, d_head]
        k = torch.stack([entry[2] for entry in group.layers], dim=1)  # [batch, layer, kv_head, W, d_head]
        n_texts, n_layers, n_heads, width, d_head = q.shape
        n_kv = k.shape[2]
        per_text = 8 * n_layers * width * (10 * n_heads * n_kv + 2 * (n_heads + n_kv) * d_head)  # bytes: the dot
        # products' float64 or int64 [layer, 2, head, kv_head, W] five times while they are ranked (batched), and
        # twice float64 q and k while their statistics are taken
        size = max(1, TEXTS_BUDGET[device_kind(q.device)] // per_text)
        for first in range(0, n_texts, size):
            chunk = slice(first, min(n_texts, first + size))
            plan = self.texts_plan(chunk, width, q.device)
            mask = group.mask
            if mask is not None and mask.shape[0] > 1:
                mask = mask[chunk]  # [text, 1, W, W]
            parts, fixed = reduce_scores_texts(q[chunk], k[chunk], group.scaling, mask, group.softcap, plan, budget,
                                               self.causal)  # [text, layer, ...] each
            found = {"parts": parts, "fixed": fixed}
            if self.measure:
                found.update(compute_qk_texts_t(q[chunk], k[chunk], plan))
            for name, tensor in found.items():
                self.together.setdefault((layers, name), []).append(tensor)
            self.pending += sum(tensor.numel() for tensor in found.values()) * 8  # bytes waiting for the host

    def texts_plan(self, chunk: slice, width: int, device: torch.device) -> TextsPlan:
        """The TextsPlan of the batch's texts `chunk`, made once per pass."""
        key = (chunk.start, chunk.stop, device)
        if key not in self.plans:
            texts = self.texts[chunk]
            self.plans[key] = TextsPlan.build(
                [(text.ids, text.span, self.query_position % text.ids.size if text.query_position is None
                  else text.query_position, text.skip) for text in texts], width, self.exclude_first_token,
                self.causal, device)
        return self.plans[key]

    def flush(self) -> None:
        """Measure the waiting groups of every text at once (compute_spread_measures_t: one sort, one kernel sum)
        and send every waiting number to the host in one copy: once per pass unless the device's work budget
        says sooner. An earlier flush's numbers are collected first, while the device still works on the layers
        queued since."""
        self.collect()
        for text in self.texts:
            if text.measured:
                groups, text.measured = text.measured, []
                measures = {name: _cat([text.device[group, name] for group in groups]) for name in SPREAD_INPUTS
                            if all((group, name) in text.device for group in groups)}  # read-outs: pattern layers
                layers = tuple(layer for group in groups for layer in group)
                spread = compute_spread_measures_t(measures)  # {name: [layer, ...]}
                text.device.update({(layers, name): tensor for name, tensor in spread.items()})
        waiting = {(i, *key): tensor for i, text in enumerate(self.texts) for key, tensor in text.device.items()
                   if key[1] not in CENTERED}  # the host centers the raw dot products with the offsets (collect)
        waiting.update({(None, *key): _cat(chunks) for key, chunks in self.together.items()})  # [text, layer, ...]
        self.copies.append(send_to_host(waiting))
        for text in self.texts:
            text.device.clear()
        self.together, self.pending = {}, 0

    def collect(self) -> None:
        """The sent numbers, on the host, to their texts."""
        for copy in self.copies:
            for (i, layers, name), values in copy.wait().items():  # [layer, ...] (one text) or [text, layer, ...]
                if i is None:
                    self.together_host.setdefault(name, []).append((layers, values))  # groups come in layer order
                    rows = ((text, values[text.index]) for text in self.texts)
                else:
                    rows = ((self.texts[i], values),)
                for text, per_layer in rows:
                    text.host.update({(layer, name): row for layer, row in zip(layers, per_layer)})
        for text in self.texts:
            for layer in [layer for layer, name in text.host if name == "dp_offset"]:
                offset = text.host.pop((layer, "dp_offset"))  # [head, kv_head]
                centered = center_dot_products(text.host[layer, "same_head_dp"], text.host[layer, "diff_head_dp"],
                                               offset)  # (same, diff), bit for bit the device's
                text.host.update({(layer, name): values for name, values in zip(CENTERED, centered)})
        self.copies = []

    def finish(self) -> None:
        self.measure_groups()
        self.flush()
        self.collect()
        layers = [layer for layers, _ in self.together_host.get("parts", ()) for layer in layers]
        if layers == list(range(self.n_layers)):  # every layer measured at once: their numbers, shared
            together = {name: np.concatenate([values for _, values in groups], axis=1)
                        for name, groups in self.together_host.items()}  # [text, layer, ...] each
            for text in self.texts:
                text.together = together


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


_EAGER: dict[type, object] = {}


def _eager_for(module: torch.nn.Module):
    """The model's own eager attention function, from the module's modeling file."""
    cls = type(module)
    if cls not in _EAGER:
        eager = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
        if eager is None:
            raise HeadscopeError(NO_EAGER.format(cls=cls.__name__))
        _EAGER[cls] = eager
    return _EAGER[cls]


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


class _PassDone(Exception):
    """Raised by the last layer's capturing attention to end a recording pass (caught by run_pass)."""


def capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Idle: the model's own eager attention (output_attentions works). Recording: the fused sdpa kernel where the
    recorder's route says so (ATTENTION_ROUTES), unless the layer soft-caps its scores (sdpa cannot); the
    recorder gets what the kernel returned, and the last layer's call ends the pass (_PassDone)."""
    recorder = _RECORDER.get()
    softcap = kwargs.get("softcap")
    if recorder is None or softcap or not recorder.fused(query.shape[0], query.shape[1], query.shape[2],
                                                         query.device):
        if recorder is not None and recorder.sdpa_masks:  # eager attention would read sdpa's None as "no mask"
            raise HeadscopeError(MASK_ROUTE.format(cls=type(module).__name__))
        output, weights = _eager_for(module)(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)
    else:  # where it gets no mask the kernel's causal flag follows the model's masks (recorder.causal), not the
        # module's is_causal: Gemma 2's use_bidirectional_attention clears that alone, its eager masks stay causal
        causal = kwargs.pop("is_causal", recorder.causal)
        output, weights = _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal, **kwargs)
    if recorder is not None:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        recorder.record(query, key, value, attention_mask, scale, softcap, weights, output)
        if recorder.n_layers == recorder.stop_after:
            raise _PassDone  # what follows the last attention (its output projection, MLP, final norm) measures nothing
    return output, weights


def capturing_mask(**kwargs):
    """The mask function of the capturing attention. Idle, and in a pass on the eager route: the model's eager
    additive mask [batch, 1, q_pos, k_pos]. In a pass that runs the fused kernel (the recorder's route, as
    capturing_attention decides it, unless the model soft-caps its scores): sdpa's own mask, None where the
    kernel's causal flag does the masking (no T x T mask in memory, and the kernel can skip the masked half) and
    boolean where it cannot (padding, a sliding window shorter than the text). The rebuild reads either."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    recorder = _RECORDER.get()
    batch, n = kwargs.get("batch_size"), kwargs.get("kv_length")  # eager's mask (which sdpa also reads) without them
    if recorder is not None and batch is not None and n is not None and not getattr(
            kwargs.get("config"), "attn_logit_softcapping", None) and recorder.fused(
            batch, recorder.n_heads, n, torch.device(kwargs.get("device", "cpu"))):
        recorder.sdpa_masks = True
        return sdpa_mask(**kwargs)
    return eager_mask(**kwargs)


def register_capture_attention() -> None:
    """Register the capturing function and its mask function under one name (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAPTURE_ATTENTION, capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, capturing_mask)


def tokenize(loaded, text: str) -> dict:
    if not text or not text.strip():
        raise HeadscopeError(EMPTY_TEXT)
    encoded = loaded.tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    n = encoded["input_ids"].shape[1]
    limit = loaded.info.max_positions
    if n > limit:
        raise HeadscopeError(TOO_LONG.format(n=n, model=loaded.info.id, limit=limit))
    if n == 0:
        raise HeadscopeError(EMPTY_TEXT)
    return encoded


def pattern_bytes(n_heads: int, n_tokens: int, n_layers: int) -> int:
    """What keeping `n_layers` float32 T x T patterns costs."""
    return n_layers * n_heads * n_tokens * n_tokens * 4


def marked_special_ids(tokenizer) -> list[int]:
    """The special tokens' ids that headscope marks as special (special_positions: never the default query, left
    out by exclude_special_keys): every special id but the unknown token's, which stands for a word of the text
    (MiniLM's [UNK] for an emoji), unless it is also a token with a role (GPT-2's <|endoftext|> is BOS, EOS and UNK)."""
    roles = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id,
             tokenizer.sep_token_id, tokenizer.mask_token_id}
    return [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id or i in roles]


def unk_is_word(tokenizer) -> bool:
    """Whether marked_special_ids leaves this tokenizer's unknown token out (a word of the text since 55af575, a
    special token before): true for BERT/MiniLM's [UNK], false for GPT-2's <|endoftext|> or a tokenizer without one.
    Only then do the default query and key sets differ from those of earlier code."""
    unk = tokenizer.unk_token_id
    return unk is not None and unk in tokenizer.all_special_ids and unk not in marked_special_ids(tokenizer)


def text_input(loaded, text: str) -> TextInput:
    """Tokenize one text (special tokens added) and check it, or raise HeadscopeError."""
    [item] = text_inputs(loaded, [text])
    if isinstance(item, HeadscopeError):
        raise item
    return item


def text_inputs(loaded, texts: list[str]) -> list[TextInput | HeadscopeError]:
    """text_input of many texts with one call of the tokenizer (a corpus's batch): each text's TextInput, or the
    HeadscopeError of a text that is empty or too long."""
    out: list[TextInput | HeadscopeError] = [HeadscopeError(EMPTY_TEXT)] * len(texts)
    written = [i for i, text in enumerate(texts) if text and text.strip()]
    if not written:
        return out
    try:
        encoded = loaded.tokenizer([texts[i] for i in written], return_special_tokens_mask=True)
    except Exception as exc:  # noqa: BLE001 - a text the tokenizer refuses (a lone surrogate): its own error
        if len(written) > 1:
            return [item for text in texts for item in text_inputs(loaded, [text])]
        out[written[0]] = HeadscopeError(UNREADABLE.format(kind=type(exc).__name__, message=exc))
        return out
    limit, all_special = loaded.info.max_positions, marked_special_ids(loaded.tokenizer)
    for row, i in enumerate(written):
        ids = np.asarray(encoded["input_ids"][row], dtype=np.int64)  # [pos]
        if ids.size > limit:
            out[i] = HeadscopeError(TOO_LONG.format(n=ids.size, model=loaded.info.id, limit=limit))
        elif ids.size:
            special = np.asarray(encoded["special_tokens_mask"][row], dtype=bool)  # [pos]: the ones it added
            special |= np.isin(ids, all_special)  # [pos]: typed ones too ([UNK] is a word, not one of them)
            extra = {name: np.asarray(values[row], dtype=np.int64) for name, values in encoded.items()
                     if name not in ("input_ids", "attention_mask", "special_tokens_mask")}  # each [pos]
            out[i] = TextInput(texts[i], ids, special, extra)
    return out


def ids_input(loaded, token_ids) -> TextInput:
    """Token ids taken as they are (no special tokens added), e.g. the induction probe."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [pos]
    n, limit = ids.size, loaded.info.max_positions
    if n == 0:
        raise HeadscopeError(EMPTY_TEXT)
    if n > limit:
        raise HeadscopeError(TOO_LONG.format(n=n, model=loaded.info.id, limit=limit))
    special = np.isin(ids, marked_special_ids(loaded.tokenizer))  # [pos]
    text = loaded.tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)
    return TextInput(text, ids, special)


def capture(loaded, text: str, pattern_layers=None, keep_patterns: bool | None = None, *,
            query_position: int | None = None, exclude_special_keys: bool = False) -> Capture:
    """Run the model once on `text`: q/k for every layer; for `pattern_layers` (None: all) the pattern's
    read-outs and parity, and the T x T patterns themselves when `keep_patterns` (None: if they fit in
    PATTERN_BUDGET). The query read-out is row `query_position` (resolve_query; None: the default row);
    pipeline.summarize measures any other row from the kept patterns."""
    return capture_input(loaded, text_input(loaded, text), pattern_layers, keep_patterns,
                         query_position=query_position, exclude_special_keys=exclude_special_keys)


def capture_ids(loaded, token_ids, pattern_layers=None, keep_patterns: bool | None = None) -> Capture:
    """As `capture`, for token ids given as they are (no special tokens added), e.g. the induction probe."""
    return capture_input(loaded, ids_input(loaded, token_ids), pattern_layers, keep_patterns)


def capture_input(loaded, item: TextInput, pattern_layers=None, keep_patterns: bool | None = None,
                  attention: str = "auto", *, query_position: int | None = None,
                  exclude_special_keys: bool = False) -> Capture:
    p, _ = resolve_query(item.special, loaded.info.causal, query_position)
    skip = item.special.copy() if exclude_special_keys else None  # [pos]
    [text] = run_pass(loaded, [item], pattern_layers, keep_patterns, keep_qk=True, attention=attention,
                      queries=[(p, skip)])
    return to_capture(loaded, item, text)


def to_capture(loaded, item: TextInput, text: _Text, exclude_first_token: bool | None = None) -> Capture:
    """`exclude_first_token`: what a measuring pass (run_pass's `measure`) took its q/k measurements with."""
    layers = sorted({layer for layer, _ in text.host})
    summaries = {layer: {name: text.host[layer, name] for name in READOUTS} for layer in layers
                 if (layer, "final_to_prev") in text.host}
    measures = {layer: {name: text.host[layer, name] for name in MEASURE_NAMES if (layer, name) in text.host}
                for layer in layers if (layer, "q_means") in text.host}
    return Capture(
        text=item.text,
        tokens=token_strings(loaded.tokenizer, item.ids),
        token_ids=item.ids,
        special=item.special,
        q=tuple(text.q),
        k=tuple(text.k),
        summaries=summaries,
        parity={layer: float(text.host[layer, "parity"]) for layer in summaries},
        patterns=text.patterns,
        score_parts=np.stack([text.host[layer, "parts"] for layer in layers]),  # [layer, head, 4, 4]
        score_fixed=np.stack([text.host[layer, "fixed"] for layer in layers]),  # [layer, head, 3]
        query_position=text.query_position,
        key_skip=text.skip,
        measures=measures or None,
        exclude_first_token=exclude_first_token if measures else None,
        parity_score_max={layer: float(text.host[layer, "score_max"]) for layer in summaries
                          if (layer, "score_max") in text.host},
    )


def token_strings(tokenizer, ids: np.ndarray) -> tuple[str, ...]:
    return tuple(tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids.tolist())


def _accepts_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


POSITIONS_PAST_PADDING = ("roberta",)  # model types whose embeddings count positions from padding_idx + 1


def first_position(config) -> int:
    """The position id of a text's first token: padding_idx + 1 where the model counts positions past its padding
    index (RoBERTa: 2, so 514 position embeddings hold 512 tokens), else 0."""
    return (config.pad_token_id or 0) + 1 if config.model_type in POSITIONS_PAST_PADDING else 0


def pad_batch(loaded, items: list[TextInput], width: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                              list[tuple[int, int]]]:
    """The model inputs of a padded batch ({name: [batch, pos]}) and each text's (start, stop) in its row.

    Padding goes on the tokenizer's padding side, with its pad token (else EOS, else 0); with left padding
    the position ids count from each text's first token (first_position), so every text sees the positions of its
    single run.
    `width`: pad every row to at least this many positions (default: the longest text's).
    """
    tokenizer = loaded.tokenizer
    width = max(width or 0, *(item.ids.size for item in items))
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    names = ["input_ids", "attention_mask", *sorted({name for item in items for name in item.extra})]
    batch = {name: np.full((len(items), width), pad if name == "input_ids" else 0, dtype=np.int64) for name in names}
    spans = []
    for row, item in enumerate(items):
        n = item.ids.size
        start = width - n if left else 0
        spans.append((start, start + n))
        batch["input_ids"][row, start:start + n] = item.ids
        batch["attention_mask"][row, start:start + n] = 1
        for name, values in item.extra.items():
            batch[name][row, start:start + n] = values
    encoded = {name: torch.from_numpy(values) for name, values in batch.items()}  # each [batch, pos]
    if left and any(item.ids.size < width for item in items) and _accepts_position_ids(loaded.model):
        encoded["position_ids"] = (encoded["attention_mask"].cumsum(-1) - 1).clamp_(min=0).add_(
            first_position(loaded.model.config))  # [batch, pos]
    return encoded, spans


def run_pass(loaded, items: list[TextInput], pattern_layers=None, keep_patterns: bool | None = None,
             keep_qk: bool = False, measure: bool = False, exclude_first_token: bool = True,
             query_position: int = -1, attention: str = "auto", keep_layers=None, *,
             queries: list | None = None, width: int | None = None, measure_all: bool = False) -> list[_Text]:
    """One forward pass over `items` as a padded batch; what each text recorded, its numbers on the host.

    `measure`: the q/k measurements (metrics.compute_qk_measures_t, and after the pass the Mann-Whitney parts and
    the KDEs) on the device for the pattern layers, on every layer with `measure_all`.
    `keep_layers`: the pattern layers whose T x T patterns are kept when keep_patterns allows (None: all).
    `queries`: per text (absolute query position, [pos] bool keys to skip or None); None: `query_position` for
    every text, no keys skipped. The query's keys follow the model: earlier ones if causal, else every other.
    `width`: the padded length of every row (pad_batch; default the longest text's)."""
    if attention not in ATTENTION_ROUTES:
        raise HeadscopeError(BAD_ROUTE.format(route=attention))
    encoded, spans = pad_batch(loaded, items, width)
    kept_layers = pattern_layers if keep_layers is None else keep_layers
    n_pattern_layers = loaded.info.n_layers if kept_layers is None else len(set(kept_layers))
    queries = [(None, None)] * len(items) if queries is None else queries
    texts = [_Text(index=row, span=span, ids=item.ids,
                   keep_patterns=patterns_fit(loaded.info.n_heads, item.ids.size, n_pattern_layers)
                   if keep_patterns is None else bool(keep_patterns), query_position=query, skip=skip)
             for row, (item, span, (query, skip)) in enumerate(zip(items, spans, queries))]
    recorder = _Recorder(texts, None if pattern_layers is None else frozenset(pattern_layers), keep_qk=keep_qk,
                         measure=measure, exclude_first_token=exclude_first_token, query_position=query_position,
                         attention=attention, keep_layers=None if keep_layers is None else frozenset(keep_layers),
                         causal=bool(getattr(loaded.info, "causal", True)), measure_all=measure_all,
                         n_heads=loaded.info.n_heads, stop_after=loaded.info.n_layers)
    token = _RECORDER.set(recorder)
    try:
        with torch.inference_mode():
            loaded.model(**{name: t.to(loaded.info.device) for name, t in encoded.items()})
    except _PassDone:  # the last layer's attention was recorded: the rest of the pass would measure nothing
        pass
    finally:
        _RECORDER.reset(token)
    if recorder.n_layers != loaded.info.n_layers:
        raise HeadscopeError(f"Captured {recorder.n_layers} attention calls for {loaded.info.n_layers} layers.")
    with torch.inference_mode():  # the deferred layers' tensors were made in it
        recorder.finish()
    return texts

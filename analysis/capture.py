"""One forward pass -> every layer's q and k exactly as the attention used them.

headscope registers a capturing attention function with transformers' AttentionInterface. It calls
the model's own eager attention and, while a recorder is active in the current context, records the
query and key it was given (post-rotary, post-QK-norm, K at its own key-head count). For the layers
whose patterns are wanted it rebuilds softmax(q k^T * scaling + mask) from those q and k and
compares it with the weights the eager call returned: the parity figure costs no second pass. For every
layer it also reduces those weights to the head scores' sums (analysis.head_scores), so the scores cover the
whole model while only the requested layers' T x T patterns are kept.
The recorder lives in a ContextVar, so two threads can analyse with one shared model.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.errors import HeadscopeError
from analysis.head_scores import ScorePlan, compute_score_parts
from analysis.metrics import compute_attention_summaries, compute_pattern

CAPTURE_ATTENTION = "headscope"
EMPTY_TEXT = "The text is empty: type a sentence to analyse."
TOO_LONG = "The text is {n} tokens long but {model} accepts at most {limit}: shorten it."
NO_EAGER = "{cls} has no eager attention function to capture through."
PATTERN_BUDGET = 256 * 2**20  # bytes of T x T patterns kept by default (keep_patterns=None)

_RECORDER: ContextVar[_Recorder | None] = ContextVar("headscope_recorder", default=None)


@dataclass(frozen=True, eq=False)
class Capture:
    """What one forward pass recorded: numpy only, picklable (cacheable by Streamlit)."""

    text: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray  # [pos]
    special: np.ndarray  # [pos] bool: BOS/CLS/SEP and other special tokens
    q: tuple[np.ndarray, ...]  # per layer [head, pos, d_head] float32
    k: tuple[np.ndarray, ...]  # per layer [kv_head, pos, d_head] float32
    summaries: dict[int, dict[str, np.ndarray]]  # requested layers: the pattern's read-outs (metrics.SUMMARIES)
    parity: dict[int, float]  # requested layers: max |pattern - the model's own weights|
    patterns: dict[int, np.ndarray]  # requested layers when kept: [head, q_pos, k_pos] float32
    score_parts: np.ndarray | None = None  # every layer: [layer, head, 4, 4] float64, see head_scores.PARTS
    score_fixed: np.ndarray | None = None  # every layer: [layer, head, 3] float64: sink, self, entropy


@dataclass
class _Recorder:
    pattern_layers: frozenset[int] | None  # None: every layer
    keep_patterns: bool = True  # False: reduce each pattern to its read-outs and let it go
    token_ids: np.ndarray | None = None  # [pos]: for the head scores' detection patterns; None: no scores
    q: list[np.ndarray] = field(default_factory=list)
    k: list[np.ndarray] = field(default_factory=list)
    summaries: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    parity: dict[int, float] = field(default_factory=dict)
    patterns: dict[int, np.ndarray] = field(default_factory=dict)
    score_parts: list[torch.Tensor] = field(default_factory=list)  # per layer [head, 4, 4], on the device
    score_fixed: list[torch.Tensor] = field(default_factory=list)  # per layer [head, 3], on the device
    plan: ScorePlan | None = None

    def record(self, query, key, attention_mask, scaling, softcap, weights) -> None:
        layer = len(self.q)  # attention modules run once each, in layer order
        q = query[0].detach().float()  # [head, pos, d_head]
        k = key[0].detach().float()  # [kv_head, pos, d_head]
        self.q.append(q.cpu().numpy().copy())  # [head, pos, d_head], detached from the model
        self.k.append(k.cpu().numpy().copy())  # [kv_head, pos, d_head]
        if self.pattern_layers is None or layer in self.pattern_layers:
            mask = None if attention_mask is None else attention_mask[0, :, :, : k.shape[-2]]  # [1, q_pos, k_pos]
            pattern = compute_pattern(q, k, scaling, mask, softcap)  # [head, q_pos, k_pos]
            self.parity[layer] = float(torch.sub(pattern, weights[0]).abs_().max())  # one temporary
            pattern = pattern.cpu().numpy()  # [head, q_pos, k_pos]
            self.summaries[layer] = compute_attention_summaries(pattern)  # small copies
            if self.keep_patterns:
                self.patterns[layer] = pattern
        if self.token_ids is not None:
            if self.plan is None or self.plan.q_index.device != weights.device:
                self.plan = ScorePlan.build(self.token_ids, weights.device)
            parts, fixed = compute_score_parts(weights[0].detach(), self.plan)  # [head, 4, 4], [head, 3]
            self.score_parts.append(parts)
            self.score_fixed.append(fixed)


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


def capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    output, weights = _eager_for(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder = _RECORDER.get()
    if recorder is not None:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        recorder.record(query, key, attention_mask, scale, kwargs.get("softcap"), weights)
    return output, weights


def register_capture_attention() -> None:
    """Register the capturing function and the eager mask under one name (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CAPTURE_ATTENTION, capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, eager_mask)


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


def capture(loaded, text: str, pattern_layers=None, keep_patterns: bool | None = None) -> Capture:
    """Run the model once on `text`: q/k for every layer; for `pattern_layers` (None: all) the pattern's
    read-outs and parity, and the T x T patterns themselves when `keep_patterns` (None: if they fit in
    PATTERN_BUDGET)."""
    encoded = tokenize(loaded, text)
    special = encoded.pop("special_tokens_mask")[0].numpy().astype(bool)  # [pos]: the ones the tokenizer added
    special |= np.isin(encoded["input_ids"][0].numpy(), loaded.tokenizer.all_special_ids)  # [pos]: typed ones too
    return _run(loaded, text, encoded, special, pattern_layers, keep_patterns)


def capture_ids(loaded, token_ids, pattern_layers=None, keep_patterns: bool | None = None) -> Capture:
    """As `capture`, for token ids given as they are (no special tokens added), e.g. the induction probe."""
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64)).reshape(1, -1)  # [batch=1, pos]
    n, limit = ids.shape[1], loaded.info.max_positions
    if n == 0:
        raise HeadscopeError(EMPTY_TEXT)
    if n > limit:
        raise HeadscopeError(TOO_LONG.format(n=n, model=loaded.info.id, limit=limit))
    special = np.isin(ids[0].numpy(), loaded.tokenizer.all_special_ids)  # [pos]
    text = loaded.tokenizer.decode(ids[0].tolist(), clean_up_tokenization_spaces=False)
    encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return _run(loaded, text, encoded, special, pattern_layers, keep_patterns)


def _run(loaded, text: str, encoded: dict, special: np.ndarray, pattern_layers, keep_patterns) -> Capture:
    ids = encoded["input_ids"][0]  # [pos]
    if keep_patterns is None:
        n_pattern_layers = loaded.info.n_layers if pattern_layers is None else len(set(pattern_layers))
        keep_patterns = pattern_bytes(loaded.info.n_heads, ids.numel(), n_pattern_layers) <= PATTERN_BUDGET
    recorder = _Recorder(None if pattern_layers is None else frozenset(pattern_layers), keep_patterns,
                         token_ids=ids.numpy())
    token = _RECORDER.set(recorder)
    try:
        with torch.inference_mode():
            loaded.model(**{name: t.to(loaded.info.device) for name, t in encoded.items()})
    finally:
        _RECORDER.reset(token)
    if len(recorder.q) != loaded.info.n_layers:
        raise HeadscopeError(f"Captured {len(recorder.q)} attention calls for {loaded.info.n_layers} layers.")
    tokenizer = loaded.tokenizer
    return Capture(
        text=text,
        tokens=tuple(tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids.tolist()),
        token_ids=ids.numpy(),
        special=special,
        q=tuple(recorder.q),
        k=tuple(recorder.k),
        summaries=recorder.summaries,
        parity=recorder.parity,
        patterns=recorder.patterns,
        score_parts=_stacked(recorder.score_parts),  # [layer, head, 4, 4]
        score_fixed=_stacked(recorder.score_fixed),  # [layer, head, 3]
    )


def _stacked(per_layer: list[torch.Tensor]) -> np.ndarray | None:
    return torch.stack(per_layer).cpu().numpy() if per_layer else None  # one transfer for all layers

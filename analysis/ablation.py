"""The ablation atlas: for every layer x head, how the model's loss changes when that head's output is removed.

A head's output is its slice of the attention output projection's input (GPT-2's `c_proj`, BERT's
`attention.output.dense`, DistilBERT's `out_lin`, GPT-NeoX's `attention.dense`, `self_attn.o_proj` for the
Llama-like families): [batch, pos, head * d_head], head-major. A forward pre-hook on that projection replaces one
head's slice with zeros (zero-ablation) or with that head's mean output over the text's positions from the
unablated pass (mean-ablation); the weights are never edited. The L x H ablated passes run as batches of copies of
the text, one head ablated per batch row, so a model with L*H heads costs 1 + ceil(L*H / batch) forward passes.

What is measured depends on the checkpoint:
- a causal LM head: the mean next-token cross-entropy over positions 0..T-2 (nats);
- a masked LM head: the mean cross-entropy of the original tokens at a seeded 15% of the non-special positions,
  replaced by the mask token (the same positions for the baseline and every head);
- no LM head (e.g. the bundled MiniLM, an embedding model): the change in the final hidden states,
  the mean over positions of ||h_ablated - h|| / ||h||.
The hooks are installed once per model and stay: they act only while this module's plan for that model is set in
the current context (a ContextVar), so a model shared between threads (Streamlit sessions) is never ablated for
anyone else, and no thread adds or removes hooks while another one runs the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from analysis.choices import ABLATION_BATCH, ABLATION_MODES
from analysis.errors import HeadscopeError
from analysis.loading import predicts_next_token
from analysis.results import json_floats

MODES = ABLATION_MODES
MASK_FRACTION = 0.15
DEFAULT_BATCH = ABLATION_BATCH
ROW_BUDGET = 512 * 2**20  # bytes of logits or eager attention weights per batch, for the automatic batch size
MEASURES = {
    "next_token_loss": "change in mean next-token cross-entropy (nats)",
    "masked_token_loss": "change in mean masked-token cross-entropy (nats) on a seeded 15% of positions",
    "hidden_state_change": "mean over positions of ||h_ablated - h|| / ||h|| of the final hidden states "
                           "(the checkpoint has no LM head, so no loss)",
}
# family -> the attention output projection's name, with the layer index as group 1
OUT_PROJECTIONS = {
    "GPT-2": r"(?:^|\.)h\.(\d+)\.attn\.c_proj$",
    "BERT": r"(?:^|\.)layer\.(\d+)\.attention\.output\.dense$",
    "RoBERTa": r"(?:^|\.)layer\.(\d+)\.attention\.output\.dense$",
    "DistilBERT": r"(?:^|\.)layer\.(\d+)\.attention\.out_lin$",
    "GPT-NeoX/Pythia": r"(?:^|\.)layers\.(\d+)\.attention\.dense$",
    **{family: r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$" for family in ("Llama", "Mistral", "Qwen2", "Qwen3",
                                                                          "Gemma 2")},
}
UNKNOWN_MODE = "Unknown ablation '{mode}': use zero or mean."
NO_PROJECTION = "Found {found} attention output projections for {n} layers in {model}: cannot ablate its heads."
TOO_SHORT = "The ablation's next-token loss needs at least 2 tokens; the text has {n}."
NOTHING_TO_MASK = "The text has no ordinary tokens to mask for the masked-token loss: type a longer text."
EMPTY = "The text is empty: type a sentence to ablate on."
TOO_LONG = "The text is {n} tokens long but {model} accepts at most {limit}: shorten it."
NO_MASK_TOKEN = "{model}'s tokenizer has no mask token, so its masked-LM loss cannot be measured."

HOOK_ATTRIBUTE = "_headscope_ablation_hook"
_PLAN: ContextVar[_Plan | None] = ContextVar("headscope_ablation", default=None)


@dataclass(frozen=True, eq=False)
class AblationResult:
    """An ablation atlas: numpy only, picklable, with its JSON form."""

    mode: str  # zero | mean
    measure: str  # a key of MEASURES
    delta: np.ndarray  # [layer, head]: ablated minus unablated loss, or the hidden-state change
    baseline: float | None  # the unablated loss (nats); None for hidden_state_change
    tokens: tuple[str, ...]
    masked_positions: tuple[int, ...] = ()  # masked_token_loss: the positions scored, the same for every head
    seed: int = 0
    batch_size: int = DEFAULT_BATCH
    n_passes: int = 0

    @property
    def description(self) -> str:
        return f"{self.mode}-ablation: {MEASURES[self.measure]}"

    @property
    def is_loss(self) -> bool:
        return self.measure != "hidden_state_change"

    def to_dict(self) -> dict:
        """JSON values: a NaN or infinite loss (float16 logits past 65504) is null, as the head scores' NaN is."""
        baseline = self.baseline if self.baseline is None or math.isfinite(self.baseline) else None
        return {"mode": self.mode, "measure": self.measure, "description": self.description,
                "baseline": baseline, "delta": json_floats(self.delta), "tokens": list(self.tokens),
                "masked_positions": list(self.masked_positions), "seed": self.seed, "batch_size": self.batch_size,
                "n_passes": self.n_passes}

    @classmethod
    def from_dict(cls, data: dict) -> AblationResult:
        """The inverse of to_dict: null is NaN again (a loss's null baseline too; without a loss it stays None)."""
        baseline = data["baseline"]
        if baseline is None and data["measure"] != "hidden_state_change":
            baseline = math.nan
        return cls(mode=data["mode"], measure=data["measure"],
                   delta=np.asarray(data["delta"], dtype=np.float64),  # [layer, head]; None -> NaN
                   baseline=baseline, tokens=tuple(data["tokens"]),
                   masked_positions=tuple(data["masked_positions"]), seed=int(data["seed"]),
                   batch_size=int(data["batch_size"]), n_passes=int(data["n_passes"]))


@dataclass
class _Plan:
    """What the hooks do in the current pass: record the heads' mean outputs, or ablate one head per row."""

    owner: torch.nn.Module  # the base model whose projections this plan ablates
    n_heads: int
    d_head: int
    rows: Sequence[tuple[int, int] | None] = ()  # per batch row: (layer, head) to ablate, or None
    means: list[torch.Tensor | None] = field(default_factory=list)  # per layer [head, d_head]; filled when recording
    recording: bool = False
    mode: str = "zero"

    def apply(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.recording:
            heads = x[0].float().reshape(x.shape[1], self.n_heads, self.d_head)  # [pos, head, d_head]
            self.means[layer] = heads.mean(dim=0)  # [head, d_head]
            return None
        targets = [(row, target[1]) for row, target in enumerate(self.rows)
                   if target is not None and target[0] == layer]
        if not targets:
            return None
        x = x.clone(memory_format=torch.contiguous_format)  # [batch, pos, head * d_head]; the model's stays intact
        heads = x.view(x.shape[0], x.shape[1], self.n_heads, self.d_head)  # [batch, pos, head, d_head]
        for row, head in targets:
            if self.mode == "zero":
                heads[row, :, head] = 0
            else:
                heads[row, :, head] = self.means[layer][head].to(x.dtype)  # [d_head] broadcast over pos
        return x


def out_projections(loaded) -> list[torch.nn.Module]:
    """Each layer's attention output projection, in layer order."""
    info = loaded.info
    pattern = re.compile(OUT_PROJECTIONS[info.family])
    found = {}
    for name, module in loaded.model.named_modules():
        match = pattern.search(name)
        if match:
            found[int(match.group(1))] = module
    if sorted(found) != list(range(info.n_layers)):
        raise HeadscopeError(NO_PROJECTION.format(found=len(found), n=info.n_layers, model=info.id))
    return [found[layer] for layer in range(info.n_layers)]


def _hook(layer: int, owner: torch.nn.Module):
    def pre_hook(module, args):
        plan = _PLAN.get()
        if plan is None or plan.owner is not owner:  # no ablation in this context, or one of another model
            return None
        replaced = plan.apply(layer, args[0])
        return None if replaced is None else (replaced, *args[1:])

    return pre_hook


def install_hooks(loaded) -> None:
    """The pre-hooks on every attention output projection, once per model (idempotent; inert until a plan is set)."""
    for layer, module in enumerate(out_projections(loaded)):
        if getattr(module, HOOK_ATTRIBUTE, None) is None:
            setattr(module, HOOK_ATTRIBUTE, module.register_forward_pre_hook(_hook(layer, loaded.model)))


def encode(loaded, text_or_ids) -> torch.Tensor:
    """[pos] token ids: a text tokenized with the tokenizer's special tokens, or ids used as they are."""
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise HeadscopeError(EMPTY)
        ids = torch.as_tensor(loaded.tokenizer(text_or_ids)["input_ids"], dtype=torch.long)  # [pos]
    else:
        ids = torch.as_tensor(np.asarray(text_or_ids, dtype=np.int64)).reshape(-1)  # [pos]
    if ids.numel() == 0:
        raise HeadscopeError(EMPTY)
    if ids.numel() > loaded.info.max_positions:
        raise HeadscopeError(TOO_LONG.format(n=ids.numel(), model=loaded.info.id, limit=loaded.info.max_positions))
    return ids


def mask_positions(loaded, ids: torch.Tensor, seed: int = 0) -> np.ndarray:
    """A seeded MASK_FRACTION of the non-special positions (at least one), sorted: [n_masked]."""
    special = np.isin(ids.numpy(), loaded.tokenizer.all_special_ids)  # [pos]
    candidates = np.flatnonzero(~special)  # [n_candidates]
    if candidates.size == 0:
        raise HeadscopeError(NOTHING_TO_MASK)
    n = max(1, round(MASK_FRACTION * candidates.size))
    return np.sort(np.random.default_rng(seed).choice(candidates, size=n, replace=False))  # [n_masked]


def measure_of(loaded) -> str:
    if loaded.lm is None:
        return "hidden_state_change"
    return "next_token_loss" if predicts_next_token(loaded.lm.config) else "masked_token_loss"


def auto_batch_size(loaded, n_tokens: int) -> int:
    """Rows per batch so that one batch's logits or one layer's attention weights stay within ROW_BUDGET."""
    vocab = loaded.model.get_input_embeddings().num_embeddings
    per_row = 4 * n_tokens * max(vocab, loaded.info.n_heads * n_tokens, 1)
    return max(1, min(DEFAULT_BATCH, ROW_BUDGET // per_row))


def compute_ablated(loaded, text_or_ids, targets: Sequence[tuple[int, int] | None], mode: str = "zero",
                    seed: int = 0, batch_size: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """The measure with each target (layer, head) ablated (None: nothing ablated), in batches of copies.

    Returns {"values": [n_targets] ablated minus unablated (loss) or the hidden-state change, "baseline",
    "measure", "masked_positions", "batch_size", "n_passes"}.
    """
    if mode not in MODES:
        raise HeadscopeError(UNKNOWN_MODE.format(mode=mode))
    info = loaded.info
    ids = encode(loaded, text_or_ids)  # [pos]
    measure = measure_of(loaded)
    masked = np.empty(0, dtype=np.int64)
    labels = ids
    if measure == "next_token_loss" and ids.numel() < 2:
        raise HeadscopeError(TOO_SHORT.format(n=ids.numel()))
    if measure == "masked_token_loss":
        if loaded.tokenizer.mask_token_id is None:
            raise HeadscopeError(NO_MASK_TOKEN.format(model=info.id))
        masked = mask_positions(loaded, ids, seed)
        ids = ids.clone()
        ids[torch.as_tensor(masked)] = loaded.tokenizer.mask_token_id  # [pos], the same input for every head
    rows = batch_size or auto_batch_size(loaded, ids.numel())
    plan = _Plan(owner=loaded.model, n_heads=info.n_heads, d_head=info.d_head, means=[None] * info.n_layers, mode=mode)
    install_hooks(loaded)
    token = _PLAN.set(plan)
    n_batches = math.ceil(len(targets) / rows)
    try:
        with torch.inference_mode():
            plan.recording = True
            clean = _forward(loaded, ids, 1, measure)  # [1, pos, d_model] hidden or [1, pos, vocab] logits
            plan.recording = False
            baseline = None if measure == "hidden_state_change" else float(_loss(clean, labels, masked, measure)[0])
            values = []
            for number, start in enumerate(range(0, len(targets), rows)):
                plan.rows = targets[start:start + rows]
                out = _forward(loaded, ids, len(plan.rows), measure)  # [batch, pos, ...]
                if measure == "hidden_state_change":
                    values.append(_hidden_change(out, clean[0]))
                else:
                    values.append(_loss(out, labels, masked, measure) - baseline)
                if progress is not None:
                    progress(number + 1, n_batches)
    finally:
        _PLAN.reset(token)
    return {"values": torch.cat(values).cpu().numpy().astype(np.float64) if values else np.empty(0),
            "baseline": baseline, "measure": measure, "masked_positions": tuple(int(p) for p in masked),
            "batch_size": rows, "n_passes": 1 + n_batches}


def _forward(loaded, ids: torch.Tensor, n_rows: int, measure: str) -> torch.Tensor:
    batch = ids.to(loaded.info.device).unsqueeze(0).expand(n_rows, -1)  # [batch, pos]
    mask = torch.ones_like(batch)  # [batch, pos]
    if measure == "hidden_state_change":
        return loaded.model(input_ids=batch, attention_mask=mask).last_hidden_state.float()  # [batch, pos, d_model]
    return loaded.lm(input_ids=batch, attention_mask=mask).logits.float()  # [batch, pos, vocab]


def _loss(logits: torch.Tensor, labels: torch.Tensor, masked: np.ndarray, measure: str) -> torch.Tensor:
    """[batch] mean cross-entropy per row: of each next token, or of the original tokens at the masked positions."""
    labels = labels.to(logits.device)
    if measure == "next_token_loss":
        scored, target = logits[:, :-1], labels[1:]  # [batch, pos-1, vocab], [pos-1]
    else:
        where = torch.as_tensor(masked, device=logits.device)
        scored, target = logits[:, where], labels[where]  # [batch, n_masked, vocab], [n_masked]
    target = target.unsqueeze(0).expand(scored.shape[0], -1)  # [batch, n]
    return F.cross_entropy(scored.transpose(1, 2), target, reduction="none").mean(dim=1)  # [batch]


def _hidden_change(hidden: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """[batch]: mean over positions of ||h_ablated - h|| / ||h||."""
    change = (hidden - clean).norm(dim=-1) / clean.norm(dim=-1).clamp_min(1e-12)  # [batch, pos]
    return change.mean(dim=1)  # [batch]


def compute_ablation(loaded, text_or_ids, mode: str = "zero", seed: int = 0, batch_size: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> AblationResult:
    """The ablation atlas of every layer x head (see the module docstring for what is measured)."""
    info = loaded.info
    targets = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    out = compute_ablated(loaded, text_or_ids, targets, mode, seed, batch_size, progress)
    ids = encode(loaded, text_or_ids)
    tokens = tuple(loaded.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids.tolist())
    return AblationResult(mode=mode, measure=out["measure"],
                          delta=out["values"].reshape(info.n_layers, info.n_heads),  # [layer, head]
                          baseline=out["baseline"], tokens=tokens, masked_positions=out["masked_positions"],
                          seed=seed, batch_size=out["batch_size"], n_passes=out["n_passes"])

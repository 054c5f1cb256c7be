"""Two models or checkpoints on one text: both atlases, their difference (B - A), and the Q/K statistics side by side.

Heads are compared position by position, so both models must read the same tokens: the same tokenizer (same
vocabulary, same special tokens, the same ids for the text), as a base model and its fine-tune or two training
checkpoints of one run have. The difference needs the same layer x head shape; with different shapes the atlases
are still shown side by side and a warning says why there is no difference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from analysis import AnalysisResult, analyze
from analysis.ablation import AblationResult, compute_ablation
from analysis.errors import HeadscopeError
from analysis.results import json_floats

SCHEMA = "headscope.compare/1"
TOKENIZER_MISMATCH = ("{b} does not use the same tokenizer as {a} ({why}): comparing heads token by token needs the "
                      "same tokens. Compare two checkpoints of one model (a base model and its fine-tune, or two "
                      "revisions of one training run).")
SHAPE_MISMATCH = ("{a} has {la} layers x {ha} heads and {b} {lb} x {hb}: the atlases are shown side by side, "
                  "without a difference.")
LAYER_RANGE = ("Layer {layer} is out of range for {model}, which has layers 0..{last}: compare a layer both models "
               "have (0..{shared}).")
QK_STATS = ("q_means", "q_stds", "k_means", "k_stds")


@dataclass(frozen=True, eq=False)
class CompareResult:
    a: AnalysisResult
    b: AnalysisResult
    ablation_a: AblationResult | None = None
    ablation_b: AblationResult | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def same_shape(self) -> bool:
        return all(self.a.model[key] == self.b.model[key] for key in ("n_layers", "n_heads"))

    @property
    def score_difference(self) -> dict[str, np.ndarray]:
        """name -> [layer, head] B - A (NaN where either is undefined); empty when the shapes differ."""
        if not self.same_shape:
            return {}
        return {name: self.b.head_scores[name] - self.a.head_scores[name]
                for name in self.a.head_scores if name in self.b.head_scores}

    @property
    def ablation_difference(self) -> np.ndarray | None:
        """[layer, head] B - A of the ablation atlases, when both were measured the same way."""
        if self.ablation_a is None or self.ablation_b is None or not self.same_shape:
            return None
        if self.ablation_a.measure != self.ablation_b.measure:
            return None
        return self.ablation_b.delta - self.ablation_a.delta

    def qk_rows(self) -> list[dict]:
        """The notebook's per-layer Q/K statistics side by side: one row per layer x head of either model (key
        stats of the key head that query head reads), with each value for A and for B (None where that model has no
        such layer or head: models of different shapes are shown side by side, nothing dropped)."""

        def value(result, layer: int, head: int, name: str) -> float | None:
            data = result.layers.get(layer)
            if data is None or head >= len(data.q_means) or not len(getattr(data, name)):
                return None
            values = getattr(data, name)
            return float(values[head // (len(data.q_means) // len(values))])

        rows = []
        for layer in sorted(set(self.a.layers) | set(self.b.layers)):
            heads = max(len(result.layers[layer].q_means) for result in (self.a, self.b) if layer in result.layers)
            for head in range(heads):
                row = {"layer": layer, "head": head, "label": f"L{layer}H{head}"}
                for name in QK_STATS:
                    row[f"{name}_a"], row[f"{name}_b"] = (value(side, layer, head, name) for side in (self.a, self.b))
                rows.append(row)
        return rows

    def to_dict(self) -> dict:
        ablation = None
        if self.ablation_a is not None:
            difference = self.ablation_difference
            ablation = {"a": self.ablation_a.to_dict(), "b": self.ablation_b.to_dict(),
                        "difference": None if difference is None else json_floats(difference)}
        return {"schema": SCHEMA, "a": self.a.to_dict(), "b": self.b.to_dict(),
                "score_difference": {name: json_floats(values) for name, values in self.score_difference.items()},
                "qk_stats": self.qk_rows(), "ablation": ablation, "warnings": list(self.warnings)}


def check_same_tokenizer(loaded_a, loaded_b, text_or_ids=None) -> None:
    """Raise a clear error unless both models' tokenizers are the same (and give the text the same ids)."""
    ta, tb = loaded_a.tokenizer, loaded_b.tokenizer
    why = None
    if ta.get_vocab() != tb.get_vocab():
        why = f"vocabularies of {len(ta)} and {len(tb)} tokens that differ"
    elif sorted(ta.all_special_ids) != sorted(tb.all_special_ids):
        why = "different special tokens"
    elif isinstance(text_or_ids, str) and ta(text_or_ids)["input_ids"] != tb(text_or_ids)["input_ids"]:
        why = "the text becomes different tokens"
    if why is not None:
        raise HeadscopeError(TOKENIZER_MISMATCH.format(a=loaded_a.info.id, b=loaded_b.info.id, why=why))


def compare_models(loaded_a, loaded_b, text: str, layers: Iterable[int] | None = None,
                   exclude_first_token: bool = True, ablation: str | None = None, seed: int = 0,
                   batch_size: int | None = None, *, query_position: int | None = None,
                   exclude_special_keys: bool = False, exclude_bos: bool = True) -> CompareResult:
    """Both models on `text` (`layers` None: every layer of each), with the same query token and exclusions
    (analyze's); `ablation` "zero"/"mean" adds both atlases (load the models with load_model(head=True) for a
    loss)."""
    check_same_tokenizer(loaded_a, loaded_b, text)
    chosen = None if layers is None else list(layers)
    shared = min(loaded_a.info.n_layers, loaded_b.info.n_layers)
    for loaded in (loaded_a, loaded_b):  # "this model has layers 0..0" would not say which of the two
        for layer in chosen or ():
            if not 0 <= layer < loaded.info.n_layers:
                raise HeadscopeError(LAYER_RANGE.format(layer=layer, model=loaded.info.id,
                                                        last=loaded.info.n_layers - 1, shared=shared - 1))
    options = {"query_position": query_position, "exclude_special_keys": exclude_special_keys,
               "exclude_bos": exclude_bos, "keep_patterns": False}
    a = analyze(loaded_a, text, chosen, exclude_first_token, **options)
    b = analyze(loaded_b, text, chosen, exclude_first_token, **options)
    warnings = []
    ia, ib = loaded_a.info, loaded_b.info
    if (ia.n_layers, ia.n_heads) != (ib.n_layers, ib.n_heads):
        warnings.append(SHAPE_MISMATCH.format(a=ia.id, b=ib.id, la=ia.n_layers, ha=ia.n_heads, lb=ib.n_layers,
                                              hb=ib.n_heads))
    ablation_a = ablation_b = None
    if ablation is not None:
        ablation_a = compute_ablation(loaded_a, text, ablation, seed, batch_size)
        ablation_b = compute_ablation(loaded_b, text, ablation, seed, batch_size)
        if ablation_a.measure != ablation_b.measure:
            warnings.append(f"The ablation atlases measure different things ({ablation_a.measure} and "
                            f"{ablation_b.measure}): no difference is shown.")
    return CompareResult(a=a, b=b, ablation_a=ablation_a, ablation_b=ablation_b, warnings=tuple(warnings))

"""headscope's analysis engine: load a model, capture q and k in one forward pass, measure heads."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from analysis.capture import PATTERN_BUDGET, Capture, capture, capture_ids, pattern_bytes
from analysis.errors import HeadscopeError
from analysis.head_scores import combine_score_parts, compute_centered_dot_products, compute_mannwhitney
from analysis.loading import LoadedModel, ModelInfo, load_model
from analysis.metrics import (
    compute_dot_products,
    compute_head_stats,
    compute_kde,
    kde_grid,
)
from analysis.parity import parity_warning
from analysis.results import MODEL_KEYS, AnalysisResult, DpStats, LayerResult

__version__ = "0.1.0"
__all__ = ["AnalysisResult", "Capture", "DpStats", "HeadscopeError", "LayerResult", "LoadedModel", "ModelInfo",
           "analyze", "analyze_ids", "analyze_induction_probe", "capture", "capture_ids", "check_layers",
           "default_layer", "induction_probe_ids", "load_model", "summarize"]

SHORT_TEXT = ("The text has only {n} token(s): the dot products need at least 3 tokens and the KDE at least 3, "
              "so those fields are empty.")
LAYER_RANGE = "Layer {layer} is out of range: this model has layers 0..{last}."
PATTERNS_DROPPED = ("The attention patterns ({mib:.0f} MiB) were not kept, only their read-outs, so there are no "
                    "heatmaps: ask for them with --patterns or --html (then kept whatever their size), or analyse "
                    "fewer layers.")
PROBE_LENGTH = 50
PROBE_TOO_LONG = ("An induction probe of {length} tokens repeated twice ({n} tokens with special tokens) is longer "
                  "than the {limit} positions {model} accepts: choose a length of at most {most}.")
PROBE_TOO_SHORT = "The induction probe needs a length of at least 2 tokens, not {length}."


def default_layer(n_layers: int) -> int:
    """The notebook's layer 6, or the middle layer of a model with 6 layers or fewer."""
    return 6 if n_layers > 6 else n_layers // 2


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """The requested layers, sorted and deduplicated; None means every layer."""
    if layers is None:
        return list(range(n_layers))
    chosen = sorted(set(layers))
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise HeadscopeError(LAYER_RANGE.format(layer=layer, last=n_layers - 1))
    return chosen


def compute_layer_result(q, k, summaries: dict, parity: float, exclude_first_token: bool,
                         pattern=None) -> LayerResult:
    """Every measurement of one layer from its captured q [head, pos, d], k [kv_head, pos, d] and the read-outs
    of its pattern (metrics.compute_attention_summaries); `pattern` [head, q_pos, k_pos] is kept if given."""
    q_means, q_stds = compute_head_stats(q, exclude_first_token)
    k_means, k_stds = compute_head_stats(k, exclude_first_token)
    same, diff = compute_dot_products(q, k, exclude_first_token)
    same_centered, diff_centered = compute_centered_dot_products(q, k, exclude_first_token, dots=(same, diff))
    p, r = compute_mannwhitney(same, diff)
    p_centered, r_centered = compute_mannwhitney(same_centered, diff_centered)
    dp_stats = DpStats(mannwhitney_p=p, rank_biserial=r, same_head_dp_centered=same_centered,
                       diff_head_dp_centered=diff_centered, mannwhitney_p_centered=p_centered,
                       rank_biserial_centered=r_centered)
    kde = None
    if q.shape[1] >= 3:
        grid = kde_grid()
        curves = {name: compute_kde(summaries[name], grid) for name in ("final_to_prev", "self_attention")}
        if all(curve is not None for curve in curves.values()):
            kde = {"grid": grid, **curves}
    return LayerResult(q_means=q_means, q_stds=q_stds, k_means=k_means, k_stds=k_stds, same_head_dp=same,
                       diff_head_dp=diff, **summaries, parity_max_abs_err=parity, kde=kde, patterns=pattern,
                       dp_stats=dp_stats)


def check_parity(errors: dict[int, float], dtype: str) -> tuple[str, ...]:
    """The parity warning naming the layers above PARITY_TOLERANCE (analysis.parity), if any."""
    warning = parity_warning(errors, dtype)
    return () if warning is None else (warning,)


def summarize(captured: Capture, model: dict, layers: Iterable[int] | None = None,
              exclude_first_token: bool = True, exclude_current_token: bool = False,
              induction_probe: dict | None = None, patterns_wanted: bool = False) -> AnalysisResult:
    """Measurements for `layers` (default: every layer whose pattern was read); no model call.

    A warning says when patterns were wanted (`patterns_wanted`) but not kept, and when a layer fails parity.

    The head scores cover every layer whatever `layers` is; `exclude_first_token` is also the head
    detector's exclude_bos, and both exclusions are applied here, so changing them needs no new forward pass.
    """
    chosen = sorted(captured.summaries) if layers is None else check_layers(layers, len(captured.q))
    missing = [layer for layer in chosen if layer not in captured.summaries]
    if missing:
        raise HeadscopeError(f"Layer(s) {missing} were not captured with attention patterns.")
    n = len(captured.tokens)
    warnings = [SHORT_TEXT.format(n=n)] if n < 3 else []
    if patterns_wanted and any(layer not in captured.patterns for layer in chosen):
        warnings.append(PATTERNS_DROPPED.format(mib=pattern_bytes(model["n_heads"], n, len(chosen)) / 2**20))
    return AnalysisResult(
        model={key: model.get(key) for key in MODEL_KEYS},
        text=captured.text,
        tokens=captured.tokens,
        token_ids=captured.token_ids,
        special_positions=tuple(int(i) for i in captured.special.nonzero()[0]),
        exclude_first_token=exclude_first_token,
        layers={layer: compute_layer_result(captured.q[layer], captured.k[layer], captured.summaries[layer],
                                            captured.parity[layer], exclude_first_token, captured.patterns.get(layer))
                for layer in chosen},
        warnings=tuple(warnings) + check_parity({layer: captured.parity[layer] for layer in chosen}, model["dtype"]),
        head_scores={} if captured.score_parts is None else combine_score_parts(
            captured.score_parts, captured.score_fixed, exclude_first_token, exclude_current_token),
        exclude_current_token=exclude_current_token,
        induction_probe=induction_probe,
    )


def analyze(loaded: LoadedModel, text: str, layers: Iterable[int] | None = None,
            exclude_first_token: bool = True, exclude_current_token: bool = False,
            keep_patterns: bool | None = None) -> AnalysisResult:
    """One forward pass, then every measurement for `layers` (None: every layer) and every head's scores.

    Each requested layer's T x T pattern is reduced to its read-outs during the pass; the patterns themselves
    (heatmaps, --patterns) are kept when `keep_patterns`, by default (None) while they fit in PATTERN_BUDGET.
    """
    chosen = check_layers(layers, loaded.info.n_layers)
    captured = capture(loaded, text, pattern_layers=chosen, keep_patterns=keep_patterns)
    return summarize(captured, loaded.info.to_dict(), chosen, exclude_first_token, exclude_current_token,
                     patterns_wanted=keep_patterns is None)  # None: kept if they fit, so say when they did not


def analyze_ids(loaded: LoadedModel, token_ids, layers: Iterable[int] | None = None,
                exclude_first_token: bool = True, exclude_current_token: bool = False,
                induction_probe: dict | None = None, keep_patterns: bool | None = None) -> AnalysisResult:
    """As `analyze`, for token ids fed to the model as they are (no special tokens added)."""
    chosen = check_layers(layers, loaded.info.n_layers)
    captured = capture_ids(loaded, token_ids, pattern_layers=chosen, keep_patterns=keep_patterns)
    return summarize(captured, loaded.info.to_dict(), chosen, exclude_first_token, exclude_current_token,
                     induction_probe, patterns_wanted=keep_patterns is None)


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text, e.g. ([CLS], [SEP]) or ([<s>], [])."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def induction_probe_ids(loaded: LoadedModel, length: int = PROBE_LENGTH, seed: int = 0) -> np.ndarray:
    """A seeded random sequence of `length` tokens, repeated twice: [pos] token ids.

    As TransformerLens's induction benchmark: an induction head, at a token of the second copy, attends to
    the token that followed the same token in the first copy, which on random tokens only induction can
    predict. The tokens are drawn without replacement from the vocabulary less its special tokens (with
    replacement only if the vocabulary is smaller than `length`), so each token of the second copy has
    exactly one earlier occurrence. The tokenizer's own special tokens go around the repeat ([CLS] ... [SEP]
    for BERT, <s> for Llama); a tokenizer that adds none but has a BOS token gets it first, as
    TransformerLens prepends BOS to GPT-2's input.
    """
    if length < 2:
        raise HeadscopeError(PROBE_TOO_SHORT.format(length=length))
    tokenizer = loaded.tokenizer
    before, after = _special_ends(tokenizer)
    if not before and not after and tokenizer.bos_token_id is not None:
        before = [tokenizer.bos_token_id]
    n = 2 * length + len(before) + len(after)
    limit = loaded.info.max_positions
    if n > limit:
        raise HeadscopeError(PROBE_TOO_LONG.format(length=length, n=n, limit=limit, model=loaded.info.id,
                                                   most=(limit - len(before) - len(after)) // 2))
    vocab = min(len(tokenizer), loaded.model.get_input_embeddings().num_embeddings)
    candidates = np.setdiff1d(np.arange(vocab), tokenizer.all_special_ids)  # [vocab - special]
    half = np.random.default_rng(seed).choice(candidates, size=length, replace=candidates.size < length)  # [length]
    return np.concatenate([before, half, half, after]).astype(np.int64)  # [pos]


def analyze_induction_probe(loaded: LoadedModel, length: int = PROBE_LENGTH, seed: int = 0,
                            layers: Iterable[int] | None = None, exclude_first_token: bool = True,
                            exclude_current_token: bool = False, keep_patterns: bool | None = None) -> AnalysisResult:
    """`analyze_ids` on `induction_probe_ids(loaded, length, seed)`; the result records length and seed."""
    ids = induction_probe_ids(loaded, length, seed)
    return analyze_ids(loaded, ids, layers, exclude_first_token, exclude_current_token,
                       induction_probe={"length": length, "seed": seed}, keep_patterns=keep_patterns)

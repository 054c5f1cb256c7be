"""headscope's analysis engine: load a model, capture q and k in one forward pass, measure heads."""

from __future__ import annotations

from collections.abc import Iterable

from analysis.capture import Capture, capture
from analysis.errors import HeadscopeError
from analysis.loading import LoadedModel, ModelInfo, load_model
from analysis.metrics import (
    compute_attention_summaries,
    compute_dot_products,
    compute_head_stats,
    compute_kde,
    kde_grid,
)
from analysis.results import MODEL_KEYS, AnalysisResult, LayerResult

__version__ = "0.1.0"
__all__ = ["AnalysisResult", "Capture", "HeadscopeError", "LayerResult", "LoadedModel", "ModelInfo", "analyze",
           "capture", "check_layers", "load_model", "summarize"]

SHORT_TEXT = ("The text has only {n} token(s): the dot products need at least 3 tokens and the KDE at least 3, "
              "so those fields are empty.")
LAYER_RANGE = "Layer {layer} is out of range: this model has layers 0..{last}."


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """The requested layers, sorted and deduplicated; None means every layer."""
    if layers is None:
        return list(range(n_layers))
    chosen = sorted(set(layers))
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise HeadscopeError(LAYER_RANGE.format(layer=layer, last=n_layers - 1))
    return chosen


def compute_layer_result(q, k, pattern, parity: float, exclude_first_token: bool) -> LayerResult:
    """Every measurement of one layer from its captured q [head, pos, d], k [kv_head, pos, d] and pattern."""
    q_means, q_stds = compute_head_stats(q, exclude_first_token)
    k_means, k_stds = compute_head_stats(k, exclude_first_token)
    same, diff = compute_dot_products(q, k, exclude_first_token)
    summaries = compute_attention_summaries(pattern)
    kde = None
    if pattern.shape[1] >= 3:
        grid = kde_grid()
        curves = {name: compute_kde(summaries[name], grid) for name in ("final_to_prev", "self_attention")}
        if all(curve is not None for curve in curves.values()):
            kde = {"grid": grid, **curves}
    return LayerResult(q_means=q_means, q_stds=q_stds, k_means=k_means, k_stds=k_stds, same_head_dp=same,
                       diff_head_dp=diff, **summaries, parity_max_abs_err=parity, kde=kde, patterns=pattern)


def summarize(captured: Capture, model: dict, layers: Iterable[int] | None = None,
              exclude_first_token: bool = True) -> AnalysisResult:
    """Measurements for `layers` (default: every layer whose pattern was captured); no model call."""
    chosen = sorted(captured.patterns) if layers is None else check_layers(layers, len(captured.q))
    missing = [layer for layer in chosen if layer not in captured.patterns]
    if missing:
        raise HeadscopeError(f"Layer(s) {missing} were not captured with attention patterns.")
    n = len(captured.tokens)
    return AnalysisResult(
        model={key: model[key] for key in MODEL_KEYS},
        text=captured.text,
        tokens=captured.tokens,
        token_ids=captured.token_ids,
        special_positions=tuple(int(i) for i in captured.special.nonzero()[0]),
        exclude_first_token=exclude_first_token,
        layers={layer: compute_layer_result(captured.q[layer], captured.k[layer], captured.patterns[layer],
                                            captured.parity[layer], exclude_first_token) for layer in chosen},
        warnings=(SHORT_TEXT.format(n=n),) if n < 3 else (),
    )


def analyze(loaded: LoadedModel, text: str, layers: Iterable[int] | None = None,
            exclude_first_token: bool = True) -> AnalysisResult:
    """One forward pass, then every measurement for `layers` (None: every layer)."""
    chosen = check_layers(layers, loaded.info.n_layers)
    captured = capture(loaded, text, pattern_layers=chosen)
    return summarize(captured, loaded.info.to_dict(), chosen, exclude_first_token)

"""Parity that can fail: when the pattern rebuilt from the captured q and k is not the model's own attention.

Every analysed layer's `parity_max_abs_err` is max |softmax(q k^T * scaling + mask) - the model's own weights|.
Above its tolerance (parity_tolerance) the figures of that layer do not describe what the model computed (a wrong
scaling, a lost mask, an unsupported attention variant): the result then carries a warning naming the layers,
which the CLI prints, the JSON holds, the report shows at its top and the app shows instead of its green parity
box. No torch here: the app and the reports read it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The model may run in half precision; headscope measures in float32 from the q and k it used. The parity
# figure then compares that float32 rebuild with the model's own half-precision weights, so it is as large
# as half-precision rounding of the scores and weights: these bounds hold with a margin on the tested families
# while the scores stay small. float32: the rebuild is bit-equal to eager attention on the CPU and within ~5e-7 of
# the fused kernel whatever the size of the scores, so its bound stays absolute.
PARITY_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
# In half precision the model rounds each score s = q k^T * scaling twice (the product, then the scaling), each time
# by up to u |s| (u: the dtype's unit roundoff, half its epsilon), and the softmax moves a weight by at most half the
# largest such change in its row (first order: |dp_j| = p_j |ds_j - sum_k p_k ds_k| <= 2 p_j (1 - p_j) max |ds|). So
# a layer's bound is the dtype's absolute one (the rounding of the weights themselves, the kernels' order) plus
# u * score_max, score_max being the largest |row maximum| of its scores (a key far below its row's maximum carries
# too little weight for its rounding to move anything), recorded per layer (LayerResult.parity_score_max). Measured
# on the tiny checkpoints with q and k scaled to scores of 12 to 3500, an exact rebuild's error stayed within 0.42 u
# * score_max (0.66 with soft-capping, whose extra roundings tanh mostly compresses); a wrong one (twice or 1.2
# times the scale, no mask, the wrong key head) exceeded the bound on every layer.
# Only the eager route grows its bound: a fused kernel (sdpa, every GPU run) keeps the scores in float32, and its
# output, compared with the rebuild times v, stays within the absolute bound (~2e-3 in bfloat16 at scores of 900).
# The bound never passes PARITY_CAP: past it the check could no longer tell a wrong rebuild (a dropped mask moves a
# weight by ~1) from the model's own rounding, so a layer whose scores would allow more (bfloat16: past ~120) is
# held to the cap, and its message says to run in float32 to check it.
PARITY_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # u of the dtypes whose bound grows with the scores
PARITY_CAP = 0.5  # the largest bound a layer is held to, in attention weight
PARITY_FAILED = ("Parity check failed on layer{s} {layers}: the attention rebuilt from the captured q and k differs "
                 "from the model's own by up to {worst:.1e} (allowed for {dtype}: {allowed}), so {these} "
                 "figures may not describe what the model computed.")
PARITY_SCALED = "{tolerance:.1e} = {base:.0e} + {u:.2g} x its largest score {score:.3g}"  # grown with the scores
PARITY_CAPPED = ("{cap:.1e}, the most a check allows; its largest score {score:.3g} would allow {tolerance:.1e} for "
                 "{dtype}'s own rounding, so run in float32 to check it")


def parity_tolerance(dtype: str, score_max: float | None = None) -> float:
    """The largest parity error that still counts as agreement for a layer of a model run in `dtype` whose largest
    |row maximum of the scores| is `score_max` (None, or float32: the dtype's absolute bound alone), at most
    PARITY_CAP."""
    base = PARITY_TOLERANCE.get(dtype, PARITY_TOLERANCE["float32"])
    u = PARITY_ROUNDOFF.get(dtype)
    if u is None or score_max is None or not math.isfinite(score_max):
        return base
    return min(base + u * abs(score_max), max(base, PARITY_CAP))


def describe_tolerance(dtype: str, score_max: float | None = None) -> str:
    """parity_tolerance as a message shows it: the number, and what it was scaled with when it was."""
    tolerance, base = parity_tolerance(dtype, score_max), parity_tolerance(dtype)
    if tolerance == base:
        return f"{tolerance:.1e}"
    grown = base + PARITY_ROUNDOFF[dtype] * abs(score_max)
    if grown > tolerance:
        return PARITY_CAPPED.format(cap=tolerance, score=score_max, tolerance=grown, dtype=dtype)
    return PARITY_SCALED.format(tolerance=tolerance, base=base, u=PARITY_ROUNDOFF[dtype], score=score_max)


def describe_tolerances(layers, dtype: str, score_max: Mapping[int, float | None] | None = None) -> str:
    """The tolerances `layers` were held to, as messages show them: one, when they share it; else each with its
    layer."""
    score_max = score_max or {}
    allowed = {layer: describe_tolerance(dtype, score_max.get(layer)) for layer in layers}
    if len(set(allowed.values())) == 1:
        return next(iter(allowed.values()))
    return "; ".join(f"layer {layer}: {text}" for layer, text in allowed.items())


def layer_parity(layers: Mapping) -> tuple[dict[int, float], dict[int, float | None]]:
    """({layer: parity error}, {layer: largest score or None}) of LayerResults."""
    return ({layer: data.parity_max_abs_err for layer, data in layers.items()},
            {layer: data.parity_score_max for layer, data in layers.items()})


def parity_failures(errors: Mapping[int, float], dtype: str,
                    score_max: Mapping[int, float | None] | None = None) -> dict[int, float]:
    """{layer: error} of the layers whose parity error exceeds their tolerance (or is not a number)."""
    score_max = score_max or {}
    return {int(layer): float(err) for layer, err in sorted(errors.items())
            if not math.isfinite(err) or err > parity_tolerance(dtype, score_max.get(layer))}


def parity_warning(errors: Mapping[int, float], dtype: str,
                   score_max: Mapping[int, float | None] | None = None) -> str | None:
    """The warning naming every failing layer and the tolerance each was held to, or None when every layer agrees."""
    score_max = score_max or {}
    failed = parity_failures(errors, dtype, score_max)
    if not failed:
        return None
    worst = max(failed.values(), key=lambda err: math.inf if not math.isfinite(err) else err)
    return PARITY_FAILED.format(s="s" if len(failed) > 1 else "", layers=", ".join(map(str, failed)), worst=worst,
                                dtype=dtype, allowed=describe_tolerances(failed, dtype, score_max),
                                these="these layers'" if len(failed) > 1 else "its")


def result_parity_failures(result) -> dict[int, float]:
    """parity_failures of an AnalysisResult's layers."""
    errors, score_max = layer_parity(result.layers)
    return parity_failures(errors, result.model["dtype"], score_max)

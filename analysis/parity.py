"""Parity that can fail: when the pattern rebuilt from the captured q and k is not the model's own attention.

Every analysed layer's `parity_max_abs_err` is max |softmax(q k^T * scaling + mask) - the model's own weights|.
Above PARITY_TOLERANCE for the model's dtype, the figures of that layer do not describe what the model computed
(a wrong scaling, a lost mask, an unsupported attention variant): the result then carries a warning naming the
layers, which the CLI prints, the JSON holds, the report shows at its top and the app shows instead of its
green parity box. No torch here: the app and the reports read it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The model may run in half precision; headscope measures in float32 from the q and k it used. The parity
# figure then compares that float32 rebuild with the model's own half-precision weights, so it is as large
# as half-precision rounding of the scores and weights: these bounds hold with a margin on the tested families.
PARITY_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
PARITY_FAILED = ("Parity check failed on layer{s} {layers}: the attention rebuilt from the captured q and k differs "
                 "from the model's own by up to {worst:.1e} (allowed for {dtype}: {tolerance:.0e}), so {these} "
                 "figures may not describe what the model computed.")


def parity_tolerance(dtype: str) -> float:
    """The largest parity error that still counts as agreement for a model run in `dtype`."""
    return PARITY_TOLERANCE.get(dtype, PARITY_TOLERANCE["float32"])


def parity_failures(errors: Mapping[int, float], dtype: str) -> dict[int, float]:
    """{layer: error} of the layers whose parity error exceeds the tolerance (or is not a number)."""
    tolerance = parity_tolerance(dtype)
    return {int(layer): float(err) for layer, err in sorted(errors.items())
            if not math.isfinite(err) or err > tolerance}


def parity_warning(errors: Mapping[int, float], dtype: str) -> str | None:
    """The warning naming every failing layer, or None when every layer agrees."""
    failed = parity_failures(errors, dtype)
    if not failed:
        return None
    worst = max(failed.values(), key=lambda err: math.inf if not math.isfinite(err) else err)
    return PARITY_FAILED.format(s="s" if len(failed) > 1 else "", layers=", ".join(map(str, failed)), worst=worst,
                                dtype=dtype, tolerance=parity_tolerance(dtype),
                                these="these layers'" if len(failed) > 1 else "its")


def result_parity_failures(result) -> dict[int, float]:
    """parity_failures of an AnalysisResult's layers."""
    return parity_failures({layer: data.parity_max_abs_err for layer, data in result.layers.items()},
                           result.model["dtype"])

"""headscope's analysis engine: load a model, capture q and k in one forward pass, measure heads.

The package only re-exports (the pipeline lives in analysis.pipeline), lazily: importing a torch-free
module such as analysis.results or analysis.heads (reports.charts does) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "AnalysisResult": "analysis.results", "DpStats": "analysis.results", "LayerResult": "analysis.results",
    "HeadscopeError": "analysis.errors",
    "Capture": "analysis.capture", "capture": "analysis.capture", "capture_ids": "analysis.capture",
    "LoadedModel": "analysis.loading", "ModelInfo": "analysis.loading", "load_model": "analysis.loading",
    **{name: "analysis.pipeline" for name in (
        "BATCH_SIZE", "analyze", "analyze_batch", "analyze_ids", "analyze_induction_probe", "check_layers",
        "compute_layer_result", "default_layer", "induction_probe_ids", "summarize", "PROBE_LENGTH",
        "ONE_TOKEN", "SHORT_TEXT", "LAYER_RANGE", "PATTERNS_DROPPED", "PROBE_TOO_LONG", "PROBE_TOO_SHORT")},
}
__all__ = [
    "BATCH_SIZE",
    "AnalysisResult",
    "Capture",
    "DpStats",
    "HeadscopeError",
    "LayerResult",
    "LoadedModel",
    "ModelInfo",
    "analyze",
    "analyze_batch",
    "analyze_ids",
    "analyze_induction_probe",
    "capture",
    "capture_ids",
    "check_layers",
    "default_layer",
    "induction_probe_ids",
    "load_model",
    "summarize",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """`analysis.capture` is the function, as it always was, not the submodule of the same name (which stays
    importable as a module: `from analysis.capture import ...`, importlib.import_module)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

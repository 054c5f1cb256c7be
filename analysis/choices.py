"""The names a user can choose (dtypes, device maps, ablation modes): torch-free, so that the command line's
parser (python -m reports --help) is built without importing torch. The modules that act on them import these."""

from __future__ import annotations

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # analysis.loading.DTYPES maps each to its torch dtype
DEVICE_MAPS = ("auto",)
ABLATION_MODES = ("zero", "mean")
ABLATION_BATCH = 16  # copies of the text per ablation pass, at most

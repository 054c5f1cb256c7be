"""Which key head each query head reads: torch-free, so reports.charts can import it without torch."""

from __future__ import annotations

import numpy as np


def key_head_of(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """[head] -> the key head each query head reads."""
    return np.arange(n_heads) // (n_heads // n_kv_heads)

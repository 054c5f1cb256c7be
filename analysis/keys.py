"""Which positions the query token is compared with: torch-free, so results and reports.charts use the same
definition as the engine (analysis.metrics, analysis.patterns)."""

from __future__ import annotations

import numpy as np


def compared_keys(n: int, exclude_first_token: bool = True, query_position: int = -1, *, causal: bool = True,
                  skip=None) -> tuple[int, slice | np.ndarray]:
    """(query position P, the key positions its dot products use): P = T-1 by default. Causal models compare
    keys start..P-1, bidirectional ones every position but P from start on (start 1 when the first token is
    excluded); `skip` ([pos] bool, e.g. the special tokens) leaves more out. A slice where no position is
    skipped inside the range (a view, the notebook's `1:-1`), else the positions as an int64 array."""
    p = query_position % n
    start = 1 if exclude_first_token else 0
    if causal and skip is None:
        return p, slice(start, max(p, start))
    keep = np.zeros(n, dtype=bool)  # [pos]
    keep[start:] = True
    keep[p if not causal else slice(p, None)] = False
    if skip is not None:
        keep &= ~np.asarray(skip, dtype=bool)
    return p, np.flatnonzero(keep)


def query_keys(n: int, query_position: int = -1, *, causal: bool = True, skip=None) -> tuple[int, slice | np.ndarray]:
    """(P, the keys of its softmax read-out): "query to earlier keys" 0..P-1 (causal, the notebook's
    `attn_sm[-1, :-1]` at P = T-1) or "query to other tokens" (every position but P), less `skip`."""
    return compared_keys(n, False, query_position, causal=causal, skip=skip)

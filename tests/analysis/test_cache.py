"""analysis/cache.py: hits hand back the stored object itself, and the bytes stay under the budget."""

from __future__ import annotations

import threading

import numpy as np

from analysis.cache import ByteBudgetCache, nbytes
from tests.reports.test_charts import synthetic_result

MIB = 2**20


def block(mib: int) -> np.ndarray:
    return np.zeros(mib * MIB // 8)  # float64: exactly `mib` MiB


def test_nbytes_counts_arrays_inside_dataclasses_once():
    result = synthetic_result(20, n_heads=4, n_kv_heads=2)
    data = result.layers[0]
    arrays = [data.q_means, data.q_stds, data.k_means, data.k_stds, data.same_head_dp, data.diff_head_dp,
              data.final_to_prev, data.self_attention, data.first_self, data.sink_mass, data.patterns,
              *data.kde.values(), result.token_ids]
    strings = len(result.text) + len(result.query_choice) + len(result.score_definition) + sum(
        len(t) for t in result.tokens) + sum(
        len(k) + (len(v) if isinstance(v, str) else 0) for k, v in result.model.items())
    assert nbytes(result) == sum(a.nbytes for a in arrays) + strings + sum(len(k) for k in data.kde)
    shared = {"a": data.patterns, "b": data.patterns}
    assert nbytes(shared) == data.patterns.nbytes + 2  # one array reached twice counts once


def test_a_hit_is_the_same_object_and_runs_nothing():
    cache, calls = ByteBudgetCache(10 * MIB), []
    first = cache.get("k", lambda: calls.append(1) or block(1))
    assert cache.get("k", lambda: calls.append(1) or block(1)) is first
    assert calls == [1]


def test_least_recently_used_entries_leave_past_the_budget():
    cache = ByteBudgetCache(3 * MIB)
    for key in "abc":
        cache.get(key, lambda: block(1))
    cache.get("a", lambda: block(1))  # "a" is now the most recently used
    cache.get("d", lambda: block(1))
    assert "b" not in cache and all(key in cache for key in "acd")
    assert cache.stored_bytes == 3 * MIB
    big = cache.get("e", lambda: block(5))  # alone over budget: kept (the caller uses it), everything else goes
    assert len(cache) == 1 and "e" in cache and cache.stored_bytes == big.nbytes


def test_concurrent_misses_share_the_first_stored_value():
    cache, barrier, got = ByteBudgetCache(10 * MIB), threading.Barrier(2), []

    def make():
        barrier.wait(timeout=5)  # both threads miss before either stores
        return block(1)

    threads = [threading.Thread(target=lambda: got.append(cache.get("k", make))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(got) == 2 and got[0] is got[1] and cache.stored_bytes == MIB

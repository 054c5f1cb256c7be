"""The measurement's launch count, a deterministic proxy for a GPU's overhead (benchmarks/op_count.py): layers that
fit one group (capture.GROUP_BUDGET) are measured by one set of operations whatever their number, one layer a group
adds a bounded number, the work after the pass is batched over layers, and the numbers reach the host in one copy
with one device sync (the KDEs' window width)."""

import numpy as np
import pytest

from benchmarks.op_count import build_small, count_measurement_ops

# Operations that are not views (kernels on a GPU) per layer when each layer is a group of its own, one block of
# query rows: the rebuild and its reductions (~25), the head stats and the dot products (~14). Counted 39.
LAUNCHES_PER_LAYER_ALONE = 50


@pytest.fixture(scope="module")
def counts():
    ids = np.random.default_rng(0).integers(3, 400, 24)  # [pos]
    return {(n, budget): count_measurement_ops(build_small("gpt2-small", n), ids, group_budget=budget)
            for n in (2, 4) for budget in (None, 1)}  # a GPU's groups; one layer a group


def test_the_work_after_the_pass_does_not_grow_with_layers(counts):
    assert counts[2, None]["flush_launches"] == counts[4, None]["flush_launches"]
    assert counts[2, None]["flush_launches"] > 10  # it did count: the batched sort, KDE and copy


def test_a_group_of_layers_is_measured_by_one_set_of_launches(counts):
    assert counts[2, None]["groups"] == counts[4, None]["groups"] == 1
    assert counts[2, None]["measure_launches"] == counts[4, None]["measure_launches"]
    assert counts[4, None]["measure_launches"] < counts[4, 1]["measure_launches"] / 3


def test_one_layer_a_group_adds_a_bounded_number_of_launches_per_layer(counts):
    assert counts[2, 1]["groups"] == 2 and counts[4, 1]["groups"] == 4
    per_layer = (counts[4, 1]["measure_launches"] - counts[2, 1]["measure_launches"]) / 2
    assert 20 <= per_layer <= LAUNCHES_PER_LAYER_ALONE


def test_one_copy_to_the_host_and_one_sync_for_the_kdes_window(counts):
    for found in counts.values():
        assert found["to_host"] == 1
        assert found["host_calls"] == {"numpy": 1}  # to_host's own, whatever the number of layers
        assert found["syncs"] == 1  # the KDEs' window width, read just before that copy waits for the device anyway


def test_flushing_after_every_layer_gives_the_numbers_of_one_flush(monkeypatch):
    """A GPU sends the waiting numbers to the host early past capture.PENDING_BUDGET; the numbers do not change."""
    import importlib

    from analysis import analyze_ids

    capture = importlib.import_module("analysis.capture")
    metrics = importlib.import_module("analysis.metrics")
    loaded = build_small("gpt2-small", 3)
    ids = np.random.default_rng(1).integers(3, 400, 20)  # [pos]
    monkeypatch.setattr(metrics, "NUMPY_ON_CPU", False)  # the batched torch route a GPU runs
    once = analyze_ids(loaded, ids, attention="sdpa")
    monkeypatch.setitem(capture.PENDING_BUDGET, "cpu", 1)  # flush after every group,
    monkeypatch.setitem(capture.GROUP_BUDGET, "cpu", 1)  # of one layer each
    flushes = []
    real = capture._Recorder.flush
    monkeypatch.setattr(capture._Recorder, "flush", lambda self: flushes.append(1) or real(self))
    each = analyze_ids(loaded, ids, attention="sdpa")
    assert len(flushes) == 3 + 1  # one a layer, then the (empty) last
    assert each.to_dict() == once.to_dict()


def test_a_corpus_pass_measures_its_texts_at_once():
    """A GPU measures a corpus pass's texts at once (capture.TEXTS_AT_ONCE): the launches a text fall with the texts
    a pass (one set of operations for all of them), and each pass makes one copy to the host."""
    from benchmarks.op_count import corpus_texts, count_corpus_ops

    loaded = build_small("gpt2-small", 2)
    texts = corpus_texts(loaded, 16)
    alone, together = (count_corpus_ops(loaded, texts, size) for size in (1, 16))
    assert alone["to_host"] == 16 and together["to_host"] <= 4  # a copy a pass (16 texts of up to 3 widths)
    assert together["launches_per_text"] < alone["launches_per_text"] / 4


def test_the_centered_dot_products_are_centered_on_the_host_bit_for_bit(monkeypatch):
    """The device sends the raw dot products and one offset per (query head, key head), not the centered ones too
    (half the bytes: the dot products are most of what a long text sends); the host's subtraction is the device's
    own, so the centered numbers are the ones the device made, bit for bit. A grouped-query model (Llama shape)."""
    import importlib

    from analysis import analyze_ids

    capture = importlib.import_module("analysis.capture")
    metrics = importlib.import_module("analysis.metrics")
    monkeypatch.setattr(metrics, "NUMPY_ON_CPU", False)  # the route a GPU runs: the Mann-Whitney ranks on the device
    loaded = build_small("llama-0.7b", 2)
    ids = np.random.default_rng(2).integers(3, 400, 30)  # [pos]
    made, sent = [], []
    real_measures, real_send = capture.compute_qk_measures_t, capture.send_to_host

    def measures(*args, **kwargs):
        out = real_measures(*args, **kwargs)
        made.append({name: out[name].clone() for name in capture.CENTERED})  # [layer, ...] as the device made them
        return out

    monkeypatch.setattr(capture, "compute_qk_measures_t", measures)
    monkeypatch.setattr(capture, "send_to_host", lambda tensors: sent.extend(tensors) or real_send(tensors))
    result = analyze_ids(loaded, ids, attention="sdpa")
    assert sent and not [key for key in sent if key[-1] in capture.CENTERED]
    device = {name: np.concatenate([found[name].numpy() for found in made]) for name in capture.CENTERED}
    for layer, measured in result.layers.items():  # groups in layer order: row `layer` of the stacked rows
        stats = measured.dp_stats
        assert np.array_equal(stats.same_head_dp_centered, device["same_head_dp_centered"][layer])
        assert np.array_equal(stats.diff_head_dp_centered, device["diff_head_dp_centered"][layer])
        assert stats.diff_head_dp_centered.size == 32 * 7 * (ids.size - 2) and np.abs(stats.diff_head_dp_centered).max()

import threading

import numpy as np

from analysis import analyze, capture
from tests.conftest import FIJI, REPEATS
from tests.reference import capture_c_attn


def test_c_attn_hook_route_equals_the_attention_interface_route(gpt2):
    captured = capture(gpt2, FIJI, pattern_layers=[])
    for layer in (0, 6, 7):
        q, k = capture_c_attn(gpt2, FIJI, layer)
        np.testing.assert_array_equal(captured.q[layer], q)
        np.testing.assert_array_equal(captured.k[layer], k)


def test_one_forward_pass_captures_every_layer(gpt2):
    calls = []
    handle = gpt2.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        result = analyze(gpt2, FIJI)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert sorted(result.layers) == list(range(8))


def test_the_pass_ends_at_the_last_attention(gpt2):
    """Nothing after the last layer's attention runs (its MLP measures nothing); the model is whole afterwards."""
    import torch

    last = gpt2.model.h[-1]
    ran = {"attn": 0, "mlp": 0}
    handles = [last.attn.register_forward_pre_hook(lambda *args: ran.__setitem__("attn", ran["attn"] + 1)),
               last.mlp.register_forward_pre_hook(lambda *args: ran.__setitem__("mlp", ran["mlp"] + 1))]
    try:
        analyze(gpt2, FIJI)
        assert ran == {"attn": 1, "mlp": 0}
        with torch.inference_mode():
            out = gpt2.model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        for handle in handles:
            handle.remove()
    assert ran == {"attn": 2, "mlp": 1}
    assert out.last_hidden_state.shape == (1, 3, gpt2.model.config.n_embd)


def test_patterns_only_for_requested_layers(gpt2):
    captured = capture(gpt2, FIJI, pattern_layers=[3])
    assert len(captured.q) == len(captured.k) == 8
    assert list(captured.patterns) == [3]


def test_idle_model_is_a_plain_eager_model(gpt2, monkeypatch):
    """With no recorder active the capturing attention is a pass-through: nothing is kept."""
    import importlib

    import torch
    from transformers import AutoModel

    capture_module = importlib.import_module("analysis.capture")  # the module: `analysis.capture` is the function
    recorded, record = [], capture_module._Recorder.record

    def counting_record(self, *args):
        recorded.append(self.n_layers)
        record(self, *args)

    monkeypatch.setattr(capture_module._Recorder, "record", counting_record)
    inputs = gpt2.tokenizer(FIJI, return_tensors="pt")
    stock = AutoModel.from_pretrained(gpt2.info.path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = gpt2.model(**inputs, output_attentions=True)
        want = stock(**inputs, output_attentions=True)
    assert recorded == []  # the idle pass handed nothing to a recorder
    assert len(out.attentions) == 8
    assert torch.equal(out.last_hidden_state, want.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, want.attentions, strict=True))
    capture(gpt2, FIJI, pattern_layers=[])  # the same patch does see an active recorder: one call per layer
    assert len(recorded) == 8


def test_two_threads_share_one_model(gpt2):
    expected = {text: analyze(gpt2, text, layers=[6]).layers[6] for text in (FIJI, REPEATS)}
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def work(index, text):
        try:
            barrier.wait()
            for _ in range(3):
                results[index, _] = (text, analyze(gpt2, text, layers=[6]).layers[6])
        except Exception as exc:  # noqa: BLE001  (any failure in a thread is reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, (FIJI, REPEATS)[i % 2])) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 12
    for text, layer in results.values():
        np.testing.assert_array_equal(layer.q_means, expected[text].q_means)
        np.testing.assert_array_equal(layer.patterns, expected[text].patterns)


def test_charts_need_no_torch():
    """reports.charts imports no torch: key_head_of lives in the torch-free analysis.heads."""
    import subprocess
    import sys

    code = "import sys\nimport reports.charts\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "False"


def test_results_leave_page_locked_memory_as_copies_of_their_own(monkeypatch):
    """patterns.copy_out (a GPU's results, out of page-locked memory): the same values in fresh memory, by one
    thread for a small buffer and by several for a large one, split at every size."""
    from analysis import patterns

    monkeypatch.setattr(patterns, "COPY_PART", 64)  # bytes: 8 float64 a part, so small arrays take the threads
    monkeypatch.setattr(patterns.os, "cpu_count", lambda: 8)
    rng = np.random.default_rng(0)
    for n in (0, 1, 15, 16, 17, 63, 64, 65, 1001):
        source = rng.normal(size=n)
        out = patterns.copy_out(source)
        np.testing.assert_array_equal(out, source)
        assert out.dtype == source.dtype and not np.shares_memory(out, source)
    assert patterns._COPY_POOL  # the large ones went through the threads

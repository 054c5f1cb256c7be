"""How many aten operations headscope's measurement dispatches, per layer and after the pass: a deterministic,
device-agnostic proxy for a GPU's launch overhead (each operation is at least one launch there), which no timing
noise moves.

    python -m benchmarks.op_count [--tokens 64 1024] [--corpus-batch 1 32]

Builds the GPT-2-small shape (12 layers, 12 heads) and the Llama shape of bench_analysis (16 layers, 32 query
heads, 8 key heads) with the same layer and head counts but 8-wide heads (the operation count does not depend on
the widths), runs `analyze_ids` on every layer with the route a GPU runs (sdpa; the KDE and the Mann-Whitney
ranks in torch, metrics.NUMPY_ON_CPU off) and counts, with a TorchDispatchMode, the operations inside the
recorder: `measure` (`record`, once per layer in the pass, and `measure_group`, once per group of layers that
capture.GROUP_BUDGET stacks: the pattern rebuilt and reduced in blocks of query rows, the q/k statistics and dot
products) and `flush` (after the pass: every layer's Mann-Whitney parts and KDEs in batched operations, then one
copy to the host). It also counts the copies to the host (calls of
patterns.send_to_host, and of Tensor.cpu/numpy/tolist/item inside the recorder), the bytes of those copies
(`to_host_mib`: the dot products' count does not depend on the heads' widths, so this is the real shapes' figure)
and the device syncs of `.item()`.
tests/analysis/test_op_count.py holds the per-layer and after-the-pass counts to the bounds stated there.

Then, per shape, a corpus run (count_corpus_ops: corpus.capture_texts of 64 texts of 56-71 tokens, `--corpus-batch`
texts a pass, a GPU's route, where a pass's texts are measured at once, capture.TEXTS_AT_ONCE) with its launches a
text.

`measure_gib`, `flush_gib`: the memory traffic of those operations, each one's tensors read and written once
(an expanded input counted at its own size; a gather what it returns, read and written; a GEMM with a beta=1
input adds the copy of that input into its output and the read of it back): what bounds a GPU's time at a few
thousand tokens, where the T x T blocks are the traffic. The blocks have the real head counts and lengths, so
the figure is the real shapes' less their q, k and v widths. `peak_mib`: the most bytes the tensors those
operations made held at once (the device memory the measurement adds to the pass, less the model's own q, k, v
and outputs that its groups hold), counted the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"gpt2-small": (12, 12, 12), "llama-0.7b": (16, 32, 8)}  # layers, query heads, key heads
GATHERS = ("aten.index", "aten.gather", "aten.index_select")  # traffic: their output twice, not their source
D_HEAD = 8
REAL_D_HEAD = 64  # both shapes' head width: capture.GROUP_BUDGET counts q, k, v and output bytes, which scale with it


def build_small(shape: str, n_layers: int | None = None):
    """A LoadedModel of the shape's layer and head counts with D_HEAD-wide heads, random weights, on the CPU."""
    import copy

    import torch
    from transformers import AutoModel, GPT2Config, LlamaConfig

    from analysis.capture import CAPTURE_ATTENTION, register_capture_attention
    from analysis.loading import LoadedModel, model_info_from_config
    from tests.checkpoints import gpt2_tokenizer, llama_tokenizer

    layers, heads, kv_heads = SHAPES[shape]
    layers = layers if n_layers is None else n_layers
    if shape == "gpt2-small":
        tokenizer = gpt2_tokenizer()
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=4096, n_embd=heads * D_HEAD, n_layer=layers,
                            n_head=heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        tokenizer = llama_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=heads * D_HEAD, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    register_capture_attention()
    torch.manual_seed(0)
    model = AutoModel.from_config(copy.deepcopy(config), attn_implementation=CAPTURE_ATTENTION).eval()
    info = model_info_from_config(config, id=shape, path="", revision="random", dtype="float32", device="cpu",
                                  reason="op count")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def count_measurement_ops(loaded, ids, attention: str = "sdpa", numpy_on_cpu: bool = False,
                          group_budget: int | None = None, run=None) -> dict:
    """{"measure": operations measuring the layers (in the pass, early copies to the host included), "flush": after the
    pass, "measure_launches"/"flush_launches": those that are not views (kernels on a GPU), "groups": layer groups
    measured, "to_host": calls of patterns.send_to_host, "to_host_mib": the bytes they copied, "host_calls": {Tensor
    method: calls} of cpu, numpy, tolist and item (copies to the host or syncs), "syncs": aten.item dispatches,
    "measure_gib"/"flush_gib": their memory traffic, "peak_mib": the most their tensors held at once, "layers": n}
    of one analyze_ids(loaded, ids) on every layer, patterns not kept, with a GPU's sizes and routes
    (capture.WORK_BUDGET, capture.GROUP_BUDGET, capture.HOLD_BUDGET, capture.PENDING_BUDGET, capture.TEXTS_AT_ONCE,
    metrics.KDE_CHUNK, no patterns.CAUSAL_ROWS, patterns.ENTROPY_FROM_SCORES, metrics.HEAD_STATS_BY_NORM).
    `group_budget`: capture.GROUP_BUDGET's bytes instead (1: one layer a group).
    `run`: what to count instead of that analyze_ids, a function of no arguments (count_corpus_ops)."""
    import importlib
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    capture, metrics, pipeline = (importlib.import_module(f"analysis.{name}")  # the modules, not analysis.capture()
                                  for name in ("capture", "metrics", "pipeline"))
    if run is None:
        def run():
            pipeline.analyze_ids(loaded, ids, keep_patterns=False, attention=attention)
    run()  # warm-up: per-shape caches filled

    class Count(TorchDispatchMode):
        def __init__(self, phase: str):
            super().__init__()
            self.phase = phase

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            phases[self.phase][name] += 1
            result = func(*args, **(kwargs or {}))
            if not func.is_view:
                launches[self.phase][name] += 1
                tensors = [*_tensors(args), *_tensors((kwargs or {}).values()), *_tensors([result])]
                if name in GATHERS:  # reads only what it returns (and its indices), not its whole source
                    tensors = [*tensors[1:], *_tensors([result])]
                traffic[self.phase] += sum(map(_stored_bytes, tensors))
                if name in ("aten.baddbmm", "aten.addmm") and (kwargs or {}).get("beta", 1) != 0:
                    traffic[self.phase] += 2 * _stored_bytes(result)  # its input copied in, then read back
                inputs = {t.untyped_storage().data_ptr() for t in _tensors(args)}
                for t in _tensors([result]):  # a new tensor: alive until it is collected (its views hold it)
                    key = t.untyped_storage().data_ptr()
                    if key not in inputs and key not in alive:  # not an in-place result
                        alive[key] = t.untyped_storage().nbytes()
                        memory[0] += alive[key]
                        memory[1] = max(memory[1], memory[0])
                        weakref.finalize(t, release, key)
            return result

    def release(key):
        memory[0] -= alive.pop(key, 0)

    phases = {"measure": Counter(), "flush": Counter()}
    launches = {"measure": Counter(), "flush": Counter()}  # the operations that are not views: kernels on a GPU
    traffic = {"measure": 0, "flush": 0}  # bytes those operations read and write
    alive, memory = {}, [0, 0]  # storages they made and still alive: bytes now, the peak
    copies, groups, sent_bytes = [0], [0], [0]
    methods = {"record": "measure", "measure_groups": "measure", "measure_group": "measure",
               "flush": "flush", "collect": "flush"}  # recorder method -> phase
    originals = {name: getattr(capture._Recorder, name) for name in methods}
    original_send, original_numpy = capture.send_to_host, metrics.NUMPY_ON_CPU
    budgets = {name: dict(getattr(capture, name)) for name in ("WORK_BUDGET", "GROUP_BUDGET", "HOLD_BUDGET",
                                                                "PENDING_BUDGET", "TEXTS_BUDGET")}
    patterns = importlib.import_module("analysis.patterns")
    cpu_sizes = (metrics.KDE_CHUNK, patterns.CAUSAL_ROWS, dict(patterns.ENTROPY_FROM_SCORES),
                 dict(metrics.HEAD_STATS_BY_NORM))
    texts_at_once = dict(capture.TEXTS_AT_ONCE)

    host_calls: Counter = Counter()  # Tensor.cpu/numpy/tolist/item inside the measurement: each a copy or a sync
    active = [False]
    host_methods = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist", "item")}

    def counted(name):
        def method(self, *args, **kwargs):
            groups[0] += name == "measure_group"
            if active[0]:  # called by another counted method: counted there
                return originals[name](self, *args, **kwargs)
            active[0] = True
            try:
                with Count(methods[name]):
                    return originals[name](self, *args, **kwargs)
            finally:
                active[0] = False
        return method

    def send_to_host(tensors):
        copies[0] += 1
        sent = original_send(tensors)
        sent_bytes[0] += sent.buffer.nbytes
        return sent

    def watched(name):
        def method(self, *args, **kwargs):
            if active[0]:
                host_calls[name] += 1
            return host_methods[name](self, *args, **kwargs)
        return method

    try:
        for name in methods:
            setattr(capture._Recorder, name, counted(name))
        for name in host_methods:
            setattr(torch.Tensor, name, watched(name))
        capture.send_to_host = send_to_host
        metrics.NUMPY_ON_CPU = numpy_on_cpu
        capture.WORK_BUDGET["cpu"] = capture.WORK_BUDGET["cuda"]  # the blocks of query rows a GPU would take,
        capture.GROUP_BUDGET["cpu"] = group_budget or (  # its layer groups (of 64-wide heads: the real shapes'),
            capture.GROUP_BUDGET["cuda"] * D_HEAD // REAL_D_HEAD)
        capture.HOLD_BUDGET["cpu"] = capture.HOLD_BUDGET["cuda"]  # measured as they close,
        capture.PENDING_BUDGET["cpu"] = capture.PENDING_BUDGET["cuda"]  # its numbers sent early past its budget,
        capture.TEXTS_BUDGET["cpu"] = capture.TEXTS_BUDGET["cuda"]  # its chunks of a corpus pass's texts,
        metrics.KDE_CHUNK = 2**17  # its KDE blocks,
        patterns.CAUSAL_ROWS = 2**30  # no short causal blocks (a CPU's),
        patterns.ENTROPY_FROM_SCORES["cpu"] = patterns.ENTROPY_FROM_SCORES["cuda"]  # its route to the entropy,
        metrics.HEAD_STATS_BY_NORM["cpu"] = metrics.HEAD_STATS_BY_NORM["cuda"]  # to the head statistics,
        capture.TEXTS_AT_ONCE["cpu"] = capture.TEXTS_AT_ONCE["cuda"]  # and a corpus pass's texts measured at once
        run()
    finally:
        for name, method in originals.items():
            setattr(capture._Recorder, name, method)
        for name, method in host_methods.items():
            setattr(torch.Tensor, name, method)
        capture.send_to_host, metrics.NUMPY_ON_CPU = original_send, original_numpy
        for name, values in budgets.items():
            getattr(capture, name).update(values)
        metrics.KDE_CHUNK, patterns.CAUSAL_ROWS, entropy, head_stats = cpu_sizes
        patterns.ENTROPY_FROM_SCORES.update(entropy)
        metrics.HEAD_STATS_BY_NORM.update(head_stats)
        capture.TEXTS_AT_ONCE.update(texts_at_once)
    syncs = sum(counter[name] for counter in phases.values() for name in ("aten.item", "aten._local_scalar_dense"))
    return {**{name: sum(counter.values()) for name, counter in phases.items()},
            **{f"{name}_launches": sum(counter.values()) for name, counter in launches.items()},
            "measure_gib": round(traffic["measure"] / 2**30, 2), "flush_gib": round(traffic["flush"] / 2**30, 2),
            "peak_mib": round(memory[1] / 2**20, 1),
            "groups": groups[0], "to_host": copies[0], "to_host_mib": round(sent_bytes[0] / 2**20, 2),
            "host_calls": dict(host_calls), "syncs": syncs,
            "layers": loaded.info.n_layers}


def count_corpus_ops(loaded, texts: list[str], batch_size: int) -> dict:
    """count_measurement_ops of a corpus run (corpus.capture_texts, `batch_size` texts a pass, with the corpus's
    reduction), with "texts" and "launches_per_text": the measurement's launches (in the pass and after it) per
    text."""
    import importlib

    corpus = importlib.import_module("analysis.corpus")
    reduce = corpus.text_values(loaded.info.to_dict())
    by_length = dict(corpus.PASSES_BY_LENGTH)
    corpus.PASSES_BY_LENGTH["cpu"] = by_length["cuda"]  # a GPU's passes: texts of similar lengths
    try:
        found = count_measurement_ops(loaded, None,
                                      run=lambda: corpus.capture_texts(loaded, texts, batch_size, reduce))
    finally:
        corpus.PASSES_BY_LENGTH.update(by_length)
    launches = found["measure_launches"] + found["flush_launches"]
    return {**found, "texts": len(texts), "batch_size": batch_size,
            "launches_per_text": round(launches / len(texts), 1)}


def corpus_texts(loaded, n: int = 64, seed: int = 0) -> list[str]:
    """`n` texts of random tokens that the model's tokenizer reads as 56 to 71 tokens each (the issue's corpus of
    about 64 tokens a text)."""
    import numpy as np

    rng, tokenizer, texts = np.random.default_rng(seed), loaded.tokenizer, []
    while len(texts) < n:
        text = tokenizer.decode(rng.integers(3, len(tokenizer), int(rng.integers(40, 72))))
        if 56 <= len(tokenizer(text)["input_ids"]) < 72:
            texts.append(text)
    return texts


def _tensors(values):
    """The tensors among `values`, one level of lists and tuples down (cat's and stack's inputs)."""
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _stored_bytes(t) -> int:
    """Bytes of the elements a tensor addresses: an expanded (stride-0) dimension counts once."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        count *= size if stride else 1
    return count * t.element_size()


def main(argv=None) -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--corpus-batch", type=int, nargs="*", default=[1, 32],
                        help="texts per pass of the corpus runs counted (64 texts of about 64 tokens)")
    args = parser.parse_args(argv)
    for shape in SHAPES:
        loaded = build_small(shape)
        for n in args.tokens:
            ids = np.random.default_rng(0).integers(3, len(loaded.tokenizer), n)  # [pos]
            for budget in (None, 1):  # a GPU's layer groups; one layer a group
                found = count_measurement_ops(loaded, ids, group_budget=budget)
                found["measure_launches_per_layer"] = round(found["measure_launches"] / found["layers"], 1)
                found["measure_gib_per_layer"] = round(found["measure_gib"] / found["layers"], 2)
                print(json.dumps({"shape": shape, "tokens": n, **found}), flush=True)
        texts = corpus_texts(loaded)
        for size in args.corpus_batch:
            found = count_corpus_ops(loaded, texts, size)
            print(json.dumps({"shape": shape, "corpus": True, **found}), flush=True)


if __name__ == "__main__":
    main()

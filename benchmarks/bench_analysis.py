"""Speed and memory of the analysis, as ratios against the model's plain forward pass.

    python -m benchmarks.bench_analysis --device cpu|cuda --shape gpt2-small|llama-0.7b
        [--tokens 64 256 1024] [--runs 3] [--dtype float32|bfloat16] [--corpus-texts 1000]
        [--corpus-batch-sizes 1 32] [--no-memory]

Builds a random checkpoint of the shape in memory on the device (GPT2Config() defaults, 124M parameters; or a
Llama shape of 16 layers, 32 query heads, 8 key heads, d_model 2048, d_ff 5632), with headscope's capturing
attention, and a second copy of the same weights with the default sdpa attention. For each length, timed
interleaved in one process (median of --runs after a warm-up, synchronised on a GPU):
  (a) the plain sdpa forward pass,
  (b) analysis.analyze on one layer and on every layer, with every measurement and parity on,
  (c) TransformerLens's run_with_cache on the same weights (GPT-2 shape, when transformer_lens is installed),
then the peak memory beyond the weights of (a) and (b) at the longest length (the device's peak allocation on a
GPU; the process's peak RSS, each in a fresh subprocess, on the CPU), and corpus throughput: texts per second of
analysis.corpus.analyze_corpus over --corpus-texts texts of about 64 tokens at batch size 1 and 32 (or
--corpus-batch-sizes), with each size's speedup over the first.
Not part of the tests: timings on shared machines are noisy, so only ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ("gpt2-small", "llama-0.7b")


def build_checkpoint(path: Path) -> Path:
    """A GPT-2-small-shaped random checkpoint saved to `path` (bench_corpus loads it from disk)."""
    from transformers import GPT2Config

    from tests.checkpoints import gpt2_tokenizer, save_checkpoint

    if not (path / "model.safetensors").exists():
        tokenizer = gpt2_tokenizer()
        save_checkpoint(GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                        tokenizer, path)
    return path


def shape_config(shape: str):
    from transformers import GPT2Config, LlamaConfig

    from tests.checkpoints import gpt2_tokenizer, llama_tokenizer

    if shape == "gpt2-small":
        tokenizer = gpt2_tokenizer()
        return GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id), tokenizer
    tokenizer = llama_tokenizer()
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id), tokenizer


def build_models(shape: str, device: str, dtype: str):
    """(LoadedModel with headscope's attention, the same weights with sdpa), built on the device, random weights."""
    import copy

    import torch
    from transformers import AutoModel

    from analysis.capture import CAPTURE_ATTENTION, register_capture_attention
    from analysis.loading import DTYPES, LoadedModel, model_info_from_config

    register_capture_attention()
    config, tokenizer = shape_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(copy.deepcopy(config), attn_implementation=CAPTURE_ATTENTION,
                                      dtype=DTYPES[dtype]).eval()
        plain = AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=DTYPES[dtype]).eval()
    plain.load_state_dict(model.state_dict())
    info = model_info_from_config(config, id=shape, path="", revision="random", dtype=dtype, device=device,
                                  reason="benchmark")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info), plain


def cpu_description() -> dict:
    """What tells two CPUs apart in these ratios (the same shape's ratios differ between machines: the README's
    CPU section): the model name, the vector instructions ATen's kernels use and the last-level cache, where the
    system says (Linux)."""
    import torch

    found = {"cpu": platform.processor() or platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}
    cpuinfo, caches = Path("/proc/cpuinfo"), list(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        found["cpu"] = names[0] if names else found["cpu"]
    if caches:  # the highest level's size, as the kernel writes it ("491520K" for 480 MiB)
        last = max(caches, key=lambda index: int((index / "level").read_text()))
        found["last_cache"] = (last / "size").read_text().strip()
    return found


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def token_ids(tokenizer, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(3, len(tokenizer), n)  # [pos]: past the special tokens


def bench_speed(loaded, plain, device: str, lengths: list[int], runs: int, transformer_lens) -> list[dict]:
    import torch

    from analysis import analyze_ids

    rows = []
    middle = loaded.info.n_layers // 2
    for n in lengths:
        ids = token_ids(loaded.tokenizer, n)
        tensor = torch.as_tensor(ids, device=device)[None]  # [batch=1, pos]

        def forward(tensor=tensor):
            with torch.inference_mode():
                plain(input_ids=tensor)

        steps = {"forward": forward,
                 "one_layer": lambda ids=ids: analyze_ids(loaded, ids, layers=[middle]),
                 "all_layers": lambda ids=ids: analyze_ids(loaded, ids)}
        if transformer_lens is not None:
            def run_with_cache(tensor=tensor):
                with torch.inference_mode():
                    transformer_lens.run_with_cache(tensor)
            steps["tl_run_with_cache"] = run_with_cache
        for fn in steps.values():  # warm-up
            fn()
        times = {name: [] for name in steps}
        for _ in range(runs):  # interleaved, so drift hits every measurement alike
            for name, fn in steps.items():
                times[name].append(timed(fn, device))
        med = {name: statistics.median(values) for name, values in times.items()}
        row = {"tokens": n, "forward_ms": round(med["forward"] * 1e3, 2),
               **{f"{name}_x": round(med[name] / med["forward"], 2) for name in steps if name != "forward"}}
        parity = max(layer.parity_max_abs_err for layer in analyze_ids(loaded, ids).layers.values())
        row["parity_max"] = float(f"{parity:.2g}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gpu_memory(loaded, plain, n: int) -> dict:
    import torch

    from analysis import analyze_ids

    ids = token_ids(loaded.tokenizer, n)
    tensor = torch.as_tensor(ids, device="cuda")[None]  # [batch=1, pos]
    out = {}
    for name, fn in (("forward", lambda: plain(input_ids=tensor)), ("analyze", lambda: analyze_ids(loaded, ids))):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        out[f"{name}_extra_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    print(json.dumps({"tokens": n, **out}), flush=True)
    return out


def peak_rss_during(fn) -> tuple[float, float]:
    """(RSS before, peak RSS during fn) in MiB, sampled every millisecond by a watcher thread."""
    import threading

    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    before = process.memory_info().rss
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return before / 2**20, max(peak[0], before) / 2**20


def cpu_memory_child(shape: str, n: int, which: str, dtype: str) -> None:
    """In a fresh process: build the models, then print the RSS peak that one forward (a) or analyze (b) adds."""
    import torch

    from analysis import analyze_ids

    loaded, plain = build_models(shape, "cpu", dtype)
    ids = token_ids(loaded.tokenizer, n)
    tensor = torch.as_tensor(ids)[None]  # [batch=1, pos]
    run = (lambda: plain(input_ids=tensor)) if which == "forward" else (lambda: analyze_ids(loaded, ids))
    with torch.inference_mode():  # no warm-up: freed memory stays in the process and would hide the peak
        before, peak = peak_rss_during(run)
    print(json.dumps({"model_mib": before, "extra_mib": peak - before}))


def cpu_memory(shape: str, n: int, dtype: str) -> dict:
    out = {}
    for which in ("forward", "analyze"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", shape, str(n), which, dtype],
                              capture_output=True, text=True, check=True)
        out[f"{which}_extra_mib"] = round(json.loads(proc.stdout.strip().splitlines()[-1])["extra_mib"], 1)
    print(json.dumps({"tokens": n, **out}), flush=True)
    return out


def corpus_texts(n: int, words_per_text: int = 64) -> list[str]:
    import numpy as np

    from tests.checkpoints import CORPUS

    words = " ".join(CORPUS).split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, words_per_text)) for _ in range(n)]


def bench_corpus(loaded, device: str, n_texts: int, sizes=(1, 32)) -> dict:
    from analysis.corpus import analyze_corpus

    texts = corpus_texts(n_texts)
    analyze_corpus(loaded, texts[:8], batch_size=8, n_boot=10)  # warm-up
    out = {}
    for size in sizes:
        seconds = timed(lambda: analyze_corpus(loaded, texts, batch_size=size, n_boot=10), device)  # noqa: B023
        out[f"texts_per_s_batch_{size}"] = round(n_texts / seconds, 1)
    for size in sizes[1:]:  # against the first size (one text a pass)
        out[f"speedup_{size}"] = round(out[f"texts_per_s_batch_{size}"] / out[f"texts_per_s_batch_{sizes[0]}"], 1)
    print(json.dumps({"corpus_texts": n_texts, **out}), flush=True)
    return out


def transformer_lens_bridge(plain, tokenizer, device: str):
    """TransformerLens's TransformerBridge (4.x) over an eager GPT-2 with the LM head and `plain`'s weights, or
    None when transformer_lens is not installed."""
    import copy
    import tempfile

    try:
        from transformer_lens import TransformerBridge
    except Exception as exc:  # noqa: BLE001 - not installed, or a dependency of it missing or too old there
        print(f"TransformerLens unavailable ({type(exc).__name__}: {exc}): run_with_cache comparison skipped.",
              flush=True)
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tempfile.mkdtemp(prefix="headscope-tl-")
    config = copy.deepcopy(plain.config)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with __import__("torch").device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=plain.dtype).eval()
    model.transformer.load_state_dict(plain.state_dict())
    try:
        return TransformerBridge.boot_transformers(folder, hf_model=model, device=device,
                                                   tokenizer=AutoTokenizer.from_pretrained(folder))
    except Exception as exc:  # noqa: BLE001 - an optional comparison: the benchmark goes on without it
        print(f"TransformerLens failed to boot ({type(exc).__name__}: {exc}): run_with_cache comparison skipped.",
              flush=True)
        return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        cpu_memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="gpt2-small", choices=SHAPES)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 for gpt2-small, bfloat16 for llama-0.7b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--corpus-texts", type=int, default=200, help="0: no corpus throughput")
    parser.add_argument("--corpus-batch-sizes", type=int, nargs="+", default=[1, 32],
                        help="batch sizes of the corpus throughput, the first the one the others are compared with")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.shape == "gpt2-small" else "bfloat16")
    machine = {"machine": torch.cuda.get_device_name()} if args.device == "cuda" else cpu_description()
    print(json.dumps({**machine, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "shape": args.shape, "dtype": dtype, "device": args.device}),
          flush=True)
    loaded, plain = build_models(args.shape, args.device, dtype)
    tl = transformer_lens_bridge(plain, loaded.tokenizer, args.device) if args.shape == "gpt2-small" else None
    bench_speed(loaded, plain, args.device, args.tokens, args.runs, tl)
    del tl
    if not args.no_memory:
        if args.device == "cuda":
            gpu_memory(loaded, plain, max(args.tokens))
        else:
            cpu_memory(args.shape, max(args.tokens), dtype)
    if args.corpus_texts:
        bench_corpus(loaded, args.device, args.corpus_texts, args.corpus_batch_sizes)


if __name__ == "__main__":
    main()

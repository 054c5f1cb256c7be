"""Where the GPU time of an all-layer analysis goes: torch.profiler over one analyze_ids against one plain forward.

    python -m benchmarks.gpu_profile [--shape llama-0.7b] [--tokens 1024 4096] [--top 20] [--corpus-texts 256]

For each length, after a warm-up: the wall time of the plain sdpa forward and of analyze_ids, the device time
their kernels took and how many kernels ran (device time well below the wall time means launch- or host-bound),
and the kernels of the analysis that took the most device time, then the host's Python functions that took the most
time (cProfile, by own time). One JSON line per length, then the tables. Then the same for the corpus mode
(analyze_corpus at batch size 32), what moving results to the host costs (copy_probe), and what the rebuild's
score product would cost on tensor cores (product_probe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profiled(fn):
    """(wall seconds, device seconds, kernels, key_averages) of one call of fn under torch.profiler."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    return wall, sum(a.self_device_time_total for a in averages) / 1e6, kernels, averages


def main() -> None:
    import torch

    from analysis import analyze_ids
    from benchmarks.bench_analysis import SHAPES, build_models, token_ids

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-0.7b", choices=SHAPES)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--corpus-texts", type=int, default=256, help="0: no corpus profile")
    args = parser.parse_args()
    dtype = "float32" if args.shape == "gpt2-small" else "bfloat16"
    loaded, plain = build_models(args.shape, "cuda", dtype)
    for n in args.tokens:
        ids = token_ids(loaded.tokenizer, n)
        tensor = torch.as_tensor(ids, device="cuda")[None]

        def forward(tensor=tensor):
            with torch.inference_mode():
                plain(input_ids=tensor)

        def analysis(ids=ids):
            analyze_ids(loaded, ids)

        for fn in (forward, analysis):
            fn()
        rows = {}
        for name, fn in (("forward", forward), ("analyze", analysis)):
            wall, device, count, averages = profiled(fn)
            rows[name] = {"wall_ms": round(wall * 1e3, 1), "device_ms": round(device * 1e3, 1), "kernels": count}
        print(json.dumps({"tokens": n, **rows}), flush=True)
        print(averages.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60),
              flush=True)
        print(host_profile(analysis, args.top), flush=True)
    if args.corpus_texts:
        profile_corpus(loaded, args.corpus_texts, args.top)
    copy_probe()
    product_probe()


def copy_probe(mib: int = 256) -> None:
    """What moving `mib` MiB of float64 results to pageable host memory costs: a pageable copy from the device,
    a page-locked one, and copying out of page-locked memory into fresh pageable memory by one thread, by 8
    threads, and into memory already touched (the cost of first touching fresh pages). Medians of 3, in ms."""
    import statistics
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    device = torch.empty(mib * 2**20 // 8, dtype=torch.float64, device="cuda").normal_()  # [n]
    pinned = torch.empty(device.shape, dtype=torch.float64, pin_memory=True)  # [n]
    source = pinned.numpy()
    touched = np.ones_like(source)
    pool = ThreadPoolExecutor(8)
    parts = np.array_split(np.arange(source.size), 8)

    def threaded():
        out = np.empty_like(source)
        list(pool.map(lambda part: np.copyto(out[part[0]:part[-1] + 1], source[part[0]:part[-1] + 1]), parts))

    steps = {"pageable_from_device": lambda: device.cpu(),
             "page_locked_from_device": lambda: pinned.copy_(device, non_blocking=True),
             "copy_out_1_thread": lambda: source.copy(), "copy_out_8_threads": threaded,
             "copy_into_touched": lambda: np.copyto(touched, source)}
    out = {}
    for name, fn in steps.items():
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[f"{name}_ms"] = round(statistics.median(times) * 1e3, 1)
    print(json.dumps({"copy_probe_mib": mib, **out}), flush=True)


def product_probe(device: str = "cuda", heads: int = 32, rows: int = 256, keys: int = 4096, d_head: int = 64,
                  runs: int = 10) -> dict:
    """What the score product of one block of the rebuild (metrics.compute_pattern's baddbmm: every head of a
    Llama-shape layer, `rows` query rows, `keys` keys) costs from bfloat16 q and k: as the engine runs it (the
    values as float32, float32 products), the same with TF32 allowed, and bfloat16 inputs with a float32 output
    (out_dtype: tensor cores, CUDA only). bfloat16 values are exact in TF32 and their products exact in float32, so
    the last two should differ from the first only by the order of the float32 sums: `*_max_abs` says by how much.
    Medians of `runs`, in ms; a route the device or this torch refuses gives its error instead."""
    import statistics
    import time

    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(heads, rows, d_head, device=device, generator=generator).bfloat16()  # [head, rows, d_head]
    k_t = torch.randn(heads, d_head, keys, device=device, generator=generator).bfloat16()  # [head, d_head, keys]
    zero = torch.zeros((), device=device).expand(heads, rows, keys)  # beta=0: never read

    def as_float32():
        return torch.baddbmm(zero, q.float(), k_t.float(), beta=0.0, alpha=0.125)  # [head, rows, keys]

    def tf32():
        matmul = torch.backends.cuda.matmul
        allowed = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            return as_float32()
        finally:
            matmul.allow_tf32 = allowed

    def tensor_cores():
        return torch.baddbmm(zero, q, k_t, out_dtype=torch.float32, beta=0.0, alpha=0.125)  # [head, rows, keys]

    reference = as_float32()
    out = {"heads": heads, "rows": rows, "keys": keys}
    for name, fn in (("float32", as_float32), ("tf32", tf32), ("bf16_out_float32", tensor_cores)):
        try:
            got = fn()
            times = []
            for _ in range(runs):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
        except (RuntimeError, TypeError) as exc:  # not on this device, or not in this torch
            out[f"{name}_error"] = str(exc).splitlines()[0][:200]
            continue
        out[f"{name}_ms"] = round(statistics.median(times) * 1e3, 3)
        out[f"{name}_max_abs"] = float((got.float() - reference).abs().max())
    print(json.dumps({"product_probe": out}), flush=True)
    return out


def profile_corpus(loaded, n_texts: int, top: int) -> None:
    from analysis.corpus import analyze_corpus
    from benchmarks.bench_analysis import corpus_texts

    texts = corpus_texts(n_texts)
    analyze_corpus(loaded, texts[:64], batch_size=32, n_boot=10)  # warm-up
    wall, device, count, averages = profiled(lambda: analyze_corpus(loaded, texts, batch_size=32, n_boot=10))
    print(json.dumps({"corpus_texts": n_texts, "batch_size": 32, "wall_ms": round(wall * 1e3, 1),
                      "device_ms": round(device * 1e3, 1), "kernels": count}), flush=True)
    print(averages.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60), flush=True)
    print(host_profile(lambda: analyze_corpus(loaded, texts, batch_size=32, n_boot=10), top,
                       ("tottime", "cumulative")), flush=True)


def host_profile(fn, top: int, orders=("tottime",)) -> str:
    """The host's Python functions that took the most time in one call of fn (cProfile, by own time)."""
    import cProfile
    import io
    import pstats

    host = cProfile.Profile()
    host.runcall(fn)
    out = io.StringIO()
    for order in orders:
        pstats.Stats(host, stream=out).sort_stats(order).print_stats(top if order == "tottime" else 2 * top)
    return out.getvalue()


if __name__ == "__main__":
    main()

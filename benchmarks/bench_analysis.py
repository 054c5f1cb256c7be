"""Speed and memory of the analysis, as ratios against the model's plain forward pass.

    python -m benchmarks.bench_analysis [--tokens 64 256 1024] [--runs 5]

Builds a GPT-2-small-shaped random checkpoint (GPT2Config() defaults, 124M parameters) on the fly, then
for each text length times, interleaved in one process (median of --runs after a warm-up):
  (a) the model's plain forward pass with its default attention (sdpa),
  (b) analysis.analyze on all layers with every measurement (and on layer 6 alone),
  (c) reports.html.render_report for one layer,
  (d) the app's rerun after a layer change (measurements of the new layer from the cached capture plus
      its charts; no model call),
and peak memory of (a) and (b) at the longest length, each in a fresh subprocess. Not part of the tests:
timings on shared machines are noisy, so only ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(path: Path) -> Path:
    from transformers import GPT2Config

    from tests.checkpoints import gpt2_tokenizer, save_checkpoint

    if not (path / "model.safetensors").exists():
        tokenizer = gpt2_tokenizer()
        save_checkpoint(GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                        tokenizer, path)
    return path


def text_of_length(tokenizer, n: int) -> str:
    """A text that tokenizes to n tokens (the seeded corpus, repeated and cut on a token boundary)."""
    from tests.checkpoints import CORPUS

    ids = tokenizer(" ".join(CORPUS * 20))["input_ids"]
    for cut in range(n, n - 40, -1):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer(text)["input_ids"]) == n:
            return text
    raise RuntimeError(f"no text of exactly {n} tokens")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_speed(path: Path, lengths: list[int], runs: int) -> list[dict]:
    import torch
    from transformers import AutoModel

    from analysis import analyze, capture, load_model, summarize
    from reports.charts import build_layer_charts
    from reports.html import render_report

    loaded = load_model(str(path))
    plain = AutoModel.from_pretrained(path).eval()  # default attention implementation
    rows = []
    for n in lengths:
        text = text_of_length(loaded.tokenizer, n)
        encoded = loaded.tokenizer(text, return_tensors="pt")

        def forward(encoded=encoded):  # bound now: each step is timed within its own iteration
            with torch.inference_mode():
                plain(**encoded)

        def analysis(text=text):
            return analyze(loaded, text)

        def one_layer(text=text):
            return analyze(loaded, text, layers=[6])

        captured = capture(loaded, text)
        result = analysis()
        layer_change = [0]

        def app_rerun(captured=captured, layer_change=layer_change):  # what the app does when only the layer changes
            layer_change[0] = (layer_change[0] + 1) % loaded.info.n_layers
            layer_result = summarize(captured, loaded.info.to_dict(), [layer_change[0]])
            return [item.chart.to_dict() for item in build_layer_charts(layer_result, layer_change[0], 0)]

        def report(result=result):
            return render_report(result, layers=[6])

        steps = {"forward": forward, "analyze": analysis, "layer6": one_layer, "app_rerun": app_rerun, "report": report}
        for fn in steps.values():  # warm-up
            fn()
        times = {name: [] for name in steps}
        for _ in range(runs):  # interleaved, so drift hits every measurement alike
            for name, fn in steps.items():
                times[name].append(timed(fn))
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"tokens": n, **medians, "ratio": medians["analyze"] / medians["forward"]})
        print(f"{n:>5} tokens: forward {medians['forward'] * 1e3:7.0f} ms | analyze all layers "
              f"{medians['analyze'] * 1e3:7.0f} ms = {rows[-1]['ratio']:.2f}x | layer 6 only "
              f"{medians['layer6'] / medians['forward']:.2f}x | render_report {medians['report'] * 1e3:4.0f} ms "
              f"| app rerun {medians['app_rerun'] * 1e3:4.0f} ms", flush=True)
    return rows


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


def peak_memory_child(path: str, n: int, which: str) -> None:
    """In a fresh process: load one model, then print the RSS peak that one (a) or (b) adds."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from analysis import analyze, load_model

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = text_of_length(tokenizer, n)
    if which == "forward":
        model, encoded = AutoModel.from_pretrained(path).eval(), tokenizer(text, return_tensors="pt")
        run = lambda: model(**encoded)
    else:
        loaded = load_model(path)
        run = lambda: analyze(loaded, text)
    with torch.inference_mode():  # no warm-up: freed memory stays in the process and would hide the peak
        before, peak = peak_rss_during(run)
    print(json.dumps({"model_mib": before, "extra_mib": peak - before}))


def bench_memory(path: Path, n: int) -> dict:
    out = {}
    for which in ("forward", "analyze"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(path), str(n), which],
                              capture_output=True, text=True, check=True)
        out[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak memory at {n} tokens beyond the loaded model ({out['forward']['model_mib']:.0f} MiB RSS): forward "
          f"{out['forward']['extra_mib']:.0f} MiB, analyze {out['analyze']['extra_mib']:.0f} MiB "
          f"(target: at most {2 * out['forward']['extra_mib']:.0f} MiB)", flush=True)
    return out


def bench_transformer_lens(lengths: list[int], runs: int) -> None:
    try:
        import transformer_lens  # noqa: F401
    except ImportError:
        print("TransformerLens is not installed: run_with_cache comparison skipped.")
        return
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_vocab=50257,
                                  act_fn="gelu_new", normalization_type="LN")
    model = HookedTransformer(cfg).eval()
    for n in lengths:
        tokens = torch.randint(0, 50257, (1, n))
        with torch.inference_mode():
            model(tokens)
            plain = statistics.median(timed(lambda tokens=tokens: model(tokens)) for _ in range(runs))
            cached = statistics.median(timed(lambda tokens=tokens: model.run_with_cache(tokens)) for _ in range(runs))
        print(f"TransformerLens {n:>5} tokens: run_with_cache / forward = {cached / plain:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        peak_memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "headscope-bench-gpt2")
    args = parser.parse_args()
    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    path = build_checkpoint(args.checkpoint)
    bench_speed(path, args.tokens, args.runs)
    bench_memory(path, max(args.tokens))
    bench_transformer_lens(args.tokens, args.runs)


if __name__ == "__main__":
    main()

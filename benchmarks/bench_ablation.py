"""What the ablation atlas costs, against one plain forward pass of the model with its LM head.

    python -m benchmarks.bench_ablation [--tokens 64] [--runs 3] [--batch 16 1] [--device cpu|cuda] [--verify]

Builds (or reuses) bench_analysis's GPT-2-small-shaped random checkpoint (GPT2Config(): 12 layers x 12 heads,
124M parameters, 50,257-token vocabulary; GPT-2 ties its LM head to the embeddings, so the head loads with it), then
times, medians of --runs after a warm-up: (a) one forward pass of the LM on the text, (b) the zero-ablation atlas
and (c) the mean-ablation atlas for each --batch size (rows of copies per pass). `--verify` (with --device cuda)
also computes both atlases on the CPU and prints the largest difference. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_analysis import build_checkpoint, text_of_length


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "headscope-bench-gpt2-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verify", action="store_true", help="compare the atlases with the CPU's")
    args = parser.parse_args(argv)

    import torch

    from analysis import load_model
    from analysis.ablation import compute_ablation

    loaded = load_model(str(build_checkpoint(args.checkpoint)), device=args.device, head=True)
    assert loaded.lm is not None, "the checkpoint should carry GPT-2's tied LM head"
    text = text_of_length(loaded.tokenizer, args.tokens)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"].to(loaded.info.device)
    sync = torch.cuda.synchronize if loaded.info.device.startswith("cuda") else (lambda: None)

    def forward():
        with torch.inference_mode():
            loaded.lm(input_ids=ids)
        sync()

    rows = {"forward_s": median_time(forward, args.runs)}
    for batch in args.batch:
        for mode in ("zero", "mean"):
            atlas = compute_ablation(loaded, text, mode, batch_size=batch)
            seconds = median_time(lambda m=mode, b=batch: compute_ablation(loaded, text, m, batch_size=b), args.runs)
            rows[f"{mode}_batch{batch}_s"] = seconds
            rows[f"{mode}_batch{batch}_passes"] = atlas.n_passes
            rows[f"{mode}_batch{batch}_x_forward"] = seconds / rows["forward_s"]
    if args.verify:
        cpu = load_model(str(args.checkpoint), device="cpu", head=True)
        for mode in ("zero", "mean"):
            here = compute_ablation(loaded, text, mode).delta
            there = compute_ablation(cpu, text, mode).delta
            rows[f"{mode}_max_abs_diff_vs_cpu"] = float(abs(here - there).max())
            rows[f"{mode}_max_abs_delta"] = float(abs(there).max())
    print(json.dumps({"tokens": args.tokens, "runs": args.runs, "torch": torch.__version__, "device": args.device,
                      "threads": torch.get_num_threads(), "machine": platform.machine(), **rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

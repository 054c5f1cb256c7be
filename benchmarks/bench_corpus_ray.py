"""Texts per second of the corpus mode with results kept as Parquet: the local engine against Ray Data.

    python -m benchmarks.bench_corpus_ray [--texts 1000] [--tokens 64] [--spread 8] [--device cpu|cuda]
                                          [--workers N] [--batch-size 16] [--threads N] [--json OUT]

Writes --texts seeded texts of --tokens +- --spread tokens for the bundled all-MiniLM-L6-v2 (words that are one
token each, plus [CLS] and [SEP]) to a .txt file, then, each into a fresh results folder:
  local   load_model + corpus_store.run_local (the model load is timed apart from the run), at --batch-size and
          at batch size 1 (one text per pass);
  ray     corpus_ray.run_ray from a cold start: a local Ray instance starts, a task reads the model's info, the
          worker(s) load the model, Ray Data reads, analyses and writes Parquet, Ray stops; `ray_start` is
          ray.init alone, `overhead` is the whole Ray run on one text less the local engine's time per text;
and checks that the two folders hold the same rows (the largest difference; 0.0 when the local engine runs as many
torch threads as a Ray worker, --threads 1 on a machine of 2 CPUs). Not part of the tests: timings on shared machines
are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "minilm"


def corpus_lines(loaded, n: int, tokens: int, spread: int = 0) -> list[str]:
    """n seeded texts of `tokens` +- `spread` tokens (uniform) with the model's own special tokens: single-token
    words only."""
    import numpy as np

    from tests.checkpoints import CORPUS

    tokenizer = loaded.tokenizer
    words = sorted({w for w in " ".join(CORPUS).lower().split() if w.isalpha()
                    and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1})
    extra = len(tokenizer("x")["input_ids"]) - 1  # special tokens around a text
    rng = np.random.default_rng(0)
    lengths = rng.integers(tokens - spread, tokens + spread + 1, size=n)  # [text]
    return [" ".join(rng.choice(words, int(length) - extra)) for length in lengths]


def rows_equal(a: Path, b: Path) -> float:
    """Largest difference between two results folders' per-text numbers (they must have the same rows)."""
    import numpy as np

    from analysis.corpus_store import ResultsFolder

    x, y = ResultsFolder(a).read_rows(), ResultsFolder(b).read_rows()
    assert x["text_hash"].to_pylist() == y["text_hash"].to_pylist() and x["error"].to_pylist() == y["error"].to_pylist()
    worst = 0.0
    for name in x.column_names[6:]:
        u = x[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        v = y[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        both = np.isfinite(u) & np.isfinite(v)
        assert (np.isfinite(u) == np.isfinite(v)).all(), name
        worst = max(worst, float(np.abs(u[both] - v[both]).max(initial=0.0)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--spread", type=int, default=8, help="text lengths uniform in tokens +- spread")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the local engine (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from analysis import load_model
    from analysis.corpus_io import iter_records
    from analysis.corpus_ray import run_ray
    from analysis.corpus_store import run_local

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    clock = time.perf_counter()
    loaded = load_model(MODEL, device=args.device)
    load_s = time.perf_counter() - clock
    lines = corpus_lines(loaded, args.texts, args.tokens, args.spread)
    source = work / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    one = work / "one.txt"
    one.write_text(lines[0] + "\n", encoding="utf-8")
    n_tokens = [len(loaded.tokenizer(line)["input_ids"]) for line in lines[:50]]

    local = run_local(loaded, iter_records(source), work / "local", batch_size=args.batch_size)
    single = run_local(loaded, iter_records(source), work / "local-1", batch_size=1) if args.batch_size > 1 else None
    del loaded
    ray_run = run_ray(MODEL, source, work / "ray", device=args.device, batch_size=args.batch_size,
                      workers=args.workers)
    ray_one = run_ray(MODEL, one, work / "ray-one", device=args.device, batch_size=args.batch_size,
                      workers=args.workers)
    per_text = local["seconds"] / args.texts
    report = {
        "texts": args.texts, "tokens_per_text": sum(n_tokens) / len(n_tokens), "device": args.device,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "batch_size": args.batch_size,
        "local": {"model_load_s": round(load_s, 2), "run_s": local["seconds"],
                  "texts_per_s": round(args.texts / local["seconds"], 1)},
        "local_one_text_per_pass": None if single is None else {
            "run_s": single["seconds"], "texts_per_s": round(args.texts / single["seconds"], 1),
            "max_abs_diff_to_batched": rows_equal(work / "local", work / "local-1")},
        "ray": {"run_s": ray_run["seconds"], "texts_per_s": round(args.texts / ray_run["seconds"], 1),
                "ray_init_s": ray_run["ray_start_seconds"], "workers": ray_run["workers"]},
        "ray_one_text": {"run_s": ray_one["seconds"], "ray_init_s": ray_one["ray_start_seconds"],
                         "overhead_s": round(ray_one["seconds"] - per_text, 2)},
        "max_abs_diff_local_vs_ray": rows_equal(work / "local", work / "ray"),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

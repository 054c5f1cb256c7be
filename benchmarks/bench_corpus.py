"""Peak memory of a corpus run against the number of texts: it should not grow with the corpus.

    python -m benchmarks.bench_corpus [--texts 50 200 400] [--tokens 64] [--threads N] [--batch-size 16]

Builds a GPT-2-small-shaped random checkpoint (as bench_analysis), then for each corpus size runs
analysis.corpus.analyze_corpus in a fresh subprocess on that many texts of about --tokens words each, and
reports the process's peak resident memory (ru_maxrss) after loading the model and after the corpus, and the
corpus's own growth. Streaming keeps one pass's q and k at a time (up to --batch-size texts); what grows is only
each text's small per-head numbers (about 11 KB per text for 12 x 12 heads) and the bootstrap's [n_boot, n_texts]
count chunks.
Not part of the tests: memory and time on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_analysis import build_checkpoint


def corpus_texts(n: int, tokens: int) -> list[str]:
    """n seeded texts of roughly `tokens` tokens (words drawn from the test corpus)."""
    import numpy as np

    from tests.checkpoints import CORPUS

    words = " ".join(CORPUS).split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, tokens)) for _ in range(n)]


def child(path: str, n: int, tokens: int, threads: int, batch_size: int) -> None:
    import torch

    from analysis import load_model
    from analysis.corpus import analyze_corpus

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(path)
    texts = corpus_texts(n, tokens)
    loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = analyze_corpus(loaded, texts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"texts": n, "batch_size": batch_size, "analysed": result.n_analysed, "seconds": round(seconds, 1),
                      "rss_after_load_mib": round(loaded_kb / 1024, 1), "rss_peak_mib": round(peak_kb / 1024, 1),
                      "corpus_growth_mib": round((peak_kb - loaded_kb) / 1024, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, nargs="+", default=[50, 200, 400])
    parser.add_argument("--tokens", type=int, default=64, help="words per text (about as many tokens)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per padded pass")
    parser.add_argument("--child", nargs=5, metavar=("PATH", "N", "TOKENS", "THREADS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), int(args.child[3]), int(args.child[4]))
        return
    path = build_checkpoint(Path(tempfile.gettempdir()) / "headscope-bench-gpt2-small")
    rows = []
    for n in args.texts:
        command = [sys.executable, __file__, "--child", str(path), str(n), str(args.tokens), str(args.threads),
                   str(args.batch_size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(f"peak RSS {first['rss_peak_mib']} MiB at {first['texts']} texts, {last['rss_peak_mib']} MiB at "
          f"{last['texts']} texts ({last['texts'] / first['texts']:.0f}x the texts)")


if __name__ == "__main__":
    main()

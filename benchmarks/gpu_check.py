"""On a GPU: the device-side engine gives the CPU's numbers. Prints one JSON line per check, "ok" true/false.

    python -m benchmarks.gpu_check

Tiny random GPT-2 (8 layers, 12 heads) and Llama (8 query heads, 2 key heads) checkpoints from the tests'
builders, analysed on the CPU (eager, the reference) and on cuda: with the model's eager attention (every
field within 1e-5 of the CPU's, relative to its scale), with the fused sdpa kernel (parity <= 1e-5 on every
layer, fields within 1e-4), with the numbers sent to the host after every layer group (equal to one copy after the
pass, to 1e-9), as a padded batch on cuda (each text equal to its single cuda run), and the corpus's
per-text numbers (a pass's texts measured and ranked at once on the device, analysis.batched) against the CPU's
(text by text).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = ["The majority of Fiji's islands were formed by volcanic activity starting around 150 million years ago.",
         "The cat sat on the mat. The cat sat on the mat again, and the dog watched the cat.", "the cat", "cat"]


def worst(a, b) -> float:
    """Largest difference between two results' fields, relative to each field's scale (at least 1)."""
    import numpy as np

    from analysis.results import ARRAY_FIELDS

    out = 0.0
    for layer, want in b.layers.items():
        got = a.layers[layer]
        for name in ARRAY_FIELDS:
            x, y = getattr(got, name), getattr(want, name)
            if y.size:
                out = max(out, float(np.abs(x - y).max() / max(1.0, np.abs(y).max())))
        if want.kde is not None:
            out = max(out, max(float(np.abs(got.kde[n] - want.kde[n]).max()) for n in want.kde))
    for name, values in b.head_scores.items():
        out = max(out, float(np.nanmax(np.abs(a.head_scores[name] - values))))
    return out


def corpus_check(name: str, reference, other) -> dict:
    """The corpus's per-text numbers (corpus.capture_texts) on `other`'s device against `reference`'s: the head
    scores and q/k statistics within 1e-4, the raw rank-biserial r within 1e-3 on texts of 4 tokens or more (the
    centred one of a short text is rounding noise, tests/analysis/test_corpus_store.py)."""
    import numpy as np

    from analysis.corpus import capture_texts, text_values

    rows = [capture_texts(loaded, TEXTS, 4, text_values(loaded.info.to_dict())) for loaded in (reference, other)]
    heads = float(np.nanmax(np.concatenate([np.abs(a[0][n] - b[0][n]).ravel() for a, b in zip(*rows) for n in a[0]]),
                            initial=0.0))  # NaN where a number is undefined on both (a one-token text)
    ranks = float(np.nanmax(np.concatenate([np.abs(a[1]["rank_biserial"] - b[1]["rank_biserial"])
                                            for a, b in zip(*rows) if a[2] >= 4]), initial=0.0))
    same_nans = all(np.array_equal(np.isnan(a[part][n]), np.isnan(b[part][n]))
                    for a, b in zip(*rows) for part in (0, 1) for n in a[part])
    return {"model": name, "corpus_heads_vs_cpu": heads, "corpus_rank_biserial_vs_cpu": ranks,
            "corpus_same_undefined": same_nans, "ok": heads <= 1e-4 and ranks <= 1e-3 and same_nans}


def flush_check(name: str, loaded) -> dict:
    """Numbers sent to the host after every layer group (capture.PENDING_BUDGET 0: each flush's page-locked copy
    collected at the next) against one copy after the pass: the same numbers (to 1e-9: a batched reduction over fewer
    layers may add in another order)."""
    import importlib

    from analysis import analyze

    capture = importlib.import_module("analysis.capture")
    budget = dict(capture.PENDING_BUDGET)
    once = analyze(loaded, TEXTS[0])
    capture.PENDING_BUDGET["cuda"] = 0
    try:
        early = analyze(loaded, TEXTS[0])
    finally:
        capture.PENDING_BUDGET.update(budget)
    diff = worst(early, once)
    return {"model": name, "flush_every_group_vs_once": diff, "ok": diff <= 1e-9}


def main() -> None:
    from analysis import analyze, analyze_batch, load_model
    from tests.checkpoints import tiny_gpt2, tiny_llama

    root = Path(tempfile.mkdtemp(prefix="headscope-gpu-check-"))
    ok_all = True
    for name, build in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        path = str(build(root / name))
        cpu, cuda = load_model(path), load_model(path, device="cuda")
        for text in TEXTS[:2]:
            ref = analyze(cpu, text)
            eager = analyze(cuda, text, attention="eager")
            fused = analyze(cuda, text)  # auto: sdpa on cuda
            parity = max(layer.parity_max_abs_err for layer in fused.layers.values())
            row = {"model": name, "tokens": ref.n_tokens, "cuda_eager_vs_cpu": worst(eager, ref),
                   "cuda_sdpa_vs_cpu": worst(fused, ref), "sdpa_parity_max": parity}
            row["ok"] = row["cuda_eager_vs_cpu"] <= 1e-5 and row["cuda_sdpa_vs_cpu"] <= 1e-4 and parity <= 1e-5
            ok_all &= row["ok"]
            print(json.dumps(row), flush=True)
        row = flush_check(name, cuda)
        ok_all &= row["ok"]
        print(json.dumps(row), flush=True)
        batched = analyze_batch(cuda, TEXTS, batch_size=4)
        diffs = [worst(result, analyze(cuda, text)) for text, result in zip(TEXTS, batched)]
        row = {"model": name, "batch_vs_single_cuda": max(diffs), "ok": max(diffs) <= 1e-5}
        ok_all &= row["ok"]
        print(json.dumps(row), flush=True)
        row = corpus_check(name, cpu, cuda)
        ok_all &= row["ok"]
        print(json.dumps(row), flush=True)
    print(json.dumps({"all_ok": ok_all}), flush=True)


if __name__ == "__main__":
    main()

"""Report sizes and opening speed: the README's "Small reports, fast pages" numbers.

    python -m benchmarks.bench_report [--tokens 34] [--loads 3] [--no-browser]

Builds the GPT-2-small-shaped random checkpoint of bench_analysis, analyses a text of --tokens tokens on every
layer, and prints: the all-layers report's size against its results JSON and the inlined JavaScript; a batch of
seven short texts with and without --shared-assets; then, in headless Chromium with the network off, the time to
the first drawn chart, to a chart far down the page after jumping to it, and to every chart drawn (medians of
--loads page loads). Not part of the tests: timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEVEN = [
    "The cat sat on the mat and looked out of the window at the rain.",
    "Fiji is a country in the South Pacific made of more than three hundred islands.",
    "def add(a, b): return a + b",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind.",
    "Attention heads in transformers often look at the previous token or the first token.",
    "She sold sea shells by the sea shore, and the shells she sold were sea shells for sure.",
    "One, two, three, four, five, six, seven, eight, nine, ten, one, two, three, four.",
]
CHARTS = "[...document.querySelectorAll('[data-chart]')]"
ANY_DRAWN = "() => document.querySelector('[data-chart] svg, [data-chart] canvas')"
VISIBLE_DRAWN = (f"() => {{ const v = {CHARTS}.filter(el => {{ const r = el.getBoundingClientRect(); "
                 "return r.top < innerHeight && r.bottom > 0; }); return v.length > 0 && "
                 "v.every(el => el.querySelector('svg, canvas')); }")
ALL_DRAWN = f"() => {CHARTS}.every(el => el.querySelector('svg, canvas'))"
JUMP = f"() => {{ const c = {CHARTS}; c[c.length - 2].scrollIntoView(); }}"


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def sizes(checkpoint: Path, tokens: int, out: Path) -> Path:
    from analysis import analyze, load_model
    from benchmarks.bench_analysis import text_of_length
    from reports.__main__ import main
    from reports.html import render_report, vega_bundle

    loaded = load_model(str(checkpoint))
    result = analyze(loaded, text_of_length(loaded.tokenizer, tokens), None, keep_patterns=True)
    start = time.perf_counter()
    page = render_report(result).encode()
    took = time.perf_counter() - start
    report = out / "all-layers.html"
    report.write_bytes(page)
    results = len(json.dumps(result.to_dict(), allow_nan=False).encode())
    javascript = sum(len(s.encode()) for s in re.findall(r"<script>(.*?)</script>", page.decode(), re.DOTALL))
    print(f"all-layers report, {result.n_tokens} tokens, {len(result.layers)} layers: {mb(len(page))} "
          f"(rendered in {took:.1f} s); results JSON {mb(results)}; inlined JavaScript {mb(javascript)} "
          f"(bundle {mb(len(vega_bundle().encode()))}); ratio {len(page) / (results + javascript):.3f}")
    batch = out / "seven.txt"
    batch.write_text("\n".join(SEVEN) + "\n", encoding="utf-8")
    for name, extra in (("standalone", []), ("shared", ["--shared-assets"])):
        folder = out / f"batch-{name}"
        main(["--model", str(checkpoint), "--batch", str(batch), "--out-dir", str(folder), *extra])
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"batch of {len(SEVEN)} texts, {name}: {mb(total)}")
    return report


def opening(report: Path, loads: int) -> None:
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM, CHROMIUM_ARGS

    times = {"first chart": [], "jump to the end, drawn after": [], "every chart": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for _ in range(loads):
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            start = time.perf_counter()
            page.goto(report.as_uri(), wait_until="commit")
            page.wait_for_function(ANY_DRAWN, timeout=300_000, polling=20)
            times["first chart"].append(time.perf_counter() - start)
            jumped = time.perf_counter()
            page.evaluate(JUMP)
            page.wait_for_function(VISIBLE_DRAWN, timeout=300_000, polling=20)
            times["jump to the end, drawn after"].append(time.perf_counter() - jumped)
            page.wait_for_function(ALL_DRAWN, timeout=300_000, polling=20)
            times["every chart"].append(time.perf_counter() - start)
            context.close()
        browser.close()
    load = os.getloadavg()[0]
    print(f"headless Chromium, network off, median of {loads} (load average {load:.1f}): " +
          "; ".join(f"{name} {statistics.median(values):.2f} s" for name, values in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=34)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    from benchmarks.bench_analysis import build_checkpoint

    with tempfile.TemporaryDirectory(prefix="headscope-bench-report-") as tmp:
        out = Path(tmp)
        report = sizes(build_checkpoint(out / "gpt2-small"), args.tokens, out)
        if not args.no_browser:
            opening(report, args.loads)


if __name__ == "__main__":
    main()

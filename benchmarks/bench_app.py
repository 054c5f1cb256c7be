"""The served app's speed and memory, as a visitor meets it: `streamlit run`, headless Chromium, the bundled MiniLM.

    python -m benchmarks.bench_app [--repeat 3] [--shots DIR]

Measures, in one served app on 127.0.0.1 (a free port, its own temp dir):
  - the cold first page and a warm page reload: navigation start to the last chart drawn;
  - clicks that run no model (an atlas cell in the same layer: a head change; one in another layer: a layer
    change; another score in the atlas's selectbox; another tab of the notebook's figures): click to the last
    chart drawn;
  - the server's resident memory after four sessions (four browser pages) analysed four different texts of
    512 MiniLM tokens each (the model's limit), with the result cache holding all four.
"The last chart drawn" is the last DOM change inside the page's main block, found with a MutationObserver
once the page has been quiet for QUIET_MS; the quiet time itself is not counted. With --shots DIR it also
saves full-page screenshots of each state (first load, atlas click, probe, corpus tab, errors) for a person.
Not part of the tests: times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
QUIET_MS = 1500  # no DOM change in the main block for this long: the page has settled
CHARTS = '[data-testid="stVegaLiteChart"]'
WATCH = """() => {
  window.__lastChange = performance.now();
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  new MutationObserver(() => { window.__lastChange = performance.now(); })
    .observe(main, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(env: dict | None = None, start_timeout: float = 90):
    """`streamlit run streamlit_app.py` on a free port; yields (url, pid); stops the server on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        environ.setdefault("HOME", home)
        with open(Path(home) / "streamlit.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
                 "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + start_timeout
                while True:
                    try:
                        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                            if response.read().decode().strip() == "ok":
                                break
                    except OSError:
                        if server.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError("streamlit did not start:\n"
                                               + (Path(home) / "streamlit.log").read_text()[-3000:]) from None
                        time.sleep(0.3)
                yield url, server.pid
            finally:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


def settled(page, start: float, min_charts: int, timeout_s: float = 180) -> float:
    """Seconds from `start` (performance.now() ms) to the last change in the main block, once it has been quiet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = page.evaluate("""(q) => ({now: performance.now(), last: window.__lastChange,
            running: !!document.querySelector('[data-testid^="stStatusWidgetRunning"]'),
            drawn: [...document.querySelectorAll(q)].filter((c) => c.querySelector('canvas, svg .mark-rect path, '
                   + 'svg .mark-symbol path, svg .mark-line path')).length})""", CHARTS)
        if not state["running"] and state["drawn"] >= min_charts and state["now"] - state["last"] >= QUIET_MS:
            return (state["last"] - start) / 1000
        time.sleep(0.1)
    raise TimeoutError("the page did not settle")


def load(page, url: str, min_charts: int, reload: bool = False) -> float:
    """Navigation start to the last chart drawn, for a first visit or a reload."""
    page.reload() if reload else page.goto(url)
    page.evaluate(WATCH)
    return settled(page, 0.0, min_charts)  # performance.now() counts from the navigation's start


def atlas_cell(page, layer: int, head: int, n_heads: int):
    atlas = page.locator(CHARTS).first
    atlas.scroll_into_view_if_needed()
    return atlas.locator("svg .mark-rect").first.locator("path").nth(layer * n_heads + head).bounding_box()


def click(page, box, min_charts: int) -> float:
    """Click the box's centre; seconds to the last chart drawn."""
    page.evaluate(WATCH)
    start = page.evaluate("() => performance.now()")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(5, VIEWPORT["height"] - 5)  # no tooltip left open over the chart
    return settled(page, start, min_charts)


def timed(page, action, min_charts: int) -> float:
    """Run `action` (a click that reruns the app); seconds to the last chart drawn."""
    page.evaluate(WATCH)
    start = page.evaluate("() => performance.now()")
    action()
    page.mouse.move(5, VIEWPORT["height"] - 5)
    return settled(page, start, min_charts)


def pick_score(page, option: str):
    """The atlas's score selectbox: open it (not timed), then return the click on `option` (timed)."""
    page.locator('[data-testid="stSelectbox"]', has_text="Head atlas: score").locator("input").click()
    return lambda: page.get_by_role("option", name=option).click()


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def texts_of(n_tokens: int, count: int) -> list[str]:
    """`count` different seeded texts of exactly `n_tokens` MiniLM tokens ([CLS] and [SEP] included)."""
    import numpy as np

    from analysis import load_model
    from tests.checkpoints import CORPUS

    tokenizer = load_model("minilm").tokenizer
    words = " ".join(CORPUS).split()
    out = []
    for seed in range(count):
        ids = tokenizer(" ".join(np.random.default_rng(seed).choice(words, 2 * n_tokens)),
                        add_special_tokens=False)["input_ids"][:n_tokens - 2]
        text = tokenizer.decode(ids)
        while len(tokenizer(text)["input_ids"]) > n_tokens:  # decoding can merge or split a piece: trim to fit
            text = text.rsplit(" ", 1)[0]
        out.append(text)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="clicks and reloads per measurement")
    parser.add_argument("--shots", type=Path, help="save full-page screenshots of each state here")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from analysis.presets import PRESETS

    n_heads, figures = 12, 5  # MiniLM: 12 heads; the atlas, the heatmap and the open tab's three figures
    with serve({"HEADSCOPE_MODEL": "minilm"}) as (url, pid), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        cold = load(page, url, figures)
        shot = (lambda name: page.screenshot(path=args.shots / f"{name}.png", full_page=True)) if args.shots else (
            lambda name: None)
        if args.shots:
            args.shots.mkdir(parents=True, exist_ok=True)
        shot("1-first-load")
        if args.shots:
            for tab in ("Softmax weights", "Q and K"):  # the figures below the fold, in their lazy tabs
                page.get_by_role("tab", name=tab).click()
                page.evaluate(WATCH)
                settled(page, page.evaluate("() => performance.now()"), 3)
                page.get_by_role("tab", name=tab).scroll_into_view_if_needed()
                shot(f"1b-figures-{tab.split()[0].lower()}")
            page.mouse.move(700, 500)
            page.mouse.wheel(0, -5000)
        reloads = [load(page, url, figures, reload=True) for _ in range(args.repeat)]
        heads, layers = [], []
        for i in range(args.repeat):
            heads.append(click(page, atlas_cell(page, 3, (i + 5) % n_heads, n_heads), figures))
            layers.append(click(page, atlas_cell(page, 1 + i % 2, 9, n_heads), figures))
            layers.append(click(page, atlas_cell(page, 3, 0, n_heads), figures))
        scores, tabs = [], []
        for i in range(args.repeat):
            for option in ("Sink score (your text)", "Previous-token score (your text)"):
                scores.append(timed(page, pick_score(page, option), figures))
            for tab in ("Softmax weights", "Q and K"):  # the figures' tabs: the open one's charts are drawn
                tabs.append(timed(page, page.get_by_role("tab", name=tab).click, figures))
        shot("2-atlas-click-L3H0")
        click(page, atlas_cell(page, 1, 9, n_heads), figures)
        shot("3-atlas-click-L1H9")
        report = {"cold first page": [cold], "warm reload": reloads, "head change (atlas click)": heads,
                  "layer change (atlas click)": layers, "atlas score change": scores, "figures tab switch": tabs}
        print(f"MiniLM, Fiji text (41 tokens), viewport {VIEWPORT['width']}x{VIEWPORT['height']}; seconds:")
        for name, values in report.items():
            print(f"  {name:28s} median {statistics.median(values):.2f}  (min {min(values):.2f}, max {max(values):.2f},"
                  f" n={len(values)})", flush=True)
        if args.shots:
            page.get_by_text("Run the induction probe").click()
            settled(page, page.evaluate("() => performance.now()"), figures)
            shot("4-probe")
            typed = page.locator('[data-testid="stSidebar"]').get_by_label("…or a hub id or local checkpoint path")
            for value, name in (("no-such-user/no-such-model", "4b-error-keeps-the-last-results"), ("", None)):
                typed.fill(value)
                page.get_by_role("button", name="Analyse").click()
                page.evaluate(WATCH)
                settled(page, page.evaluate("() => performance.now()"), 0)
                if name:
                    shot(name)
            page.get_by_role("tab", name="Many texts (corpus)").click()
            page.wait_for_timeout(800)
            shot("5-corpus-tab")
            for name, payload in (("5b-corpus-results", "\n".join(PRESETS.values()).encode()),
                                  ("9-error-bad-upload", b"\xff\xfe not UTF-8")):
                page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
                    {"name": "texts.txt", "mimeType": "text/plain", "buffer": payload})
                page.get_by_role("button", name="Analyse the corpus").click(timeout=30_000)
                page.evaluate(WATCH)
                settled(page, page.evaluate("() => performance.now()"), 0)
                shot(name)
            for name, query in (("6-error-unknown-model", {"model": "no-such-user/no-such-model"}),
                                ("7-error-head-out-of-range", {"model": "minilm", "head": "99"}),
                                ("8-error-empty-text", {"model": "minilm", "text": " "})):
                page.goto(f"{url}/?{urllib.parse.urlencode(query)}")
                page.wait_for_timeout(300)
                page.evaluate(WATCH)
                settled(page, 0.0, 0)
                shot(name)
        if not args.skip_memory:
            pages, texts = [], texts_of(512, 4)
            before = rss_mib(pid)
            for text in texts:
                visitor = browser.new_page(viewport=VIEWPORT)
                visitor.goto(f"{url}/?{urllib.parse.urlencode({'model': 'minilm', 'text': text})}")
                visitor.evaluate(WATCH)
                settled(visitor, 0.0, figures, timeout_s=300)
                pages.append(visitor)
            current, peak = rss_mib(pid)
            print(f"server RSS: {before[0]:.0f} MiB after the first visitor; with four sessions on four 512-token "
                  f"texts: {current:.0f} MiB (peak {peak:.0f} MiB)")
        browser.close()


if __name__ == "__main__":
    main()

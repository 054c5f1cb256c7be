"""The app as a user meets it: `streamlit run` on 127.0.0.1, opened in headless Chromium, Analyse pressed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_app import serve
from reports.__main__ import build_parser
from reports.charts import SELECTED_OUTLINE

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60  # seconds for the server to answer its health endpoint
DRAW_TIMEOUT_MS = 150_000  # first analysis: torch import + model load + forward pass on 2 cores
DRAWN = ('[data-testid="stVegaLiteChart"] canvas, '
         '[data-testid="stVegaLiteChart"] svg .mark-rect, [data-testid="stVegaLiteChart"] svg .mark-symbol')
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'
SCREENSHOT = os.environ.get("HEADSCOPE_APP_SCREENSHOT")  # set it to keep a full-page screenshot for a person to look at


@pytest.fixture
def served_app():
    """`streamlit run streamlit_app.py` on a free port (benchmarks.bench_app.serve, which the speed figures use);
    a server that does not start fails with its log."""
    with serve(start_timeout=START_TIMEOUT) as (url, _pid):
        yield url


def drawn_charts(page) -> int:
    """Charts whose vega-embed container holds drawn marks (a canvas, or SVG rects/symbols)."""
    return page.evaluate(
        """(selector) => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
               .filter((chart) => chart.querySelector('canvas, svg .mark-rect path, svg .mark-symbol path')).length""",
        DRAWN)


def test_served_app_draws_the_charts_after_analyse(served_app, chromium, tmp_path):
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(served_app)
        page.get_by_role("button", name="Analyse").click(timeout=DRAW_TIMEOUT_MS)  # drawn once the model loaded
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
                   .filter((chart) => chart.querySelector('canvas, svg .mark-rect path, svg .mark-symbol path'))
                   .length >= 5""",
            timeout=DRAW_TIMEOUT_MS)
        page.wait_for_timeout(1000)  # let the last rerun settle before looking for errors
        assert drawn_charts(page) >= 5
        assert page.locator(ERRORS).count() == 0, page.locator(ERRORS).all_inner_texts()
        assert page.get_by_text("matches the model's own attention").count() == 1
        # Analyse was pressed while the first run was still loading: the form must still hold its values
        assert page.locator("textarea").input_value().startswith("The majority of Fiji")
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT, full_page=True)
        assert_legends(page)
        assert_download_equals_cli_report(page, tmp_path)
        assert_json_download_carries_provenance(page)
        assert_atlas_click_shows_that_head(page)
        assert_analyse_keeps_the_clicked_head(page)
        assert_the_report_carries_the_probe(page, chromium, tmp_path)
        assert_the_corpus_tab_opens(page)
    finally:
        page.close()


def chart_titles(page) -> list[str]:
    return page.locator('[data-testid="stVegaLiteChart"] svg .role-title-text').all_text_contents()


def wait_for_title(page, words: str) -> None:
    """Until a drawn chart's title starts with `words` and the app has stopped running."""
    page.wait_for_function(
        """(words) => [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg .role-title-text')]
               .some((t) => t.textContent.startsWith(words))
             && !document.querySelector('[data-testid^="stStatusWidgetRunning"]')""", arg=words, timeout=60_000)
    page.wait_for_timeout(500)


def sidebar_head(page) -> tuple[str, str]:
    """The sidebar's Layer and Head values once the run is over (a re-keyed input replaces its stale self then)."""
    page.wait_for_function("""() => ['Layer', 'Head'].every((label) => document.querySelectorAll(
        `[data-testid="stSidebar"] input[aria-label="${label}"]`).length === 1)""", timeout=60_000)
    sidebar = page.locator('[data-testid="stSidebar"]')
    return sidebar.get_by_label("Layer").input_value(), sidebar.get_by_label("Head").input_value()


def assert_legends(page):
    """The Q/K chart draws a legend of both marks; the atlas's colour legend runs over the fixed [0, 1] of a share."""
    means = page.locator('[data-testid="stVegaLiteChart"]', has=page.locator("text=Q and K means"))
    legend = means.locator("svg .role-legend").first
    assert legend.locator("text=Q, per query head").count() == 1 and legend.locator("text=K, per key head").count() == 1
    assert legend.locator(".role-legend-symbol path").count() == 2
    atlas = page.locator('[data-testid="stVegaLiteChart"]').first
    labels = atlas.locator("svg .role-legend-label text").all_text_contents()
    assert labels[0] == "0" and labels[-1] == "1", labels  # previous-token share: [0, 1], not the data's maximum


def assert_atlas_click_shows_that_head(page):
    """A click on an atlas cell (the first chart) makes that layer's and head's figures, sidebar and link."""
    assert any(title.startswith("Attention pattern of L3H0 · layer 3") for title in chart_titles(page))
    assert sidebar_head(page) == ("3", "0")
    atlas = page.locator('[data-testid="stVegaLiteChart"]').first
    atlas.scroll_into_view_if_needed()
    assert outlined_cells(page) == [3 * 12 + 0]
    atlas.locator("svg").first.evaluate("(svg) => { svg.__before = true; }")
    cell = atlas.locator("svg .mark-rect").first.locator("path").nth(1 * 12 + 9).bounding_box()  # grey cells: L1H9
    page.mouse.click(cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
    wait_for_title(page, "Attention pattern of L1H9 · layer 1")
    assert outlined_cells(page) == [1 * 12 + 9]  # the clicked cell, outlined by the browser
    assert atlas.locator("svg").first.evaluate("(svg) => svg.__before === true")  # the atlas was not redrawn
    titles = chart_titles(page)
    assert not any("L3H0" in title for title in titles)
    assert any(title.startswith("Q and K means ± std per head · layer 1") for title in titles)
    assert sidebar_head(page) == ("1", "9")
    assert "layer=1" in page.url and "head=9" in page.url


def outlined_cells(page) -> list[int]:
    """Indexes (layer * 12 + head) of the atlas cells drawn with the selection's outline."""
    return page.evaluate(
        """(colour) => [...document.querySelector('[data-testid="stVegaLiteChart"] svg .mark-rect')
               .querySelectorAll('path')].map((p, i) => [p.getAttribute('stroke'), i])
               .filter(([stroke]) => stroke && stroke.toLowerCase() === colour.toLowerCase()).map(([, i]) => i)""",
        SELECTED_OUTLINE)


def assert_analyse_keeps_the_clicked_head(page):
    """Analyse after the click (with "exclude first token" toggled) keeps L1H9: sidebar, figures and link agree."""
    page.locator('[data-testid="stSidebar"]').get_by_text("Exclude first token").click()
    page.get_by_role("button", name="Analyse").click()
    wait_for_title(page, "Attention pattern of L1H9 · layer 1")
    page.wait_for_function(  # the Q/K chart's subtitle follows the toggle
        """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg .role-title-subtitle')]
               .some((t) => t.textContent.includes('Over every position'))""", timeout=60_000)
    assert any(title.startswith("Attention pattern of L1H9 · layer 1") for title in chart_titles(page))
    assert sidebar_head(page) == ("1", "9")
    assert "layer=1" in page.url and "head=9" in page.url
    assert outlined_cells(page) == [1 * 12 + 9]  # the atlas, drawn afresh for the new results, outlines L1H9


def assert_the_report_carries_the_probe(page, chromium, tmp_path):
    """With the induction probe on, the downloaded report carries the probe's atlases (drawn, offline) and numbers
    equal to the probe run here, outside the app."""
    from analysis import PROBE_LENGTH, analyze_induction_probe, load_model
    from reports.html import PROBE_ID
    from tests.reports.test_report_browser import DRAWN, open_offline, wait_for_charts

    page.get_by_text("Run the induction probe").click()
    wait_for_title(page, "Induction score per head")
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg .role-title-subtitle')]
               .some((t) => t.textContent.includes('induction probe'))""", timeout=60_000)
    assert "probe=1" in page.url and "score=probe:induction" in urllib.parse.unquote(page.url)  # the link has both
    labels = page.locator('[data-testid="stVegaLiteChart"]').first.locator("svg .role-legend-label text")
    assert labels.first.text_content() == "0" and labels.last.text_content() == "1"  # not 0-0.011: a fixed [0, 1]
    assert outlined_cells(page) == [1 * 12 + 9]  # another score's atlas, sent afresh, outlines the shown head
    with page.expect_download(timeout=60_000) as download_info:
        page.get_by_role("button", name="Report", exact=True).click()
    path = tmp_path / "with-probe.html"
    path.write_text(Path(download_info.value.path()).read_text(encoding="utf-8"), encoding="utf-8")
    embedded = json.loads(path.read_text(encoding="utf-8").split(f'<script type="application/json" id="{PROBE_ID}">')[1]
                          .split("</script>")[0])
    assert embedded["settings"]["induction_probe"] == {"length": PROBE_LENGTH, "seed": 0}
    exclude = embedded["settings"]["exclude_first_token"]
    assert exclude is False  # the toggle above turned it off: the probe follows the sidebar
    expected = analyze_induction_probe(load_model("minilm"), layers=[], exclude_first_token=exclude).head_scores
    np.testing.assert_allclose(np.array(embedded["head_scores"]["induction"], dtype=float), expected["induction"],
                               rtol=1e-5, atol=1e-7, equal_nan=True)
    context, report, events = open_offline(chromium, path)
    try:
        wait_for_charts(report)
        charts = report.query_selector_all("#induction-probe [data-chart]")
        assert len(charts) == len(expected) and all(chart.evaluate(DRAWN) > 0 for chart in charts)
        assert f"{PROBE_LENGTH} random" in report.inner_text("#induction-probe") and events["errors"] == []
    finally:
        context.close()
    page.get_by_text("Run the induction probe").click()  # off again: the text's scores
    wait_for_title(page, "Previous-token score per head")


def assert_the_corpus_tab_opens(page):
    """The tabs take clicks (nothing of Streamlit's header lies over them) and the corpus upload is one click away."""
    page.get_by_role("tab", name="Many texts (corpus)").click(timeout=10_000)
    page.get_by_text("One text per line (.txt)").wait_for(state="visible", timeout=10_000)


def assert_download_equals_cli_report(page, tmp_path):
    """The app's "Download HTML report" and `python -m reports --html` agree byte for byte, apart from the time."""
    with page.expect_download(timeout=60_000) as download_info:
        page.get_by_role("button", name="Report", exact=True).click()
    downloaded = Path(download_info.value.path()).read_text(encoding="utf-8")
    cli_report = tmp_path / "cli.html"
    # the app's defaults: model auto (the bundled MiniLM offline), the Fiji text, layer 3 of 6, head 0
    subprocess.run([sys.executable, "-m", "reports", "--layer", "3", "--head", "0", "--html", str(cli_report)],
                   cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
    app_lines, cli_lines = downloaded.splitlines(), cli_report.read_text(encoding="utf-8").splitlines()
    assert len(app_lines) == len(cli_lines)
    differing = [(a, c) for a, c in zip(app_lines, cli_lines) if a != c]
    assert len(differing) <= 1 and all("UTC" in a for a, _ in differing), differing[:2]


def assert_json_download_carries_provenance(page):
    """The app's JSON download (built only when clicked) carries the report's provenance and a runnable command."""
    with page.expect_download(timeout=60_000) as download_info:
        page.get_by_role("button", name="JSON", exact=True).click()
    data = json.loads(Path(download_info.value.path()).read_text(encoding="utf-8"))
    assert data["schema"] == "headscope.results/1"
    assert set(data["provenance"]) == {"headscope", "git_commit", "libraries", "generated_at", "command"}
    args = build_parser().parse_args(shlex.split(data["provenance"]["command"])[3:])
    assert args.model == "sentence-transformers/all-MiniLM-L6-v2" and args.layer == [3] and args.device == "cpu"
    assert args.json is not None

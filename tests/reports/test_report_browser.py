"""A real browser opens the real report file with the network off."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from analysis import analyze
from reports.__main__ import main
from reports.html import read_report_results, render_report
from tests.conftest import FIJI, REPEATS
from tests.reports.test_html import PAYLOAD
from tests.reports.test_provenance import ROOT

DRAWN = "el => el.querySelectorAll('svg .mark-rect path, svg .mark-symbol path, svg .mark-line path, " \
        "svg .mark-rule line, svg .mark-area path, svg .mark-tick line, canvas').length"


PAINTED = """el => { const c = el.querySelector('canvas'); if (!c) return Infinity;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
  return n; }"""


def open_offline(chromium, path):
    context = chromium.new_context(offline=True)
    page = context.new_page()
    events = {"errors": [], "requests": [], "dialogs": []}
    page.on("console", lambda message: message.type == "error" and events["errors"].append(message.text))
    page.on("pageerror", lambda error: events["errors"].append(str(error)))
    page.on("request", lambda request: events["requests"].append(request.url))
    page.on("dialog", lambda dialog: (events["dialogs"].append(dialog.message), dialog.dismiss()))
    page.goto(path.as_uri())
    return context, page, events


def wait_for_charts(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-chart]')].every(el => el.querySelector('svg, canvas'))",
        timeout=30_000)


@pytest.mark.parametrize("fixture", ["gpt2", "minilm"])
def test_every_chart_draws_offline_without_errors_or_requests(request, chromium, tmp_path, fixture):
    loaded = request.getfixturevalue(fixture)
    path = tmp_path / "report.html"
    path.write_text(render_report(analyze(loaded, FIJI, layers=[loaded.info.n_layers // 2])), encoding="utf-8")
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        containers = page.query_selector_all("[data-chart]")
        assert len(containers) >= 5
        for container in containers:
            assert container.evaluate(DRAWN) > 0, container.get_attribute("data-chart")
        assert events["errors"] == []
        assert events["requests"] == [path.as_uri()]
    finally:
        context.close()


def test_injected_text_runs_nothing_and_shows_as_text(chromium, gpt2, tmp_path):
    path = tmp_path / "payload.html"
    path.write_text(render_report(analyze(gpt2, PAYLOAD, layers=[6])), encoding="utf-8")
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        assert events["dialogs"] == []
        assert page.title() == f"headscope report: {gpt2.info.id}"
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        assert page.evaluate("document.querySelectorAll('script:not([type])').length") == 2
        assert page.inner_text("#analysed-text") == PAYLOAD
        assert "<|endoftext|>" in page.inner_text(".tokens")
        assert events["errors"] == []
    finally:
        context.close()


def test_the_page_rebuilds_the_same_rows_as_python(chromium, gpt2, tmp_path):
    """Every chart's named datasets, as the page's script rebuilt them and Vega holds them, equal DataPool.rows."""
    import json
    import re

    from reports.html import DataPool

    result = analyze(gpt2, REPEATS, layers=[1, 6], keep_patterns=True)
    page_text = render_report(result, head=5)
    path = tmp_path / "report.html"
    path.write_text(page_text, encoding="utf-8")
    blocks = dict(re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>', page_text, re.DOTALL))
    pool = DataPool.read(json.loads(blocks["headscope-results"]), json.loads(blocks["headscope-datasets"]))
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        page.wait_for_function("() => [...document.querySelectorAll('[data-chart]')].every(el => el.view)")
        checked = 0
        for container in page.query_selector_all("[data-chart]"):
            for name in container.get_attribute("data-datasets").split():
                expected = pool.rows(name)
                got = container.evaluate(f"el => el.view.data({json.dumps(name)})")
                assert len(got) == len(expected), (container.get_attribute("data-chart"), name)
                assert [{key: row[key] for key in want} for row, want in zip(got, expected)] == expected
                checked += 1
            assert container.evaluate(PAINTED) > 500, container.get_attribute("data-chart")  # canvas: pixels drawn
        assert checked >= 20 and events["errors"] == []
    finally:
        context.close()


def test_the_reproduce_command_copied_from_the_page_runs(chromium, gpt2_path, tmp_path, capsys):
    """A report named with a right-to-left override, a zero-width space and a byte that is not UTF-8, of a text the
    command reads from the file beside it: the page shows that file's name in printable ASCII ($'...' quoting, not
    the name's visible form, which names another file), and the command as the browser gives it, run by bash in
    the report's folder, recomputes the results the report embeds."""
    folder = tmp_path / "reports"
    folder.mkdir()
    out = folder / "r\u202ex\u200b\udcff.html"
    model = str(gpt2_path.resolve())
    assert main(["--model", model, "--text", "ctl\x01 and \u202eright-to-left\u202c", "--layer", "1",
                 "--html", str(out)]) == 0, capsys.readouterr().err
    view = tmp_path / "view.html"  # the same page under a name a file: URL carries plainly
    view.write_bytes(out.read_bytes())
    context, page, events = open_offline(chromium, view)
    try:
        shown = page.inner_text("dl.facts pre")
        assert events["errors"] == []
    finally:
        context.close()
    assert "--text-file $'r\\xe2\\x80\\xaex\\xe2\\x80\\x8b\\xff.text.txt'" in shown
    assert shown.isascii() and shown.isprintable()
    assert shown.startswith("python -m reports ")
    done = subprocess.run(["bash", "-c", shlex.quote(sys.executable) + shown.removeprefix("python")], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert read_report_results(folder / "report.html") == read_report_results(out)


def _pdf_pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))


def test_a_page_printed_before_its_deferred_charts_drew_prints_every_chart(chromium, gpt2, tmp_path):
    """Charts off screen are drawn after the load event, one at a time; a page printed before that loop has run
    (chromium --headless --print-to-pdf prints at the load event, Ctrl+P right after opening) printed only the
    charts on screen: blank boxes for the rest. Printing now draws every chart first: the PDF printed with the
    deferred loop held back (the page's clock stopped) has as many pages as the one printed once everything was
    drawn, and every chart is drawn when the print returns."""
    path = tmp_path / "report.html"
    path.write_text(render_report(analyze(gpt2, REPEATS, layers=[1, 6])), encoding="utf-8")
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        drawn = page.pdf()
    finally:
        context.close()
    context = chromium.new_context(offline=True)
    try:
        page = context.new_page()
        page.clock.install(time=0)
        page.clock.pause_at(1000)  # no timer fires: the deferred drawing loop does not run
        page.goto(path.as_uri())
        containers = page.query_selector_all("[data-chart]")
        assert sum(container.evaluate(DRAWN) == 0 for container in containers) > 10  # held back, as at print time
        early = page.pdf()
        undrawn = [c.get_attribute("data-chart") for c in containers if c.evaluate(DRAWN) == 0]
    finally:
        context.close()
    assert undrawn == []
    assert _pdf_pages(early) == _pdf_pages(drawn) > 10
    assert events["errors"] == []


CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(2,  3))\t\n"


def test_the_token_strip_names_each_token_as_the_charts_do(chromium, gpt2, tmp_path):
    """Whitespace tokens (a newline, a space, a tab, as code has) were blank boxes in the token strip, a newline
    one two lines tall, while the charts label them ␣, ↵ and ⇥: the strip now shows each token as the charts'
    labels do ("12: ↵"), and so do the first-token and query-token lines under it."""
    result = analyze(gpt2, CODE, layers=[6])
    assert {"\n", " "} <= set(result.tokens) and any("\t" in token for token in result.tokens)
    path = tmp_path / "report.html"
    path.write_text(render_report(result), encoding="utf-8")
    context, page, events = open_offline(chromium, path)
    try:
        wait_for_charts(page)
        softmax = page.locator('[data-chart="chart-L6-softmax"]')
        softmax.scroll_into_view_if_needed()
        page.wait_for_function("() => document.querySelector('[data-chart=\"chart-L6-softmax\"]').view")
        labels = set(softmax.evaluate("el => el.getAttribute('data-datasets').split(' ').flatMap(name => "
                                      "el.view.data(name).map(row => row.key)).filter(key => key !== undefined)"))
        strip = page.eval_on_selector_all(".tok", "els => els.map(el => [...el.childNodes].filter("
                                          "node => node.nodeName !== 'SUB').map(node => node.textContent).join(''))")
        heights = page.eval_on_selector_all(".tok", "els => els.map(el => el.getBoundingClientRect().height)")
        under = page.inner_text(".tokens + p")
        assert events["errors"] == []
    finally:
        context.close()
    assert len(strip) == result.n_tokens and len(labels) == result.n_tokens
    assert {f"{position}: {shown}" for position, shown in enumerate(strip)} == labels
    assert all(shown.strip() for shown in strip)
    assert max(heights) == min(heights)  # one line each
    assert f"is {strip[0]}." in under and f"query token {result.query} {strip[result.query]}" in under


def test_a_long_model_path_wraps_in_the_headings(chromium, gpt2_path, tmp_path, capsys):
    """A local checkpoint's path with no hyphen or space to break at (run names of underscores and digits) ran past
    the right edge in the title of the report, the batch index and the corpus page: the title's end, the checkpoint
    that tells two archived reports apart, was cut off and the index scrolled sideways. Headings now wrap."""
    model = tmp_path / ("pythia_finetune_lr0_0003_warmup500_seed1234_" * 3) / "step_120000"
    model.parent.mkdir()
    model.symlink_to(gpt2_path.resolve(), target_is_directory=True)
    batch = tmp_path / "texts.txt"
    batch.write_text("The cat sat on the mat.\n")
    assert main(["--model", str(model), "--batch", str(batch), "--out-dir", str(tmp_path / "out"), "--layer", "1"]) == 0
    for name in ("report-0001.html", "index.html", "corpus.html"):
        path = tmp_path / "out" / name
        context, page, events = open_offline(chromium, path)
        try:
            heading = page.locator("h1")
            assert str(model) in heading.inner_text().replace("\n", "")
            assert heading.evaluate("el => el.scrollWidth <= el.clientWidth"), name
            if name != "index.html":  # the charts' titles name the model too: its end, as long paths are cut
                wait_for_charts(page)
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), name
            assert events["errors"] == []
        finally:
            context.close()


def test_a_reader_without_javascript_is_told_where_the_numbers_are(chromium, gpt2, tmp_path):
    """With JavaScript off (an archive viewer, a locked-down browser) the chart boxes stay empty: the page says so,
    and where every number is; with it on, the note is not shown."""
    path = tmp_path / "report.html"
    path.write_text(render_report(analyze(gpt2, FIJI, layers=[6])), encoding="utf-8")
    for javascript in (False, True):
        context = chromium.new_context(offline=True, java_script_enabled=javascript)
        try:
            page = context.new_page()
            page.goto(path.as_uri())
            note = page.query_selector("#no-javascript")
            assert (note is not None and note.is_visible()) == (not javascript), javascript
            if not javascript:
                assert "in the table under each chart" in note.inner_text() and "--from-report" in note.inner_text()
                assert page.query_selector_all("table")  # the tables it points to are there
        finally:
            context.close()

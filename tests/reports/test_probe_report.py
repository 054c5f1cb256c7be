"""A report with the induction probe beside the text (the app's report with "Run the induction probe" on)."""

from __future__ import annotations

import json
import re
import shlex
from html import unescape
from pathlib import Path

import numpy as np
import pytest

from analysis import analyze, analyze_induction_probe
from reports.__main__ import build_parser, main
from reports.html import PROBE_ID, read_report_results, render_report
from tests.conftest import FIJI
from tests.reports.test_cli import run_cli
from tests.reports.test_provenance import assert_same_results, results_of, run_recorded
from tests.reports.test_report_browser import DRAWN, open_offline, wait_for_charts


def section(page: str) -> str:
    start = page.index('<section id="induction-probe">')
    return page[start:page.index("</section>", start)]


def table_cells(block: str, score: str) -> np.ndarray:
    """The numbers of one probe atlas's table, [layer, head], NaN for "–"."""
    part = block[block.index(f'id="probe-atlas-{score}"'):]
    part = part[:part.index("</table>")]
    rows = re.findall(r'<tr><th class="label">L\d+</th>(.*?)</tr>', part)
    return np.array([[np.nan if cell == "–" else float(cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
                     for row in rows])


def test_the_report_carries_the_probe_atlases_with_length_seed_and_command(gpt2, chromium, tmp_path):
    result = analyze(gpt2, FIJI, layers=[6])
    probe = analyze_induction_probe(gpt2, length=24, seed=5, layers=[])
    page = render_report(result, head=2, probe=probe)
    assert render_report(result, head=2).count('id="induction-probe"') == 0  # only when asked for
    block = section(page)
    assert "24 random\ntokens (seed 5) written twice" in block
    assert "--induction-probe 24 --probe-seed 5" in block  # the command that recomputes it alone
    assert page.index('<section id="atlas">') < page.index('<section id="induction-probe">')
    assert '<a href="#induction-probe">Induction probe</a>' in page
    embedded = json.loads(re.search(rf'<script type="application/json" id="{PROBE_ID}">(.*?)</script>', page,
                                    re.DOTALL).group(1))
    assert embedded["settings"]["induction_probe"] == {"length": 24, "seed": 5}
    for score, values in probe.head_scores.items():  # every score: a chart, and its numbers as a table (4 digits)
        assert page.count(f'data-chart="chart-probe-atlas-{score}"') == 1
        np.testing.assert_allclose(table_cells(block, score), values, rtol=1e-3, atol=1e-4, equal_nan=True)
        np.testing.assert_allclose(np.array(embedded["head_scores"][score], dtype=float), values, equal_nan=True)
    # the probe's induction atlas differs from the text's: the section shows the probe's numbers, not the text's
    assert not np.allclose(probe.head_scores["induction"], result.head_scores["induction"], equal_nan=True)

    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    context, browser_page, events = open_offline(chromium, path)
    try:
        wait_for_charts(browser_page)
        probe_charts = browser_page.query_selector_all('#induction-probe [data-chart]')
        assert len(probe_charts) == len(probe.head_scores)
        for container in probe_charts:
            assert container.evaluate(DRAWN) > 0, container.get_attribute("data-chart")
        induction = browser_page.locator('[data-chart="chart-probe-atlas-induction"]')
        subtitle = " ".join(induction.locator("svg .role-title-subtitle text").all_text_contents())
        assert "induction probe: 24 random tokens, repeated, seed 5" in subtitle
        legend = induction.locator("svg .role-legend-label text").all_text_contents()
        assert legend[0] == "0" and legend[-1] == "1", legend  # a share: the fixed [0, 1] scale
        assert events["errors"] == [] and events["requests"] == [path.as_uri()]
    finally:
        context.close()


def test_the_command_line_writes_the_same_report_with_probe_and_says_how(gpt2, gpt2_path, tmp_path, capsys):
    """--with-probe 24 --probe-seed 5: the report the app downloads with the probe on, apart from the time; its
    recompute command carries both flags."""
    out = tmp_path / "cli.html"
    code, lines = run_cli(capsys, "--model", gpt2_path, "--text", FIJI, "--layer", "6", "--head", "2",
                          "--with-probe", "24", "--probe-seed", "5", "--html", out)
    assert code == 0, lines
    expected = render_report(analyze(gpt2, FIJI, layers=[6]), head=2,
                             probe=analyze_induction_probe(gpt2, length=24, seed=5, layers=[]))
    cli_lines, expected_lines = out.read_text(encoding="utf-8").splitlines(), expected.splitlines()
    assert len(cli_lines) == len(expected_lines)
    differing = [(a, b) for a, b in zip(cli_lines, expected_lines) if a != b]
    assert len(differing) <= 1 and all("UTC" in a for a, _ in differing), differing[:2]
    command = re.search(r"<dt>Reproduce with</dt><dd><pre>(.*?)</pre>", expected, re.DOTALL).group(1)
    assert "--with-probe 24 --probe-seed 5 --html report.html" in command
    args = build_parser().parse_args(shlex.split(unescape(command))[3:])
    assert (args.with_probe, args.probe_seed, args.text, args.layer) == (24, 5, FIJI, [6])


def test_the_probe_command_measures_the_layers_the_report_embeds(steady_gpt2_path, tmp_path, capsys):
    """The probe beside a text holds every layer's head scores and no per-layer measurements, and its command says
    --no-layers: run from another folder, it writes a report embedding the results the section embeds (without
    the flag it measured the default layer 6 as well)."""
    out = tmp_path / "report.html"
    code, lines = run_cli(capsys, "--model", steady_gpt2_path, "--text", FIJI, "--layer", "2", "--with-probe", "12",
                          "--probe-seed", "4", "--html", out)
    assert code == 0, lines
    page = out.read_text(encoding="utf-8")
    command = unescape(re.search(r"<pre>(.*?)</pre>", section(page), re.DOTALL).group(1))
    assert build_parser().parse_args(shlex.split(command)[3:]).no_layers
    embedded = json.loads(re.search(rf'<script type="application/json" id="{PROBE_ID}">(.*?)</script>', page,
                                    re.DOTALL).group(1))
    assert embedded["layers"] == {}
    run_recorded(command, tmp_path / "elsewhere")
    assert_same_results(read_report_results(tmp_path / "elsewhere" / "probe.html"), embedded)


def test_with_probe_and_json_alone_records_a_command_that_gives_back_the_probe(steady_gpt2_path, tmp_path, capsys):
    """--with-probe with --json only: the JSON holds the probe under "probe" and its command says --with-probe, so
    run from another folder it writes the same results and the same probe (before, --with-probe needed --html and
    the JSON's command left the probe out)."""
    out = tmp_path / "results.json"
    code, lines = run_cli(capsys, "--model", steady_gpt2_path, "--text", FIJI, "--layer", "2", "--with-probe", "12",
                          "--probe-seed", "4", "--json", out)
    assert code == 0, lines
    doc = json.loads(out.read_text(encoding="utf-8"))
    command = doc["provenance"]["command"]
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert (args.with_probe, args.probe_seed, args.layer, args.json) == (12, 4, [2], Path("results.json"))
    run_recorded(command, tmp_path / "elsewhere")
    again = json.loads((tmp_path / "elsewhere" / "results.json").read_text(encoding="utf-8"))
    assert_same_results(results_of(again), results_of(doc))
    assert again["probe"]["settings"]["induction_probe"]["length"] == 12


@pytest.mark.parametrize(("argv", "needle"), [
    (["--induction-probe", "20", "--with-probe", "--html", "x.html"], "--with-probe runs the probe beside a text"),
    (["--with-probe", "--figures", "d"], "--with-probe adds the probe to the --html report or the --json results"),
    (["--with-probe", "--ablation", "zero", "--html", "x.html"], "one extra section at a time"),
    (["--with-probe", "0", "--html", "x.html"], "--with-probe LENGTH must be at least 1, not 0"),  # not the default 50
    (["--no-layers", "--neuron", "1", "2", "--json", "x.json"], "--no-layers measures no layer, and --neuron needs"),
    (["--no-layers", "--batch", "t.txt", "--out-dir", "o"], "--no-layers measures no layer, and --batch needs one"),
])
def test_with_probe_misuse_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines

"""The standalone HTML report: self-contained, escaped, reproducible, and round-trippable."""

import base64
import hashlib
import html
import json
import math
import re
from datetime import UTC, datetime
from importlib import metadata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import analyze
from analysis.results import AnalysisResult
from reports.__main__ import main
from reports.charts import build_atlas_chart, build_layer_charts
from reports.html import (
    DataPool,
    _decode_indexes,
    _encode_indexes,
    _short_title,
    read_report_results,
    render_report,
)
from tests.conftest import FIJI, REPEATS
from tests.reference import assert_rank_statistics_close

NOT_JSON = "cannot be read as JSON (Expecting value at column 1)"  # json's own words for a line that is not JSON

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PAYLOAD = "Tokens </s> <|endoftext|> then </script><script>document.title='pwned'</script> <img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def result(gpt2):
    return analyze(gpt2, FIJI, layers=[6])


@pytest.fixture(scope="module")
def page(result):
    return render_report(result, head=3, generated_at=WHEN)


def embedded_results(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="headscope-results">(.*?)</script>', page, re.DOTALL)
    return json.loads(block[1])


def test_results_json_is_embedded_verbatim(result, page):
    assert embedded_results(page) == result.to_dict()


def test_nothing_points_outside_the_file(page):
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)  # the browser test watches the scripts
    assert not re.search(r"\s(src|srcset|action|data)=", markup, re.IGNORECASE)
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', markup))
    assert "@import" not in markup and "url(" not in markup
    assert not re.search(r"<script[^>]*\ssrc=", page) and "<link" not in page


def test_csp_admits_exactly_the_inline_scripts(page):
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)[1])
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "unsafe-eval" not in csp
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 2  # the Vega bundle and the embedding loop; data blocks are inert JSON
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp


def test_one_chart_spec_per_container_and_per_head_tables(result, page):
    containers = re.findall(r'data-chart="([^"]+)"', page)
    assert len(containers) >= 5 and len(set(containers)) == len(containers)
    for chart_id in containers:
        block = re.search(rf'<script type="application/json" id="{chart_id}">(.*?)</script>', page, re.DOTALL)
        spec = json.loads(block[1])
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    for head in range(12):
        assert f"<td class=\"label\">L6H{head}</td>" in page
    assert f"{result.layers[6].q_means[0]:.4g}" in page


def test_provenance(result, page):
    installed = [f"{name} {html.escape(metadata.version(name))}" for name in ("torch", "transformers", "numpy")]
    for needle in ("What produced this report", result.model["revision"], "GPT2Model", *installed,
                   "2026-01-02 03:04:05 UTC", "python -m reports --model", "--layer 6 --head 3"):
        assert needle in page, needle


def test_same_inputs_same_bytes_apart_from_the_time(gpt2, result, page):
    again = render_report(analyze(gpt2, FIJI, layers=[6]), head=3, generated_at=WHEN)
    assert again == page
    later = render_report(result, head=3, generated_at=datetime(2030, 1, 1, tzinfo=UTC))
    diff = [(a, b) for a, b in zip(page.splitlines(), later.splitlines()) if a != b]
    assert len(diff) == 1 and "2030-01-01" in diff[0][1]


def test_default_report_is_small(minilm):
    page = render_report(analyze(minilm, FIJI, layers=[3]))
    assert len(page.encode()) <= 2_000_000


def test_user_strings_are_escaped(gpt2):
    page = render_report(analyze(gpt2, PAYLOAD, layers=[6]), generated_at=WHEN)
    body = page.split("<script>", 1)[0]  # everything before the trusted bundle
    assert "<img src=x" not in body and "<script>document" not in body and "</s>" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "&lt;|endoftext|&gt;" in body
    assert embedded_results(page)["text"] == PAYLOAD


def test_several_layers_get_a_navigation(gpt2):
    page = render_report(analyze(gpt2, REPEATS, layers=[0, 6]), generated_at=WHEN)
    assert '<a href="#layer-0">0</a>' in page and '<a href="#layer-6">6</a>' in page
    assert list(embedded_results(page)["layers"]) == ["0", "6"]


def test_cli_html_and_from_report_round_trip(gpt2_path, tmp_path, capsys):
    out_json, out_html, back = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "back.json"
    assert main(["--model", str(gpt2_path), "--layer", "1", "--layer", "6", "--json", str(out_json),
                 "--html", str(out_html)]) == 0
    assert main(["--from-report", str(out_html), "--json", str(back)]) == 0
    written = json.loads(out_json.read_text())
    assert written.pop("provenance")["command"].endswith("--json results.json")  # the report shows its own
    assert json.loads(back.read_text()) == written
    assert read_report_results(out_html) == written


def test_from_report_on_a_file_that_is_not_a_report(tmp_path, capsys):
    other = tmp_path / "other.html"
    other.write_text("<html><body>hello</body></html>")
    assert main(["--from-report", str(other), "--json", str(tmp_path / "x.json")]) == 2
    assert "is it a headscope report?" in capsys.readouterr().err


def test_batch_writes_the_good_reports_and_lists_the_failure(gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.jsonl"
    batch.write_text("\n".join([json.dumps({"text": FIJI}), json.dumps({"text": "   "}), "not json",
                                json.dumps({"text": REPEATS})]) + "\n")
    out_dir = tmp_path / "archive"
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out_dir)]) == 0
    index = (out_dir / "index.html").read_text()
    assert sorted(p.name for p in out_dir.iterdir()) == ["corpus.html", "index.html", "report-0001.html",
                                                          "report-0004.html"]
    assert 'href="report-0001.html"' in index and 'href="report-0004.html"' in index
    assert "failed: The text is empty" in index and f"failed: line 3 {NOT_JSON}." in index
    assert read_report_results(out_dir / "report-0004.html")["text"] == REPEATS
    assert "2 failed" in capsys.readouterr().err


def test_batch_of_plain_lines(gpt2_path, tmp_path, capsys):
    batch = tmp_path / "texts.txt"
    batch.write_text("first text here\nsecond <b>text</b>\n")
    assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(tmp_path / "o")]) == 0
    index = (tmp_path / "o" / "index.html").read_text()
    assert "second &lt;b&gt;text&lt;/b&gt;" in index and index.count("report-000") == 4


def test_outputs_are_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--text", "x"])
    assert exit_info.value.code == 2
    assert "--json OUT and/or --html OUT" in capsys.readouterr().err


# ---- one copy of the data ------------------------------------------------------------------------------------------

def chart_blocks(page: str) -> dict:
    return {chart_id: json.loads(block) for chart_id, block in
            re.findall(r'<script type="application/json" id="(chart-[^"]+)">(.*?)</script>', page, re.DOTALL)}


def pool_of(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="headscope-datasets">(.*?)</script>', page, re.DOTALL)
    return json.loads(block[1])


def same_rows(rebuilt: list[dict], original: list[dict]) -> bool:
    """Equal rows, floats equal at float32 precision (what the report stores)."""
    if len(rebuilt) != len(original):
        return False
    for a, b in zip(rebuilt, original):
        if a.keys() != b.keys():
            return False
        for key in a:
            x, y = a[key], b[key]
            if isinstance(y, float) and y is not None and x is not None:
                if not math.isclose(x, y, rel_tol=2e-7, abs_tol=1e-30):
                    return False
            elif x != y:
                return False
    return True


def test_charts_carry_no_data_and_the_pool_rebuilds_every_row(gpt2):
    result = analyze(gpt2, REPEATS, layers=[0, 6], keep_patterns=True)
    page = render_report(result, head=2, generated_at=WHEN)
    charts = chart_blocks(page)
    assert "datasets" not in page.split('id="headscope-results"')[0].split("<main>")[1].replace(
        'data-datasets="', "")  # no inline data anywhere before the results block
    stored = pool_of(page)
    pool = DataPool.read(embedded_results(page), stored)
    originals = {}
    for layer in (0, 6):
        for item in build_layer_charts(result, layer, 2):
            originals[f"chart-L{layer}-{item.key}"] = _short_title(item.chart.to_dict())  # as the page titles it
    for score in result.head_scores:
        originals[f"chart-atlas-{score}"] = _short_title(build_atlas_chart(result, score).to_dict())
    assert set(originals) == set(charts)
    for chart_id, original in originals.items():
        datasets = original.pop("datasets")
        assert "datasets" not in json.dumps(charts[chart_id]) and pool.spec(charts[chart_id]) == original, chart_id
        names = re.search(rf'data-chart="{chart_id}" data-datasets="([^"]*)"', page)[1].split()
        assert sorted(names) == sorted(datasets)
        for name, rows in datasets.items():
            assert same_rows(pool.rows(name), rows), (chart_id, name)
    # the values really come from the results JSON: the dot products' column points into it
    columns = [enc for data in stored["datasets"].values() for enc in data["columns"].values() if "sources" in enc]
    paths = {tuple(stored["sources"][s]) for enc in columns for s in enc["sources"]}
    assert ("layers", "6", "diff_head_dp") in paths and ("layers", "6", "final_to_prev") in paths


def test_floats_are_written_at_float32_precision_and_round_trip(gpt2):
    result = analyze(gpt2, FIJI, layers=[6])
    data = result.to_dict()
    values = data["layers"]["6"]["diff_head_dp"] + data["layers"]["6"]["kde"]["final_to_prev"]
    assert values and all(float(f"{v:.9g}") == v for v in values)  # 9 significant digits, no more
    layer = data["layers"]["6"]
    arrays = {name: value for name, value in layer.items() if isinstance(value, list)}
    arrays.update(kde=layer["kde"], centred=[layer["dp_stats"][k] for k in ("same_head_dp_centered",
                                                                             "diff_head_dp_centered")])
    assert not re.search(r"[1-9]\d{9}", json.dumps(arrays))  # no 17-digit noise in the float32 arrays
    # scalars computed in float64 (p-values, effect sizes) and the head scores keep float64's digits
    exact = result.layers[6].diff_head_dp
    assert np.allclose(data["layers"]["6"]["diff_head_dp"], exact, rtol=1e-8, atol=0)
    assert AnalysisResult.from_dict(json.loads(json.dumps(data))).to_dict() == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-300, max_value=5000), max_size=300), st.integers(1, 5), st.integers(1, 4))
def test_index_encodings_round_trip(values, times, each):
    for sequence in (values, values * times, [v for v in values for _ in range(each)]):
        assert _decode_indexes(_encode_indexes(sequence)) == sequence


def test_report_ratio_to_its_results_and_javascript(gpt2):
    result = analyze(gpt2, REPEATS, keep_patterns=True)  # every layer of the 8-layer checkpoint
    page = render_report(result, generated_at=WHEN).encode()
    results = len(json.dumps(result.to_dict(), allow_nan=False).encode())
    javascript = sum(len(script.encode()) for script in re.findall(r"<script>(.*?)</script>", page.decode(), re.DOTALL))
    assert len(page) <= 1.2 * (results + javascript), (len(page), results, javascript)


def _assert_same_numbers(got, want, where="", tolerance=1e-5):
    """Equal to `tolerance` relative to each field's scale, as tests/analysis/test_analyze.py's
    assert_same_result: a padded batch's matrix products round differently from a single text's."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        if want.get("dp_stats"):  # a layer: its rank statistics equal but for flips of near pairs of dot products
            got, want = ({**doc, "dp_stats": dict(doc["dp_stats"])} for doc in (got, want))
            dps = {"": (want["same_head_dp"], want["diff_head_dp"]),
                   "_centered": (want["dp_stats"]["same_head_dp_centered"], want["dp_stats"]["diff_head_dp_centered"])}
            for suffix, (same, diff) in dps.items():
                stats = [tuple(doc["dp_stats"].pop(name + suffix) for name in ("mannwhitney_p", "rank_biserial"))
                         for doc in (got, want)]
                assert_rank_statistics_close(*stats, same, diff, tolerance, f"{where}{suffix}")
        for key in want:
            _assert_same_numbers(got[key], want[key], f"{where}/{key}", tolerance)
    elif isinstance(want, list) and want and not any(isinstance(v, (str, dict)) for v in np.ravel(want)):
        got_a, want_a = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
        assert got_a.shape == want_a.shape, where
        scale = max(1.0, float(np.nanmax(np.abs(want_a), initial=0)))
        np.testing.assert_allclose(got_a, want_a, rtol=0, atol=tolerance * scale, err_msg=where)
    elif isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=tolerance, abs=tolerance, nan_ok=True), where
    else:
        assert got == want, where


def test_batch_size_four_writes_each_texts_single_numbers(gpt2_path, tmp_path, capsys):
    texts = [FIJI, "the cat", "   ", REPEATS, "A cat sat.",
             "Mary and John went to the store. John gave a drink to Mary.", "A dog."]
    batch = tmp_path / "texts.jsonl"
    batch.write_text("\n".join([json.dumps({"text": text}) for text in texts] + ["not json"]) + "\n")
    docs = {}
    for size in (1, 4):
        out = tmp_path / f"size-{size}"
        assert main(["--model", str(gpt2_path), "--batch", str(batch), "--out-dir", str(out), "--layer", "1",
                     "--layer", "6", "--batch-size", str(size)]) == 0
        err = capsys.readouterr().err
        assert "6 reports, 2 failed" in err
        index = (out / "index.html").read_text()
        assert "failed: The text is empty" in index and f"failed: line 8 {NOT_JSON}." in index
        docs[size] = {path.name: read_report_results(path) for path in sorted(out.glob("report-*.html"))}
    assert sorted(docs[4]) == sorted(docs[1]) == [f"report-{n:04d}.html" for n in (1, 2, 4, 5, 6, 7)]
    for name, want in docs[1].items():
        got = docs[4][name]
        assert list(got["layers"]) == ["1", "6"] and got["text"] == want["text"]
        _assert_same_numbers({k: v for k, v in got.items() if k != "provenance"},
                             {k: v for k, v in want.items() if k != "provenance"}, name)
    # --batch-size 1: each report holds exactly the numbers of its text's single run
    single = tmp_path / "single.html"
    assert main(["--model", str(gpt2_path), "--text", REPEATS, "--layer", "1", "--layer", "6", "--html",
                 str(single)]) == 0
    alone = read_report_results(single)
    assert {k: v for k, v in docs[1]["report-0004.html"].items() if k != "provenance"} == {
        k: v for k, v in alone.items() if k != "provenance"}

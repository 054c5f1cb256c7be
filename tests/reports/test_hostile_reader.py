"""Property tests of the report reader (--from-report): random pages, random bytes and random embedded JSON give
a validated document or one HeadscopeError line, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import HeadscopeError
from reports.html import read_report_results, results_from_page
from tests.analysis.test_hostile_parse import json_values

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPEN = '<script type="application/json" id="headscope-results">'


def assert_result_or_one_line(read):
    try:
        data = read()
    except HeadscopeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
        return
    assert isinstance(data, dict) and data["schema"] == "headscope.results/1"


@SETTINGS
@given(st.text(max_size=1000))
def test_a_random_page(page):
    assert_result_or_one_line(lambda: results_from_page(page))


@SETTINGS
@given(st.text(max_size=200), st.one_of(st.text(max_size=500), json_values.map(json.dumps)), st.text(max_size=200))
def test_a_page_with_random_embedded_results(before, payload, after):
    page = f"<html>{before}{OPEN}{payload}</script>{after}</html>"
    assert_result_or_one_line(lambda: results_from_page(page))


@SETTINGS
@given(st.binary(max_size=2000))
def test_a_random_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        path.write_bytes(data)
        assert_result_or_one_line(lambda: read_report_results(path))

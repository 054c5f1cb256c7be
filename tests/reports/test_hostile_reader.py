"""Property tests of the report reader (--from-report): random pages, random bytes and random embedded JSON give
a validated document or one HeadscopeError line, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import HeadscopeError
from reports.html import read_report_results, report_document, results_from_page
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


TINY_RESULTS = json.dumps({  # a valid results block, so that the block under test is read too
    "schema": "headscope.results/1", "text": "a b", "tokens": ["a", "b"], "token_ids": [1, 2],
    "model": {"id": "m", "revision": "", "architecture": "GPT2", "family": "GPT-2", "n_layers": 1, "n_heads": 1,
              "n_kv_heads": 1, "d_head": 2, "causal": True, "dtype": "float32", "device": "cpu"},
    "settings": {"exclude_first_token": True}, "layers": {}, "head_scores": {}})


@SETTINGS
@given(st.sampled_from(["headscope-beyond", "headscope-probe-results"]),
       st.one_of(st.text(max_size=500), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["ablation", "neuron", "compare"]), json_values,
                                 max_size=3).map(json.dumps)))
def test_a_page_with_a_random_extra_section(script_id, payload):
    """--from-report reads the ablation/neuron/compare and probe blocks too: a document or one line, never a crash."""
    page = f'<html>{OPEN}{TINY_RESULTS}</script><script type="application/json" id="{script_id}">{payload}</script>'
    try:
        data = report_document(page)
    except HeadscopeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
        return
    assert data["schema"] in ("headscope.results/1", "headscope.compare/1")

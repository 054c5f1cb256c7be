"""Property tests: every parser that reads a user's file gives a result or a HeadscopeError, never another exception.

hypothesis feeds random bytes, random text and random JSON to `parse_texts` (batch files and uploads) and to the
results reader (`parse_json` + `validate_results`, what --from-report uses); tests/reports/test_hostile_reader.py
does the same for whole report pages.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import HeadscopeError, analyze
from analysis.corpus import parse_texts
from analysis.schema import parse_json, validate_results

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def _dumps(value) -> str:
    return json.dumps(value)  # NaN and Infinity written as Python does: not JSON, the reader must refuse them


def assert_texts(parsed, data):
    assert isinstance(parsed, list)
    assert all(isinstance(item, (str, HeadscopeError)) for item in parsed)
    data = data.removeprefix(b"\xef\xbb\xbf" if isinstance(data, bytes) else "\ufeff")  # a BOM is no line's text
    assert len(parsed) == len([line for line in data.splitlines() if line.strip()])  # one entry per non-empty line
    for item in parsed:
        if isinstance(item, str):
            item.encode("utf-8")  # every text can be written out
        else:
            assert str(item).startswith("line ") and "\n" not in str(item)


def check_parse_texts(data):
    """parse_texts never raises anything but its one 'no texts' error, and yields one entry per non-empty line."""
    try:
        parsed = parse_texts(data)
    except HeadscopeError as exc:
        assert str(exc) == "The file holds no texts."
        return
    assert_texts(parsed, data)


@SETTINGS
@given(st.binary(max_size=2000))
def test_parse_texts_on_random_bytes(data):
    check_parse_texts(data)


@SETTINGS
@given(st.text(max_size=2000))
def test_parse_texts_on_random_text(data):
    check_parse_texts(data)


bad_lines = st.one_of(
    st.binary(min_size=1, max_size=50).map(lambda b: b"\xff" + b.replace(b"\n", b"").replace(b"\r", b"")),  # not UTF-8
    st.integers(1, 200_000).map(lambda n: b"[" * n),  # nested past any recursion limit, or not closed
    st.integers(1, 50_000).map(lambda n: b'{"a": ' * n + b"1" + b"}" * n),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: _dumps(v).encode()),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "text"), json_values, max_size=3)
    .map(lambda v: _dumps(v).encode()),
    st.text(max_size=30).map(lambda t: b'{"text": "\\ud800' + json.dumps(t)[1:].encode() + b"}"),  # lone surrogate
)
good_texts = st.text(min_size=1, max_size=50).filter(str.strip)


@SETTINGS
@given(st.lists(st.one_of(good_texts.map(lambda t: ("good", t)), bad_lines.map(lambda b: ("bad", b))),
                min_size=1, max_size=12))
def test_a_bad_jsonl_line_never_costs_the_good_ones(records):
    lines = [json.dumps({"text": "first"}).encode()]  # a JSONL file: its first line is an object
    lines += [json.dumps({"text": value}).encode() if kind == "good" else value for kind, value in records]
    parsed = parse_texts(b"\n".join(lines))
    assert len(parsed) == len(lines)
    assert parsed[0] == "first"
    for (kind, value), item in zip(records, parsed[1:]):
        if kind == "good":
            assert item == value
        else:
            assert isinstance(item, HeadscopeError), (value[:80], item)


@SETTINGS
@given(st.one_of(st.text(max_size=500), json_values.map(_dumps)))
def test_the_results_reader_on_random_json(text):
    try:
        data = parse_json(text, "The document")
    except HeadscopeError as exc:
        assert str(exc).startswith("The document is not valid JSON (") and "\n" not in str(exc)
        return
    _assert_finite(data)
    try:
        assert validate_results(data) is data
    except HeadscopeError as exc:
        assert "headscope.results/1" in str(exc) and "\n" not in str(exc)


def _assert_finite(value):
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, list):
        for item in value:
            _assert_finite(item)
    elif isinstance(value, dict):
        for item in value.values():
            _assert_finite(item)


@pytest.fixture(scope="module")
def real_results(gpt2):
    document = analyze(gpt2, "The cat sat.", [6]).to_dict()  # few tokens: validating it costs milliseconds
    assert validate_results(json.loads(json.dumps(document)))  # the untouched document is valid
    return document, list(_paths(document))[1:]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from _paths(item, (*prefix, index))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_results_reader_on_a_real_document_with_one_part_replaced(real_results, data):
    """A real results document with one field replaced by random JSON: a result or one HeadscopeError line."""
    original, paths = real_results
    path = data.draw(st.sampled_from(paths))
    document = copy.deepcopy(original)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(json_values)
    try:
        parsed = parse_json(_dumps(document), "The document")
        validate_results(parsed)
    except HeadscopeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 500

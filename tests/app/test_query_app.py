"""The app's token strip chooses the query token (issue 12): a click redraws from the kept capture without a
forward pass, the figures and the link name the token, and a bad ?query= in a link never crashes the page."""

from __future__ import annotations

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis import load_model, summarize
from analysis.capture import capture
from analysis.presets import FIJI
from tests.app import test_app
from tests.app.test_app import APP, TIMEOUT, charts, clear_caches  # noqa: F401 (clear_caches: a fixture)
from tests.app.test_hostile_app import active_markdown, markdown_texts


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


forward_calls = test_app.forward_calls  # the fixture: whole-model forward passes


def dots(at: AppTest) -> dict:
    """The dot products chart (its tab opened in turn, as a reader would)."""
    return next(s for s in charts(at) if "Raw attention scores" in s["title"]["text"])


def dot_title(at: AppTest) -> str:
    return json.dumps(dots(at)["title"])


def strip(at: AppTest):
    (pills,) = [group for group in at.get("button_group") if group.key and group.key.startswith("query-")]
    return pills


def test_clicking_a_token_chooses_the_query_without_the_model(forward_calls):
    at = run_app(model="minilm", layer="1")
    assert not at.exception and not at.error
    tokens = strip(at)
    n = len(tokens.options)
    assert tokens.value == n - 2  # the last word: [SEP] is the tokenizer's
    assert f"query token {n - 2} '.'" in dot_title(at) and "every other position" in dot_title(at)
    ran = len(forward_calls)
    assert ran >= 1
    strip(at).set_value(5)  # the element of the latest run (dot_title reran the page)
    at.run()
    assert not at.exception and not at.error
    assert len(forward_calls) == ran  # redrawn from the kept capture
    assert "query token 5 " in dot_title(at) and "(chosen)" in dot_title(at)
    assert at.query_params["query"] == "5"
    page = " ".join(m.value for m in at.markdown)
    assert "The figures use the query token 5" in page
    # the drawn numbers are the library's for that query (this capture is the test's own forward pass)
    same = [row["value"] for rows in dots(at)["datasets"].values() for row in rows if row.get("group") == "Same head"]
    assert len(forward_calls) == ran
    loaded = load_model("minilm")
    expected = summarize(capture(loaded, FIJI, [1], keep_patterns=True), loaded.info.to_dict(), [1],
                         query_position=5).layers[1]
    np.testing.assert_allclose(sorted(same), sorted(expected.same_head_dp), rtol=1e-5)


def test_a_link_carries_the_query_and_the_switches(forward_calls):
    at = run_app(model="minilm", layer="1", query="3", special_keys="1", keep_bos="1")
    assert not at.exception and not at.error
    assert strip(at).value == 3
    assert "query token 3 " in dot_title(at) and "special tokens" in dot_title(at)
    assert at.toggle(key="special_keys").value is True and at.toggle(key="exclude_bos").value is False
    assert (at.query_params["query"], at.query_params["special_keys"], at.query_params["keep_bos"]) == ("3", "1", "1")
    page = " ".join(m.value for m in at.markdown)
    assert "kept in the head scores (exclude BOS off)" in page


def test_a_link_without_its_text_carries_no_query():
    """A text too long for the link is left out of it, so the link opens another text (the default): a query token
    names a position of the text that was left out, so it goes too."""
    at = run_app(model="minilm", layer="1")
    long = " ".join(["extraordinarily"] * 120)  # ~120 tokens, 1,919 characters: over the app's MAX_URL_TEXT (1,500)
    test_app.submit(at, text=long)
    strip(at).set_value(3)
    at.run()
    assert not at.exception and not at.error and "query token 3 " in dot_title(at)
    assert "text" not in at.query_params and "query" not in at.query_params


@pytest.mark.parametrize("value", ["99", "9999"])
def test_an_out_of_range_query_in_a_link_is_an_error_not_a_crash(value):
    at = run_app(model="minilm", layer="1", query=value)
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert error.startswith(f"Query position {value} is out of range") and "default query token is shown" in error
    n = len(strip(at).options)
    assert strip(at).value == n - 2 and "query" not in at.query_params  # the default, and the link forgets it


@pytest.mark.parametrize("value", ["-1", "²", "1e3", "[x](http://127.0.0.1:9/)"])
def test_a_malformed_query_in_a_link_is_ignored_with_a_notice(value):
    at = run_app(model="minilm", layer="1", query=value)
    assert not at.exception and not at.error
    assert any("The link's query value" in w.value for w in at.warning)
    assert not [text for text in markdown_texts(at) if active_markdown(text)]
    assert strip(at).value == len(strip(at).options) - 2

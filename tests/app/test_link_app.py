"""What a shared link reopens: the view it was made from (every setting that changes the numbers), and a notice,
never a silent substitute, for a link value the page cannot show."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from analysis.presets import FIJI
from reports.untrusted import LINK_BAD_CHOICE, LINK_TEXT_LEFT_OUT, literal
from tests.app import test_app
from tests.app.test_app import APP, TIMEOUT, charts, clear_caches  # noqa: F401 (clear_caches: a fixture)
from tests.app.test_hostile_app import active_markdown, markdown_texts
from tests.app.test_query_app import strip

forward_calls = test_app.forward_calls  # the fixture: whole-model forward passes


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def test_a_link_reopens_the_first_token_and_dtype_it_was_made_with():
    at = run_app(model="minilm", layer="1")
    at.toggle(key="exclude").set_value(False)
    at.selectbox(key="dtype").set_value("bfloat16")
    at.button[0].click().run()
    assert not at.exception and not at.error
    shown = charts(at)
    again = run_app(**dict(at.query_params))  # the link, opened afresh
    assert not again.exception and not again.error
    assert again.toggle(key="exclude").value is False and again.selectbox(key="dtype").value == "bfloat16"
    assert charts(again) == shown  # the same figures, number for number


@pytest.mark.parametrize("value", ["float64", "[x](http://127.0.0.1:9/)"])
def test_a_bad_dtype_in_a_link_is_ignored_with_a_notice(value):
    at = run_app(model="minilm", layer="1", dtype=value)
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [LINK_BAD_CHOICE.format(name="dtype", value=literal(value),
                                                                    choices="float32, bfloat16, float16")]
    assert not [text for text in markdown_texts(at) if active_markdown(text)]
    assert at.selectbox(key="dtype").value == "float32" and "dtype" not in at.query_params


def atlas_score(at: AppTest) -> str:
    return at.selectbox(key="atlas_score").value


@pytest.mark.parametrize("query, name, value", [
    ({"score": "text:inductoin"}, "score", "text:inductoin"),  # a typo
    ({"score": "probe:induction"}, "score", "probe:induction"),  # a probe score with the probe off
    ({"score": "[x](http://127.0.0.1:9/)"}, "score", "[x](http://127.0.0.1:9/)"),
    ({"probe": "true", "score": "probe:induction"}, "probe", "true"),
    ({"special_keys": "yes"}, "special_keys", "yes"),
    ({"keep_bos": "on"}, "keep_bos", "on"),
    ({"keep_first": "2"}, "keep_first", "2")])
def test_a_view_the_page_cannot_show_is_noticed_not_replaced_silently(query, name, value):
    """Such a link used to open the default atlas score or leave the switch off without a word."""
    at = run_app(model="minilm", layer="1", **query)
    assert not at.exception and not at.error
    notices = [w.value for w in at.warning]
    assert notices and notices[0].startswith(f"The link's {name} value {literal(value)} is not "), notices
    assert notices[0].endswith(": it was ignored.")
    assert not [text for text in markdown_texts(at) if active_markdown(text)]
    assert atlas_score(at) == "text:previous_token" and "probe" not in at.query_params  # the defaults, named
    assert at.toggle(key="special_keys").value is False and at.toggle(key="exclude_bos").value is True
    assert at.toggle(key="exclude").value is True


def test_the_switches_and_scores_a_link_names_are_shown():
    at = run_app(model="minilm", layer="1", probe="1", score="probe:sink", special_keys="1", keep_bos="0",
                 keep_first="0")
    assert not at.exception and not at.error and not at.warning
    assert atlas_score(at) == "probe:sink" and at.checkbox(key="probe").value
    assert at.toggle(key="special_keys").value and at.toggle(key="exclude_bos").value and at.toggle(key="exclude").value


def test_a_link_that_left_its_long_text_out_says_so():
    """A text over MAX_URL_TEXT characters is left out of the link: the link opens the default text, and used to
    show it as if it were the text the link was made from."""
    at = run_app(model="minilm", layer="1")
    long = " ".join(["extraordinarily"] * 120)  # 1,919 characters: over the app's MAX_URL_TEXT (1,500)
    at.text_area[0].set_value(long)
    at.button[0].click().run()
    assert not at.exception and not at.error and "text" not in at.query_params
    again = run_app(**dict(at.query_params))
    assert not again.exception and not again.error
    assert [w.value for w in again.warning] == [LINK_TEXT_LEFT_OUT.format(max=1500)]
    assert again.text_area[0].value == FIJI
    again.button[0].click().run()  # Analyse with the form's values: the notice has done its job
    assert not again.warning
    assert "long_text" not in again.query_params  # the default text is now what the link opens


def test_a_links_notice_goes_when_the_reader_changes_the_view(forward_calls):
    """A notice about the link that opened the page stayed until Analyse, though a click on the token strip (or the
    atlas) had already made the view the reader's own and rewritten the link."""
    at = run_app(model="minilm", layer="1", dtype="float64")
    assert not at.exception and [w.value for w in at.warning] == [LINK_BAD_CHOICE.format(
        name="dtype", value=literal("float64"), choices="float32, bfloat16, float16")]
    ran = len(forward_calls)
    strip(at).set_value(3)
    at.run()
    assert not at.exception and not at.error and not at.warning
    assert at.query_params["query"] == "3" and len(forward_calls) == ran


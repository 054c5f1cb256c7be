"""The browser's Back and Forward through AppTest: Streamlit reruns the script with the URL's params, marked as a
history navigation, and the page shows that link's view from the kept results (no new forward pass)."""

from __future__ import annotations

import functools

import pytest
from streamlit.runtime.scriptrunner import RerunData
from streamlit.testing.v1 import AppTest, local_script_runner

from analysis.presets import FIJI
from reports.untrusted import LINK_BAD_NUMBER, literal
from tests.app import test_app
from tests.app.test_app import chart_titled, clear_caches, drawn_charts, sidebar_number, submit  # noqa: F401
from tests.app.test_query_app import run_app, strip

forward_calls = test_app.forward_calls  # the fixture: whole-model forward passes
CAT = "The cat sat on the mat. The cat sat on the mat."


def navigate(at: AppTest, params: dict, history: bool = True) -> AppTest:
    """The browser's Back or Forward to the link `params`, as Streamlit 1.67's frontend sends it on popstate: a rerun
    with that URL's query string and isHistoryNavigation (history=False: a rerun carrying an older link, not marked)."""
    at.query_params = dict(params)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_script_runner, "RerunData", functools.partial(RerunData, is_history_navigation=history))
        return at.run()


def view(at: AppTest) -> dict:
    """What the page shows: the sidebar's widgets, the heatmap's head and the token strip's query token."""
    (heatmap,) = [spec["title"]["text"].split(" · ")[0] for spec in drawn_charts(at)
                  if spec["title"]["text"].startswith("Attention pattern of")]
    return {"layer": sidebar_number(at, "Layer").value, "head": sidebar_number(at, "Head").value,
            "text": at.text_area[0].value, "exclude": at.toggle(key="exclude").value,
            "special_keys": at.toggle(key="special_keys").value, "heatmap": heatmap, "query": strip(at).value,
            "score": at.selectbox(key="atlas_score").value}


def test_back_and_forward_show_each_link_from_the_kept_results(forward_calls):
    at = run_app(model="minilm", layer="1", head="2")
    assert not at.exception and not at.error
    first, first_link = view(at), dict(at.query_params)
    at = submit(at, text=CAT, layer=4, head=7, exclude=False)  # another text: its own forward pass
    at.toggle(key="special_keys").set_value(True)
    at.button[0].click().run()
    middle, middle_link = view(at), dict(at.query_params)
    strip(at).set_value(3)
    at.selectbox(key="atlas_score").set_value("text:induction")
    at.run()
    assert not at.exception and not at.error
    second, second_link = view(at), dict(at.query_params)
    assert second == {"layer": 4, "head": 7, "text": CAT, "exclude": False, "special_keys": True,
                      "heatmap": "Attention pattern of L4H7", "query": 3, "score": "text:induction"}
    assert second_link["query"] == "3" and second_link["score"] == "text:induction"
    ran = list(forward_calls)

    at = navigate(at, first_link)  # Back
    assert not at.exception and not at.error and not at.warning
    assert view(at) == first and first["text"] == FIJI and first["heatmap"] == "Attention pattern of L1H2"
    assert at.query_params == first_link  # not rewritten with the view it came from
    at = navigate(at, second_link)  # Forward
    assert not at.exception and not at.error and not at.warning
    assert view(at) == second and at.query_params == second_link
    at = navigate(at, middle_link)  # Back: the same text, the default query token and score again
    assert view(at) == middle and at.query_params == middle_link
    assert middle["query"] != 3 and middle["score"] == "text:previous_token"
    at = navigate(at, second_link)
    assert view(at) == second and at.query_params == second_link
    assert forward_calls == ran  # every view redrawn from the kept captures

    at = submit(at, layer=2)  # the form after Forward holds the navigated view: Analyse keeps all of it
    assert view(at) == {**second, "layer": 2, "heatmap": "Attention pattern of L2H7"}
    assert forward_calls == ran


def test_a_bad_value_in_the_navigated_link_is_dropped_with_a_notice():
    at = run_app(model="minilm", layer="1", head="2")
    link = dict(at.query_params)
    at = submit(at, layer=4, head=7)
    at = navigate(at, {**link, "layer": "²"})
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [LINK_BAD_NUMBER.format(name="layer", value=literal("²"), max=9_999)]
    assert view(at)["layer"] == 3 and view(at)["head"] == 2  # the model's default layer, named in the link
    assert at.query_params == {**link, "layer": "3"}


def test_a_rerun_with_an_older_link_that_is_no_navigation_keeps_the_view():
    """A click sent before the browser had the app's last link carries the older one: the view stays."""
    at = run_app(model="minilm", layer="1", head="2")
    link = dict(at.query_params)
    at = submit(at, layer=4, head=7)
    later = dict(at.query_params)
    at = navigate(at, link, history=False)
    assert not at.exception and not at.error
    assert (view(at)["layer"], view(at)["head"]) == (4, 7) and at.query_params == later


def test_back_to_a_link_made_from_a_long_text_shows_that_text(forward_calls):
    """A link leaves a text over 1,500 characters out (long_text=1): Back to it shows this session's text, where a
    link opened afresh shows the default text with a notice."""
    at = run_app(model="minilm", layer="1")
    long = " ".join(["extraordinarily"] * 120)  # 1,919 characters
    at = submit(at, text=long)
    link = dict(at.query_params)
    assert "text" not in link and link["long_text"] == "1"
    at = submit(at, text=CAT)
    ran = list(forward_calls)
    at = navigate(at, link)
    assert not at.exception and not at.error and not at.warning
    assert at.text_area[0].value == long and at.query_params == link
    assert forward_calls == ran  # its capture was kept

"""The token strip in a real browser (issue 12): `streamlit run`, headless Chromium, a click on a token."""

from __future__ import annotations

from tests.app.test_served_app import DRAW_TIMEOUT_MS, ERRORS


def test_clicking_a_token_in_the_strip_chooses_the_query(shared_served_app, chromium):
    served_app = shared_served_app
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{served_app}/?model=minilm&layer=1")
        caption = page.get_by_text("The figures use the query token 39")  # Fiji: the last word, '.' before [SEP]
        caption.wait_for(state="visible", timeout=DRAW_TIMEOUT_MS)
        strip = page.locator('[role=radiogroup][aria-label="Query token"]')  # one pill (role radio) per token
        sep = strip.get_by_role("radio", name="[SEP]₄₀◆", exact=True)  # special: marked, unescaped
        sep.wait_for(state="visible", timeout=60_000)  # the strip may draw after the caption: count() does not wait
        assert sep.count() == 1
        assert strip.get_by_role("radio", name=".₃₉", exact=True).get_attribute("aria-checked") == "true"
        strip.get_by_role("radio", name="of₃", exact=True).click()  # the first 'of' (30 is another)
        page.get_by_text("The figures use the query token 3 ").wait_for(state="visible", timeout=60_000)
        page.wait_for_function("() => location.search.includes('query=3')", timeout=60_000)
        page.get_by_role("tab", name="q·k dot products").click()
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg .role-title-subtitle')]
                   .some((t) => t.textContent.includes("query token 3 'of' (chosen)"))""", timeout=60_000)
        assert strip.get_by_role("radio", name="of₃", exact=True).get_attribute("aria-checked") == "true"
        assert page.locator(ERRORS).count() == 0, page.locator(ERRORS).all_inner_texts()
    finally:
        page.close()

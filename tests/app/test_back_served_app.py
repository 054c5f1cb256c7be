"""The browser's Back and Forward in a real browser: `streamlit run`, headless Chromium, an atlas click and a token
click, then Back and Forward through the views they made; and the atlas's outline after a click and the sidebar."""

from __future__ import annotations

from tests.app.test_served_app import (
    DRAW_TIMEOUT_MS,
    ERRORS,
    outlined_cells,
    sidebar_head,
    wait_for_title,
)


def shows(page, head: tuple[int, int], url: str) -> None:
    """The page shows (layer, head) everywhere (heatmap, sidebar, atlas outline) and its URL is `url`, once the run
    that Back or Forward started is over: the app did not write the view it came from back into the URL."""
    wait_for_title(page, f"Attention pattern of L{head[0]}H{head[1]} ·")
    assert sidebar_head(page) == (str(head[0]), str(head[1]))
    assert outlined_cells(page) == [head[0] * 12 + head[1]]
    assert page.url == url


def click_cell(page, layer: int, head: int) -> None:
    atlas = page.locator('[data-testid="stVegaLiteChart"]').first
    atlas.scroll_into_view_if_needed()
    cell = atlas.locator("svg .mark-rect").first.locator("path").nth(layer * 12 + head).bounding_box()
    page.mouse.click(cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
    wait_for_title(page, f"Attention pattern of L{layer}H{head} ·")


def test_back_and_forward_step_through_the_views(shared_served_app, chromium):
    served_app = shared_served_app
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{served_app}/?model=minilm&layer=1&head=2")
        page.get_by_text("The figures use the query token 39").wait_for(state="visible", timeout=DRAW_TIMEOUT_MS)
        wait_for_title(page, "Attention pattern of L1H2 ·")
        assert_the_sidebar_moves_the_clicked_outline(page)
        first, entries = page.url, page.evaluate("history.length")
        click_cell(page, 4, 7)
        page.wait_for_function("() => location.search.includes('layer=4&head=7')", timeout=60_000)
        shows(page, (4, 7), second := page.url)
        strip = page.locator('[role=radiogroup][aria-label="Query token"]')
        strip.get_by_role("radio", name="of₃", exact=True).click()
        page.wait_for_function("() => location.search.includes('query=3')", timeout=60_000)
        page.get_by_text("The figures use the query token 3 ").wait_for(state="visible", timeout=60_000)
        third = page.url
        assert page.evaluate("history.length") == entries + 2  # one entry per view

        page.go_back()  # to the atlas click's view: the default query token again
        page.get_by_text("The figures use the query token 39").wait_for(state="visible", timeout=60_000)
        shows(page, (4, 7), second)
        assert strip.get_by_role("radio", name=".₃₉", exact=True).get_attribute("aria-checked") == "true"
        page.go_back()  # to the link's view
        shows(page, (1, 2), first)
        page.go_forward()
        shows(page, (4, 7), second)
        page.go_forward()
        page.get_by_text("The figures use the query token 3 ").wait_for(state="visible", timeout=60_000)
        shows(page, (4, 7), third)
        assert strip.get_by_role("radio", name="of₃", exact=True).get_attribute("aria-checked") == "true"
        assert page.evaluate("history.length") == entries + 2  # Back and Forward replaced no entry, added none
        assert page.locator(ERRORS).count() == 0, page.locator(ERRORS).all_inner_texts()
    finally:
        page.close()


def assert_the_sidebar_moves_the_clicked_outline(page):
    """A click outlines its cell in the browser, on the chart sent outlined at the head shown before: that head
    chosen again in the sidebar moves the outline back (the same chart sent again left it on the clicked cell)."""
    assert outlined_cells(page) == [1 * 12 + 2]
    click_cell(page, 2, 5)
    assert outlined_cells(page) == [2 * 12 + 5]
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_label("Layer").fill("1")
    sidebar.get_by_label("Head").fill("2")
    page.get_by_role("button", name="Analyse").click()
    wait_for_title(page, "Attention pattern of L1H2 ·")
    assert sidebar_head(page) == ("1", "2") and outlined_cells(page) == [1 * 12 + 2]

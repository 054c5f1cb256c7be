"""The atlas's outline in a real browser: `streamlit run`, headless Chromium, a click on a cell, then the head
shown before it chosen again in the sidebar."""

from __future__ import annotations

from tests.app.test_served_app import (  # noqa: F401 (served_app: a fixture)
    DRAW_TIMEOUT_MS,
    outlined_cells,
    served_app,
    sidebar_head,
    wait_for_title,
)


def click_cell(page, layer: int, head: int) -> None:
    atlas = page.locator('[data-testid="stVegaLiteChart"]').first
    atlas.scroll_into_view_if_needed()
    cell = atlas.locator("svg .mark-rect").first.locator("path").nth(layer * 12 + head).bounding_box()
    page.mouse.click(cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
    wait_for_title(page, f"Attention pattern of L{layer}H{head} ·")


def test_the_sidebar_moves_the_clicked_outline(served_app, chromium):  # noqa: F811
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{served_app}/?model=minilm&layer=1&head=2")
        page.get_by_text("The figures use the query token 39").wait_for(state="visible", timeout=DRAW_TIMEOUT_MS)
        wait_for_title(page, "Attention pattern of L1H2 ·")
        assert_the_sidebar_moves_the_clicked_outline(page)
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

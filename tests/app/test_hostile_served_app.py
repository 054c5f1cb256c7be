"""A hostile link opened in the served app (streamlit run + headless Chromium): no request leaves the page, no
link or image comes out of the user's text, and the page keeps its Analyse button."""

from __future__ import annotations

import http.server
import threading
from urllib.parse import urlencode, urlparse

import pytest

from benchmarks.bench_app import free_port

LOAD_TIMEOUT_MS = 150_000


@pytest.fixture
def trap():
    """A local HTTP server that counts every request: what a hostile link would make the browser fetch."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_hostile_link_sends_no_request_and_keeps_the_page(shared_served_app, chromium, trap):
    served_app = shared_served_app
    trap_url, hits = trap
    app_host = urlparse(served_app).netloc
    model = f"![x]({trap_url}/pixel.png) [Session expired: sign in]({trap_url}/login)"
    query = urlencode({"model": model, "layer": "99999999999999999999", "head": "²"})
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto(f"{served_app}/?{query}")
        page.locator('[data-testid="stAlertContentError"]').first.wait_for(timeout=LOAD_TIMEOUT_MS)
        page.wait_for_timeout(2000)  # give an injected image or prefetch the time to be requested
        error = page.locator('[data-testid="stAlertContentError"]').inner_text()
        assert "HEADSCOPE_MODEL_DIRS" in error  # the refused-path sentence, its underscores shown as typed
        assert page.locator('[data-testid="stException"]').count() == 0
        # the form keeps the model as typed, for the visitor to fix; nothing of it was rendered as Markdown
        assert page.get_by_label("…or a hub id or local checkpoint path").input_value() == model
        injected = page.locator(f'img[src^="{trap_url}"], a[href^="{trap_url}"]')
        where = "e => e.closest('[data-testid]').outerHTML.slice(0, 600)"
        assert injected.count() == 0, [injected.nth(i).evaluate(where) for i in range(injected.count())]
        notices = page.locator('[data-testid="stAlertContentWarning"]').all_inner_texts()
        assert any("layer value 99999999999999999999" in notice for notice in notices), notices
        assert any("head value ²" in notice for notice in notices), notices
        assert page.get_by_role("button", name="Analyse").is_visible()
        assert hits == []  # the trap server saw nothing
        assert [url for url in requests if urlparse(url).netloc not in (app_host, "")] == []
    finally:
        page.close()

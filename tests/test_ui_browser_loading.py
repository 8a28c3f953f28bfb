"""A session that takes seconds to make (the demo calibrates per visitor) shows progress first,
then the app, in headless chromium; the server answers other visitors meanwhile."""

from __future__ import annotations

import threading
import urllib.request

import pytest

pytest.importorskip("playwright")
pytest.importorskip("panel")

from playwright.sync_api import expect  # noqa: E402

from qviz.cli import demo_session  # noqa: E402
from qviz.ui.serve import serve, session_factory  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def test_slow_session_shows_progress_then_the_app(chromium_path, tmp_path, new_page, artifacts):
    path = tmp_path / "demo.qviz"
    demo_session(progress=False).save(path)
    load, release = session_factory(path), threading.Event()

    def slow():  # held until the test has seen the progress page
        release.wait(60)
        return load()

    server = serve(slow, threaded=True, show=False, verbose=False, slow=True)
    try:
        page, console = new_page()
        page.goto(server.url)
        expect(page.get_by_text("preparing the session")).to_be_visible()
        page.screenshot(path=artifacts / "ui-preparing.png", full_page=True)
        with urllib.request.urlopen(server.url, timeout=30) as other:  # the server is not blocked
            assert other.status == 200
        release.set()
        expect(page.locator(".tabulator-row")).to_have_count(6, timeout=60_000)
        expect(page.get_by_text("preparing the session")).to_have_count(0)
        expect(page.locator(".js-plotly-plot")).to_have_count(3)
        assert console.errors == []
    finally:
        release.set()
        server.stop()

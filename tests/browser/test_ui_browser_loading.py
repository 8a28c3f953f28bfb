"""A session that takes seconds to make (the demo calibrates per visitor) shows progress first,
then the app, in headless chromium; the server answers other visitors meanwhile."""

from __future__ import annotations

import threading
import urllib.request

from qviz.cli import demo_session
from qviz.demo import session_factory
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytestmark = BROWSER_MARKS


def test_slow_session_shows_progress_then_the_app(chromium_path, tmp_path, new_page, artifacts):
    path = tmp_path / "demo.qviz"
    demo_session(progress=False).save(path)
    load, release = session_factory(path), threading.Event()

    def slow():  # held until the test has seen the progress page
        release.wait(60)
        return load()

    server = serve_recording(slow, slow=True)
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


def test_visitors_arriving_together_each_get_the_demo(chromium_path, new_page, artifacts):
    """Each visitor's demo session is prepared (traced, calibrated) on its own worker thread at the
    same time; FX tracing patches process-wide state, so without qviz's trace lock they broke
    each other ("could not trace DigitsNet"). A bare request prepares nothing."""
    server = serve_recording(session_factory(demo=True), slow=True)
    try:
        for _ in range(2):  # a link preview, a health check: the page, but no session made
            with urllib.request.urlopen(server.url, timeout=30) as visit:
                assert visit.status == 200
        (a, console_a), (b, console_b) = new_page(), new_page()
        a.goto(server.url)
        b.goto(server.url)
        try:
            for page in (a, b):
                expect(page.locator(".tabulator-row")).to_have_count(6, timeout=120_000)
                expect(page.locator(".alert-danger")).to_have_count(0)
        finally:
            a.screenshot(path=artifacts / "ui-visitor-a.png", full_page=True)
            b.screenshot(path=artifacts / "ui-visitor-b.png", full_page=True)
        assert len(server.sessions) == 2  # one per browser, none for the bare requests
        assert console_a.errors == [] and console_b.errors == []
    finally:
        server.stop()

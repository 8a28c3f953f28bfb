"""The served app under visitors: a bare request builds no Session, a served file is loaded once
and shared read-only, every closed page's dashboard and session are freed (live objects counted
with gc and weak references, after real page loads in headless chromium), and visitors past
``max_sessions`` get a page that says so."""

from __future__ import annotations

import gc
import time
import urllib.request
import weakref

import numpy as np
import pandas as pd
import pytest

import qviz
from qviz.demo import session_factory
from qviz.session import Session
from qviz.ui.serve import serve
from tests.browser.helpers import BROWSER_MARKS, expect

pytestmark = BROWSER_MARKS[1:]  # the warning filters; browser tests are marked one by one
browser = pytest.mark.browser

# A session no page is connected to is destroyed after this long (qviz serve: 15 s). It also
# bounds the time from a page's request to its websocket: past it the server has dropped the
# session and makes another for the websocket. 5 s leaves room on a busy machine.
IDLE_S = 5.0
ROWS = 6


def live(cls) -> int:
    """How many ``cls`` objects are alive after a full collection."""
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


def eventually(check, timeout: float = 60.0):
    """Poll ``check()`` (collecting garbage) until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s"
        time.sleep(0.25)


def dashboards() -> int:
    from qviz.ui.app import Dashboard

    return live(Dashboard)


@pytest.fixture(scope="module")
def demo_file(demo_sessions, tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "demo.qviz"
    demo_sessions().save(path)
    return path


def start(factory, idle_s: float = IDLE_S, **options):
    return serve(factory, threaded=True, show=False, verbose=False, idle_s=idle_s, **options)


def open_app(context, url):
    page = context.new_page()
    page.goto(url)
    expect(page.locator(".tabulator").first.locator(".tabulator-row")).to_have_count(ROWS)
    return page


def test_bare_requests_build_no_session_and_are_freed(demo_file):
    factory = session_factory(demo_file)  # the file, loaded once
    baseline, before = live(Session), dashboards()
    server = start(factory, idle_s=1.0, max_sessions=50)  # no page: 1 s is plenty
    try:
        held = 0
        for _ in range(20):  # a link preview, an <img src=...> on another site, a health check
            with urllib.request.urlopen(server.url, timeout=30) as visit:
                assert visit.status == 200
            held = max(held, server.visitors.count)
        assert live(Session) == baseline  # every request got the one loaded session
        assert held > 0  # each request's dashboard is held until its session expires ...
        eventually(lambda: server.visitors.count == 0 and dashboards() == before)  # ... then freed
        assert live(Session) == baseline and factory() is factory()
    finally:
        server.stop()


@browser
def test_closed_pages_free_their_sessions(chromium, demo_file):
    """Five visits, each a fresh session (as the demo gives each visitor), through real page loads
    and websockets: once the pages are closed, every session and dashboard is gone."""
    made = []

    def fresh():
        session = qviz.load(demo_file)
        made.append(weakref.ref(session))
        return session

    baseline, before = live(Session), dashboards()
    server = start(fresh)
    try:
        for _ in range(5):
            context = chromium.new_context()
            open_app(context, server.url)
            context.close()
        assert len(made) == 5
        eventually(lambda: server.visitors.count == 0 and dashboards() == before)
        eventually(lambda: all(ref() is None for ref in made) and live(Session) == baseline)
    finally:
        server.stop()


@browser
def test_a_served_file_is_shared_read_only(chromium, demo_file):
    """Two visitors of one served file see the same Session object, and what they do in the
    dashboard (select layers, toggle the log scale, press the sweep and search buttons)
    leaves its results exactly as the file holds them."""
    factory = session_factory(demo_file)
    shared, fresh = factory(), qviz.load(demo_file)
    baseline = live(Session)
    server = start(factory)
    try:
        contexts = [chromium.new_context() for _ in range(2)]
        for context in contexts:
            page = open_app(context, server.url)
            for layer in ("fc1", "block_conv2"):
                page.locator(".tabulator-row", has_text=layer).first.click()
                expect(page.locator(".gtitle", has_text="output activation")).to_contain_text(f"{layer}:")
            page.locator(".bk-Checkbox", has_text="log-scale counts").locator("input").click()
            page.locator(".bk-tab", has_text="Sensitivity").click()
            expect(page.get_by_text("a session loaded from a file cannot run one").first).to_be_visible()
        assert live(Session) == baseline and factory() is shared
        pd.testing.assert_frame_equal(shared.to_dataframe(), fresh.to_dataframe())
        assert shared.summary() == fresh.summary() and shared.results.meta == fresh.results.meta
        assert shared.results.records.keys() == fresh.results.records.keys()
        for name, record in fresh.results.records.items():
            mine = shared.results.records[name]
            assert mine.info == record.info
            for key, values in {**record.arrays, **record.stats.to_arrays()}.items():
                np.testing.assert_array_equal({**mine.arrays, **mine.stats.to_arrays()}[key], values)
        for context in contexts:
            context.close()
    finally:
        server.stop()


@browser
def test_visitors_past_the_limit_get_a_clear_page(chromium, demo_file):
    server = start(session_factory(demo_file), max_sessions=2)
    try:
        first, second, third = (chromium.new_context() for _ in range(3))
        open_app(first, server.url)
        open_app(second, server.url)
        late = third.new_page()
        late.goto(server.url)
        expect(late.get_by_text("qviz is already serving 2 visitor(s)")).to_be_visible()
        expect(late.locator(".tabulator")).to_have_count(0)
        first.close()  # a tab closed: its place comes back once its session is destroyed
        eventually(lambda: server.visitors.count == 1, timeout=30)
        late.reload()
        expect(late.locator(".tabulator").first.locator(".tabulator-row")).to_have_count(ROWS)
        second.close()
        third.close()
    finally:
        server.stop()

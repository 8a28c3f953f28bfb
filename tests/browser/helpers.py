"""What every browser test module shares: skip without Playwright/Panel (CI requires them, see
conftest.py), the marks, and a server that remembers the sessions it made."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright")
pytest.importorskip("panel")

from playwright.sync_api import expect  # noqa: E402

from qviz.ui.serve import serve  # noqa: E402

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

__all__ = ["BROWSER_MARKS", "expect", "serve_recording"]


def serve_recording(factory, **options):
    """Serve on 127.0.0.1 in a thread; ``server.sessions`` lists the sessions ``factory`` made
    (the last is the newest browser session's)."""
    made = []

    def recording():
        made.append(factory())
        return made[-1]

    server = serve(recording, threaded=True, show=False, verbose=False, **options)
    server.sessions = made
    return server


def heat_map_in(page, title: str):
    """The plotly chart whose text includes ``title``."""
    return page.locator(".js-plotly-plot").filter(has_text=title)


def open_heat_map_tab(page, url: str, tab: str, title: str):
    """Load the dashboard, open ``tab`` and wait for its heat map (``title``) and colour bar."""
    page.goto(url)
    expect(page.locator(".tabulator-row").first).to_be_visible()
    page.locator(".bk-tab", has_text=re.compile(f"^{re.escape(tab)}$")).click()
    expect(heat_map_in(page, title)).to_be_visible()
    expect(heat_map_in(page, title).locator(".colorbar")).to_have_count(1)

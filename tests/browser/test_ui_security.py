"""Text from a model or a session file never runs as script in the served dashboard: layer
names, types, observers, the flow and backend written as HTML (``<script>``, ``<img onerror>``,
``<details ontoggle>``) show literally in headless chromium, on load, on selecting their rows,
after an Apply and in the Compare tab; no dialog opens and no element of theirs exists."""

from __future__ import annotations

import re

import pytest

from qviz.demo import session_factory
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording
from tests.hostile import FILE_TEXT, NAMES, NAMES_B, hostile_file, hostile_session

pytestmark = BROWSER_MARKS


class Dialogs:
    """Every dialog the page opens (dismissed at once); checked to work with a probe alert."""

    def __init__(self, page):
        self.messages: list[str] = []
        page.on("dialog", self._seen)
        page.evaluate("() => alert('probe')")
        assert self.messages == ["probe"], "the dialog hook does not see alerts"
        self.messages.clear()

    def _seen(self, dialog):
        self.messages.append(dialog.message)
        dialog.dismiss()


def injected(page) -> dict:
    """Elements the payloads would create if rendered as HTML (Playwright's CSS pierces shadow roots)."""
    return {
        "img": page.locator("img[src='x']").count(),
        "details": page.locator("details").count(),
        "script": page.locator("script:not([type='application/json'])").filter(has_text="alert(").count(),
    }


NONE_INJECTED = {"img": 0, "details": 0, "script": 0}


def open_page(new_page, url, rows: int):
    page, console = new_page()
    page.goto("about:blank")
    dialogs = Dialogs(page)
    page.goto(url)
    expect(layer_rows(page)).to_have_count(rows)
    return page, console, dialogs


def layer_rows(page):
    return page.locator(".tabulator").first.locator(".tabulator-row")


def row(page, text):
    return layer_rows(page).filter(has_text=text)


def settle(page):
    """Let an ``onerror`` (a failed image fetch) or ``ontoggle`` that was queued fire."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(500)


@pytest.fixture(scope="module")
def live_server(chromium_path):
    """A live FX session of the hostile model (it applies), compared with another hostile one."""
    a, b = hostile_session(), hostile_session(NAMES_B)
    server = serve_recording(lambda: a, compare=lambda: b)
    yield server
    server.stop()


def test_hostile_layer_names_show_as_text(live_server, new_page, artifacts):
    page, console, dialogs = open_page(new_page, live_server.url, rows=len(NAMES))
    for name in NAMES:
        row(page, name).click()  # has_text: the cell shows the name as written
        expect(page.get_by_text(f"Configure {name}")).to_be_visible()  # the editor's heading
        expect(page.get_by_text(f"{name} · Linear").first).to_be_visible()  # the layer card
        settle(page)
        assert injected(page) == NONE_INJECTED
    # an Apply: the message names the layer
    page.locator(".bk-btn", has_text="int4").first.click()  # the editor's, in the first tab
    page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
    expect(page.get_by_text(f"applied {NAMES[-1]}: dtype=int4").first).to_be_visible()
    # the Compare tab: layers only in one session are listed by name
    page.locator(".bk-tab", has_text="Compare").click()
    expect(page.get_by_text(f"only in A: {NAMES[1]}, {NAMES[2]}")).to_be_visible()
    expect(page.get_by_text(f"only in B: {NAMES_B[0]}")).to_be_visible()
    compare_rows = page.locator(".tabulator").filter(has_text="A only").locator(".tabulator-row")
    compare_rows.filter(has_text="B only").click()  # B's own layer: the message says so
    expect(page.get_by_text(f"{NAMES_B[0]} is only in the compared session").first).to_be_visible()
    settle(page)
    page.screenshot(path=artifacts / "ui-hostile-names.png", full_page=True)
    assert injected(page) == NONE_INJECTED
    assert dialogs.messages == []
    assert console.errors == []


def test_hostile_session_file_shows_as_text(chromium_path, tmp_path, new_page, artifacts):
    path = hostile_file(tmp_path / "hostile.qviz")
    server = serve_recording(session_factory(path))
    try:
        page, console, dialogs = open_page(new_page, server.url, rows=len(NAMES))
        # no click: the figures line names the flow and backend, the card the first layer
        expect(page.get_by_text(f"flow {FILE_TEXT['flow']} · backend {FILE_TEXT['backend']}")).to_be_visible()
        card = f"{NAMES[0]} · {FILE_TEXT['type']} · quint8 {FILE_TEXT['qscheme']} · {FILE_TEXT['observer']}"
        expect(page.get_by_text(card)).to_be_visible()
        settle(page)
        assert injected(page) == NONE_INJECTED
        for name in NAMES[1:]:
            row(page, name).click()
            expect(page.get_by_text(f"{name} · {FILE_TEXT['type']}")).to_be_visible()
        settle(page)
        page.screenshot(path=artifacts / "ui-hostile-file.png", full_page=True)
        assert injected(page) == NONE_INJECTED
        assert dialogs.messages == []
        assert console.errors == []
    finally:
        server.stop()

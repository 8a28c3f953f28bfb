"""The served app in headless chromium: it loads cleanly, clicks select layers everywhere, and two
browser sessions never see each other's state. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time

import pytest

from qviz.demo import session_factory
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytestmark = BROWSER_MARKS

LAYERS = ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]


def wait_until(check, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``check()`` until it returns a truthy value (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout} s"
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def demo_file(demo_sessions, chromium_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("browser") / "demo.qviz"
    demo_sessions().save(path)
    return path


@pytest.fixture(scope="module")
def server(demo_file):
    """The demo (saved once, loaded once and shared by every browser session) served on 127.0.0.1."""
    running = serve_recording(session_factory(demo_file))
    yield running
    running.stop()


def open_app(page, url):
    page.goto(url)
    expect(page.locator(".tabulator-row")).to_have_count(len(LAYERS))
    expect(page.locator(".js-plotly-plot")).to_have_count(3)


def _css_class(name: str):
    return re.compile(rf"(^|\s){name}(\s|$)")


def histogram_title(page):
    return page.locator(".gtitle", has_text="output activation")


def row(page, layer):
    return page.locator(".tabulator-row", has_text=layer)


def test_app_loads_without_console_errors(server, new_page, artifacts):
    page, console = new_page()
    open_app(page, server.url)
    assert server.url.startswith("http://127.0.0.1:")
    expect(page).to_have_title("qviz")
    expect(histogram_title(page)).to_contain_text("stem_conv:")
    sqnr = server.sessions[-1].summary()["output_sqnr"]
    expect(page.get_by_text(f"{sqnr:.2f} dB", exact=True)).to_be_visible()  # the model-level figure
    expect(row(page, "stem_conv")).to_have_class(_css_class("tabulator-selected"))
    page.screenshot(path=artifacts / "ui-loaded.png", full_page=True)
    assert console.errors == []


def test_clicking_a_row_updates_the_histogram(server, new_page, artifacts):
    page, console = new_page()
    open_app(page, server.url)
    row(page, "fc2").click()
    expect(histogram_title(page)).to_contain_text("fc2: output activation")
    expect(page.locator(".gtitle", has_text="weight scale")).to_contain_text("fc2:")
    expect(row(page, "fc2")).to_have_class(_css_class("tabulator-selected"))
    page.screenshot(path=artifacts / "ui-row-clicked.png", full_page=True)
    assert console.errors == []


def test_clicking_a_depth_point_selects_its_layer(server, new_page):
    page, console = new_page()
    open_app(page, server.url)
    depth = page.locator(".js-plotly-plot").filter(has_text="Error along depth")
    point = depth.locator("g.trace.scatter").nth(1).locator("path.point").nth(3)  # output SQNR of down_conv

    def clicked():
        point.click(force=True)  # plotly's hit test needs the pointer over the marker
        try:
            expect(histogram_title(page)).to_contain_text("down_conv:", timeout=3000)
        except AssertionError:
            return False
        return True

    wait_until(clicked, timeout=60)
    expect(row(page, "down_conv")).to_have_class(_css_class("tabulator-selected"))
    assert console.errors == []


def test_layer_table_shows_every_cell_and_title_in_full(server, new_page):
    """The table's column widths are computed on the server: no value or title may be cut off."""
    page, console = new_page()
    open_app(page, server.url)
    table = page.locator(".tabulator").first
    clipped = table.evaluate("""t => [...t.querySelectorAll('.tabulator-cell, .tabulator-col-title')]
        .filter(e => e.textContent.trim() && e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
        .map(e => e.textContent.trim())""")
    assert clipped == [], clipped
    assert table.locator(".tabulator-cell").count() > 10 * len(LAYERS)  # it did look at the cells
    assert console.errors == []


def test_log_toggle_changes_the_y_axis(server, new_page):
    page, console = new_page()
    open_app(page, server.url)
    plot = page.locator(".js-plotly-plot").filter(has=histogram_title(page))
    assert plot.evaluate("el => el.layout.yaxis.type") == "log"
    page.locator(".bk-Checkbox", has_text="log-scale counts").locator("input").click()  # the label is a div
    wait_until(lambda: plot.evaluate("el => el.layout.yaxis.type") == "linear")
    assert console.errors == []


def test_two_browser_sessions_have_independent_state(server, new_page, artifacts):
    before = len(server.sessions)
    (a, console_a), (b, console_b) = new_page(), new_page()
    open_app(a, server.url)
    open_app(b, server.url)
    row(a, "fc1").click()
    expect(histogram_title(a)).to_contain_text("fc1:")
    row(b, "block_conv2").click()
    expect(histogram_title(b)).to_contain_text("block_conv2:")
    # each kept its own selection
    expect(histogram_title(a)).to_contain_text("fc1:")
    expect(row(a, "fc1")).to_have_class(_css_class("tabulator-selected"))
    expect(row(a, "block_conv2")).not_to_have_class(_css_class("tabulator-selected"))
    a.screenshot(path=artifacts / "ui-session-a.png", full_page=True)
    b.screenshot(path=artifacts / "ui-session-b.png", full_page=True)
    made = server.sessions[before:]
    assert len(made) == 2 and made[0] is made[1]  # the file, loaded once: only the dashboards differ
    assert console_a.errors == [] and console_b.errors == []


@pytest.fixture(scope="module")
def live_server(chromium_path):
    """The embedded demo run afresh for every browser session (what `qviz serve --demo` does)."""
    running = serve_recording(session_factory(demo=True))
    yield running
    running.stop()


@pytest.mark.slow
def test_apply_in_one_session_leaves_the_other_alone(live_server, new_page, artifacts):
    (a, console_a), (b, console_b) = new_page(), new_page()
    open_app(a, live_server.url)
    open_app(b, live_server.url)
    session_a, session_b = live_server.sessions[-2:]
    if not getattr(session_a, "can_apply", False):
        pytest.skip("this Session cannot apply plans yet")
    before_b = b.locator(".tabulator-row", has_text="fc1").inner_text()
    row(a, "fc1").click()
    expect(a.get_by_text("Configure fc1")).to_be_visible()
    a.locator(".bk-btn", has_text="int4").first.click()  # the editor's, in the first tab
    a.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
    expect(a.get_by_text("applied fc1: dtype=int4").first).to_be_visible()
    expect(a.get_by_text("fc1: output SQNR")).to_be_visible()  # the before/after table, in units
    assert session_a.plan["fc1"].dtype == "int4"
    a.screenshot(path=artifacts / "ui-applied.png", full_page=True)
    # the other browser session: same numbers, same plan
    assert session_b.plan["fc1"].dtype != "int4"
    assert b.locator(".tabulator-row", has_text="fc1").inner_text() == before_b
    expect(b.get_by_text("applied fc1")).to_have_count(0)
    a.locator(".bk-btn", has_text="Undo").click()
    expect(a.get_by_text("undone: back to the previous plan").first).to_be_visible()
    assert session_a.plan["fc1"].dtype == session_b.plan["fc1"].dtype
    assert console_a.errors == [] and console_b.errors == []

"""The Layers tab of a live demo session as a user sees it in headless chromium, measured on the
drawn page (element boxes), not on figure objects: the SQNR columns are in view at 1600 px, no
chart's legend lies over its title or runs out of its figure and no title is cut at 900 or 1600
px, the header's details stay on screen, the editor offers only what the session can do, the
before/after table waits for a change and an Apply answers once, under the editor, without
moving the page. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re

import pytest

from qviz.cli import demo_session
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording
from tests.browser.test_ui_browser_screens import inside, overlap

pytestmark = BROWSER_MARKS

LAYERS = 6


@pytest.fixture(scope="module")
def server(chromium_path):
    """The live demo (FX, x86): a fresh session per browser session, so an Apply changes nothing
    the next test sees."""
    running = serve_recording(lambda: demo_session(progress=False))
    yield running
    running.stop()


def open_app(page, url):
    page.goto(url)
    expect(page.locator(".tabulator-row")).to_have_count(LAYERS, timeout=60_000)
    expect(page.locator(".js-plotly-plot")).to_have_count(3, timeout=60_000)
    expect(page.locator(".gtitle", has_text="weight scale")).to_be_visible(timeout=30_000)


def boxes(locator) -> list[dict]:
    return [b for b in (e.bounding_box() for e in locator.all()) if b is not None]


def test_the_sqnr_columns_are_in_view_without_scrolling_at_1600px(server, new_page, artifacts):
    page, console = new_page(1600, 1000)
    open_app(page, server.url)
    holder = page.locator(".tabulator-tableholder").first.bounding_box()
    for field in ("output_sqnr", "local_sqnr", "weight_sqnr"):
        header = page.locator(f'.tabulator-col[tabulator-field="{field}"]').first.bounding_box()
        assert header is not None, field
        left, right = header["x"], header["x"] + header["width"]  # the header row lies above the holder
        assert holder["x"] - 0.5 <= left and right <= holder["x"] + holder["width"] + 0.5, (
            f"{field} is scrolled out of the table's view")
        assert right <= 1600
    page.screenshot(path=artifacts / "ui-layers-1600.png", full_page=True)
    assert console.errors == []


@pytest.mark.parametrize("width", [900, 1600])
def test_no_legend_lies_over_a_title_and_nothing_runs_off_the_screen(server, new_page, artifacts, width):
    page, console = new_page(width, 1000)
    open_app(page, server.url)
    page.wait_for_timeout(500)  # plotly's legend and title land after the first draw
    for chart in page.locator(".js-plotly-plot").all():
        figure = chart.locator(".main-svg").first.bounding_box()
        titles = boxes(chart.locator(".gtitle"))
        assert titles and all(inside(t, figure) for t in titles), f"a title {titles} is cut at its figure's edge {figure}"
        for legend in boxes(chart.locator("g.legend rect.bg")):
            assert inside(legend, figure), "a legend runs out of its figure"
            assert not any(overlap(legend, t) for t in titles), "a legend lies over its chart's title"
    details = page.get_by_text(re.compile(r"^6 layers · weights")).bounding_box()
    assert details["x"] + details["width"] <= width, "the header's details run off the screen"
    page.screenshot(path=artifacts / f"ui-layers-{width}.png", full_page=True)
    assert console.errors == []


def test_the_editor_offers_only_the_dtypes_the_session_can_convert(server, new_page):
    page, console = new_page(1600, 1000)
    open_app(page, server.url)
    session = server.sessions[-1]
    page.locator(".tabulator-row", has_text="fc1").click()
    expect(page.get_by_text("Configure fc1")).to_be_visible()
    offered = page.locator(".bk-btn-group").filter(has_text="int8").first.locator(".bk-btn").all_inner_texts()
    assert offered == list(session.choices("fc1", "dtype", ("int8", "int4", "fp16", "float")))
    assert "fp16" not in offered  # FX on x86 has no fp16 kernels for a static layer
    assert console.errors == []


def test_an_apply_answers_once_under_the_editor_without_moving_the_page(server, new_page, artifacts):
    page, console = new_page(1600, 1000)
    open_app(page, server.url)
    page.locator(".tabulator-row", has_text="block_conv2").click()
    expect(page.get_by_text("Configure block_conv2")).to_be_visible()
    before_after = page.get_by_text("Before / after")
    expect(before_after).to_be_hidden()  # nothing to compare before a change
    table = page.locator(".tabulator").first
    top = "e => e.getBoundingClientRect().top + window.scrollY"  # on the page, wherever it is scrolled
    before = table.evaluate(top)
    page.locator(".bk-btn", has_text="per_tensor").click()
    page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
    message = page.get_by_text("applied block_conv2: weight=per_tensor")
    expect(message.first).to_be_visible(timeout=60_000)
    expect(message).to_have_count(1)  # once, not again on the page's line
    apply = page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).bounding_box()
    assert message.first.bounding_box()["y"] > apply["y"], "the answer to Apply is not under the editor"
    assert table.evaluate(top) == pytest.approx(before, abs=0.5), "the message pushed the page down"
    expect(before_after).to_be_visible()
    changes = page.locator(".tabulator").filter(has_text="block_conv2: weight SQNR")
    first = changes.locator(".tabulator-row").first
    expect(first).to_contain_text("block_conv2: weight")  # the choice that changed, first
    expect(first).to_contain_text("per_tensor")
    expect(changes).to_contain_text(" dB")  # figures in their units
    page.screenshot(path=artifacts / "ui-layers-applied.png", full_page=True)
    assert console.errors == []

"""The QAT and Compare tabs in headless chromium: a session with a recorded QAT timeline served
on 127.0.0.1 beside the demo's PTQ session (what `qviz serve qat.qviz --compare ptq.qviz` does).
Screenshots go to test-artifacts/."""

from __future__ import annotations

import time

import pytest

from qviz.cli import demo_session
from qviz.demo import session_factory
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording
from tests.qat_session import qat_session

pytestmark = BROWSER_MARKS

LAYERS = ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]
RENDER = 30_000  # ms: a tab's first render on a busy two-core machine


@pytest.fixture(scope="module")
def server(chromium_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_qat")
    qat_session().save(folder / "qat.qviz")
    demo_session(progress=False).save(folder / "ptq.qviz")
    running = serve_recording(session_factory(folder / "qat.qviz"), compare=session_factory(folder / "ptq.qviz"))
    yield running
    running.stop()


def wait_until(check, timeout: float = 30.0):
    """Poll ``check()`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.1)


def open_tab(page, url, name):
    page.goto(url)
    expect(page.locator(".gtitle", has_text="output activation")).to_be_visible(
        timeout=60_000
    )  # Layers is up
    page.locator(".bk-tab", has_text=name).click()


def plot(page, title):
    return page.locator(".js-plotly-plot").filter(has=page.locator(".gtitle", has_text=title))


def test_the_qat_tab_draws_the_recorded_timeline(server, new_page, artifacts):
    page, console = new_page()
    open_tab(page, server.url, "QAT")
    qparams = plot(page, "over training").first
    expect(qparams).to_be_visible(timeout=RENDER)
    expect(page.locator(".gtitle", has_text="stem_conv: activation_post_process_1")).to_be_visible()
    names = qparams.evaluate("el => el.data.map(t => t.name)")
    assert {"scale", "zero point", "min", "max"} <= set(names)
    assert qparams.evaluate("el => el.data[0].x.length") == 10  # the snapshots of 20 steps, every 2
    assert qparams.locator("g.trace.scatter").count() >= 4  # drawn, not only in the model
    heat = plot(page, "histogram over training")
    expect(heat.locator("g.heatmaplayer image, g.hm image")).not_to_have_count(0)
    assert heat.evaluate("el => el.data[0].type") == "heatmap"
    assert qparams.evaluate(
        "el => el.layout.shapes.filter(s => s.name === 'event').map(s => s.x0)"
    ) == [12, 16]
    expect(plot(page, "logged scalars")).to_be_visible()
    expect(page.get_by_text("over 20 training steps")).to_be_visible()
    page.screenshot(path=artifacts / "ui-qat-tab.png", full_page=True)
    assert console.errors == []


def test_the_compare_tab_shows_both_sessions_and_selects_in_the_first(server, new_page, artifacts):
    page, console = new_page()
    open_tab(page, server.url, "Compare")
    depth = plot(page, "A vs B")
    expect(depth).to_be_visible(timeout=RENDER)
    assert depth.evaluate("el => el.data.map(t => t.name)") == ["A: output SQNR", "B: output SQNR"]
    compare_rows = page.locator(".tabulator-row", has_text="both")
    expect(compare_rows).to_have_count(len(LAYERS))
    compare_rows.filter(has_text="fc1").click()
    selected = "el => el.layout.shapes.filter(s => s.name === 'selected').map(s => s.x0)"
    wait_until(lambda: depth.evaluate(selected) == ["fc1"])  # the chart marks the row's layer
    page.screenshot(path=artifacts / "ui-compare-tab.png", full_page=True)
    page.locator(".bk-tab", has_text="QAT").click()  # the QAT view followed the selection
    expect(page.locator(".gtitle", has_text="fc1: activation_post_process_8")).to_be_visible()
    assert console.errors == []

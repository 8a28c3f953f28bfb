"""The Algorithms tab in headless chromium: Run algorithms on the selected layer (a layer with
planted outlier input channels) draws a bar per algorithm with its gain over RTN, and the
table of figures; nothing overlaps the chart. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re

import pytest

import qviz
from tests.analysis.test_algorithms import Planted, _batches
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytestmark = [*BROWSER_MARKS]


@pytest.fixture(scope="module")
def server(chromium_path):
    session = qviz.Session(Planted(), _batches(), flow="torchao", progress=False).run()
    running = serve_recording(lambda: session)
    yield running
    running.stop()


def test_run_algorithms_draws_the_gains_of_the_selected_layer(server, new_page, artifacts):
    page, console = new_page()
    page.goto(server.url)
    expect(page.locator(".tabulator-row").first).to_be_visible()
    page.locator(".bk-tab", has_text=re.compile(r"^Algorithms$")).click()
    page.get_by_role("button", name="Run algorithms").click()
    chart = page.locator(".js-plotly-plot").filter(has_text="Gain in layer output SQNR over RTN")
    expect(chart).to_be_visible(timeout=60_000)
    bars = chart.evaluate("el => el.data[0].x.map((x, i) => [x, el.data[0].y[i], el.data[0].text[i]])")
    expected = server.sessions[-1].algorithms(layers="proj").set_index("algorithm")
    assert [b[0] for b in bars] == ["smoothquant", "awq", "gptq", "hqq"]
    for name, gain, text in bars:
        assert gain == pytest.approx(expected.loc[name, "gain_vs_rtn_db"]) and text.endswith(" dB")
    table = page.locator(".tabulator").filter(has_text="gain vs RTN (dB)")
    expect(table.locator(".tabulator-row")).to_have_count(5)
    figure = chart.locator(".main-svg").first.bounding_box()
    for label in chart.locator(".textpoint text").all():  # the bar labels lie inside the figure
        box = label.bounding_box()
        assert figure["y"] <= box["y"] and box["y"] + box["height"] <= figure["y"] + figure["height"]
    assert table.bounding_box()["y"] >= figure["y"] + figure["height"]  # the table below the chart
    page.screenshot(path=artifacts / "ui-algorithms.png", full_page=True)
    assert console.errors == []

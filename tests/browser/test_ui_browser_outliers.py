"""The Outliers tab on the real MiniLM demo in headless chromium: the heat map shows every
linear layer's input channels, a click on a row selects that layer everywhere, a layer selected
elsewhere is outlined, and the colour bar lies inside the figure. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time

import pytest

from tests.browser.helpers import BROWSER_MARKS, expect, heat_map_in, open_heat_map_tab

pytestmark = [*BROWSER_MARKS, pytest.mark.slow]


@pytest.fixture
def server(minilm_server):
    return minilm_server


def heat_map(page):
    return heat_map_in(page, "Activation outliers")


def open_outliers(page, url):
    open_heat_map_tab(page, url, "Outliers", "Activation outliers")


def outlined_row(page) -> str | None:
    """The layer the heat map outlines and writes in bold (None when none)."""
    return heat_map(page).evaluate("""el => {
        const shape = (el.layout.shapes || []).find(s => s.name === 'selected');
        const bold = [...el.querySelectorAll(".yaxislayer-above text")].filter(t => t.innerHTML.includes('font-weight: bold')
            || t.querySelector('tspan[style*="bold"]'));
        if (!shape || bold.length !== 1) return null;
        const axis = el._fullLayout['yaxis' + shape.yref.slice(1)];
        const name = axis._categories[Math.round((shape.y0 + shape.y1) / 2)];
        return bold[0].textContent === name ? name : 'mismatch: ' + name + ' vs ' + bold[0].textContent;
    }""")


def row_centre(page, layer: str) -> tuple[float, float]:
    """Page coordinates of the middle of ``layer``'s row in the heat map (plotly's own axes)."""
    offset = heat_map(page).evaluate("""(el, layer) => {
        const full = el._fullLayout;
        for (const key of Object.keys(full).filter(k => /^yaxis\\d*$/.test(k))) {
            const y = full[key], i = y._categories.indexOf(layer);
            if (i < 0) continue;
            const x = full['xaxis' + key.slice(5)];
            return [x._offset + x._length / 3, y._offset + y.l2p(i)];
        }
        return null;
    }""", layer)
    assert offset is not None, f"{layer} has no row in the heat map"
    box = heat_map(page).locator(".main-svg").first.bounding_box()
    return box["x"] + offset[0], box["y"] + offset[1]


def test_outliers_tab_shows_the_heat_map_with_its_colour_bar_inside(server, new_page, artifacts):
    page, console = new_page()
    open_outliers(page, server.url)
    plot = heat_map(page)
    rows = plot.evaluate("el => el.data.map(t => [t.y.length, t.x.length])")
    assert rows == [[30, 384], [6, 1536]]  # q/k/v/attention.output/intermediate read 384, output.dense 1536
    figure = plot.locator(".main-svg").first.bounding_box()
    bar = plot.locator(".colorbar").bounding_box()
    assert figure["x"] <= bar["x"] and bar["x"] + bar["width"] <= figure["x"] + figure["width"]
    assert figure["y"] <= bar["y"] and bar["y"] + bar["height"] <= figure["y"] + figure["height"]
    labels = plot.locator(".yaxislayer-above text")
    expect(labels).to_have_count(36)
    for box in (labels.nth(i).bounding_box() for i in (0, 29, 35)):  # tick labels inside the figure too
        assert box["x"] >= figure["x"] and box["height"] <= 16
    expect(page.locator(".tabulator").filter(has_text="ratio to median").locator(".tabulator-row")).to_have_count(15)
    assert outlined_row(page) == "encoder.layer.0.attention.self.query"  # the first layer, selected at start
    page.screenshot(path=artifacts / "ui-outliers.png", full_page=True)
    assert console.errors == []


def test_clicking_a_heat_map_row_selects_that_layer_everywhere(server, new_page, artifacts):
    page, console = new_page()
    open_outliers(page, server.url)
    layer = "encoder.layer.3.output.dense"
    page.mouse.click(*row_centre(page, layer))
    _wait_for_outline(page, layer)
    page.screenshot(path=artifacts / "ui-outliers-clicked.png", full_page=True)
    page.locator(".bk-tab", has_text=re.compile(r"^Layers$")).click()
    expect(page.locator(".gtitle", has_text="output activation")).to_contain_text(f"{layer}:")
    assert console.errors == []


def test_a_layer_selected_in_the_table_is_outlined_in_the_heat_map(server, new_page):
    page, console = new_page()
    page.goto(server.url)
    layer = "encoder.layer.1.output.dense"
    page.locator(".tabulator-row", has_text=layer).click()
    expect(page.locator(".gtitle", has_text="output activation")).to_contain_text(f"{layer}:")
    page.locator(".bk-tab", has_text=re.compile(r"^Outliers$")).click()
    expect(heat_map(page)).to_be_visible()
    _wait_for_outline(page, layer)
    assert console.errors == []


def _wait_for_outline(page, layer: str, timeout: float = 30.0) -> None:
    """Until the heat map outlines ``layer`` (it redraws after the server hears of the selection)."""
    deadline = time.monotonic() + timeout
    while (seen := outlined_row(page)) != layer:
        assert time.monotonic() < deadline, f"the heat map outlines {seen!r}, not {layer!r}"
        time.sleep(0.1)

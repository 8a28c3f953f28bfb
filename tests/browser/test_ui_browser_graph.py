"""The Graph tab in headless chromium: clicking a node selects its layer everywhere, a layer
selected elsewhere is ringed in the graph, and the colour bar and legend lie inside the figure.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import pytest

from qviz import Session
from tests.analysis.test_graph import ResCatNet, _data
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording
from tests.browser.test_ui_browser import _css_class, row, wait_until

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def server(chromium_path):
    """ResCatNet's FX session (two residual blocks and a concatenation), fresh per browser tab."""
    running = serve_recording(lambda: Session(ResCatNet().eval(), _data(), progress=False).run())
    yield running
    running.stop()


def graph_plot(page):
    return page.locator(".js-plotly-plot").filter(has_text="Model graph")


def open_graph(page, url):
    page.goto(url)
    page.locator(".bk-tab", has_text="Graph").click()
    expect(graph_plot(page).locator("g.trace.scatter")).not_to_have_count(0)


def node_position(page, name: str) -> tuple[float, float]:
    """The page coordinates of node ``name`` (from the figure's own data and axes)."""
    plot = graph_plot(page)
    offset = plot.evaluate("""(el, name) => {
        for (const t of el.data) {
            const i = (t.customdata || []).indexOf(name);
            if (i < 0 || t.name === 'selected') continue;
            const xa = el._fullLayout.xaxis, ya = el._fullLayout.yaxis;
            return [xa._offset + xa.l2p(t.x[i]), ya._offset + ya.l2p(t.y[i])];
        }
        return null;
    }""", name)
    assert offset is not None, f"{name} is not in the graph"
    box = plot.locator(".main-svg").first.bounding_box()
    return box["x"] + offset[0], box["y"] + offset[1]


def ringed(page):
    return graph_plot(page).evaluate("el => (el.data.find(t => t.name === 'selected') || {}).customdata")


def inside(inner: dict, outer: dict) -> bool:
    return (outer["x"] <= inner["x"] and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
            and outer["y"] <= inner["y"] and inner["y"] + inner["height"] <= outer["y"] + outer["height"])


def overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


def test_clicking_a_node_selects_its_layer_everywhere(server, new_page, artifacts):
    page, console = new_page()
    open_graph(page, server.url)

    def clicked():
        page.mouse.click(*node_position(page, "branch_b"))
        return ringed(page) == ["branch_b"]

    wait_until(clicked, timeout=60)
    expect(row(page, "branch_b")).to_have_class(_css_class("tabulator-selected"))  # the Layers tab's table
    page.locator(".bk-input-group", has_text="group modules to depth").locator("select").select_option("2")
    wait_until(lambda: graph_plot(page).evaluate(
        "el => el.data.some(t => (t.customdata || []).includes('stage.1'))"))
    # the regrouped graph in full view: its own axis ranges, not those of the graph before
    wait_until(lambda: graph_plot(page).evaluate(
        "el => JSON.stringify(el._fullLayout.yaxis.range) === JSON.stringify([-7.6, 0.6])"), timeout=10)

    def group_clicked():
        page.mouse.click(*node_position(page, "stage.1"))  # a group: selects its worst layer
        return ringed(page) == ["stage.1"]

    wait_until(group_clicked, timeout=60)
    expect(page.locator(".tabulator-row.tabulator-selected").first).to_contain_text("stage.1.conv")
    page.screenshot(path=artifacts / "ui-graph-grouped.png", full_page=True)
    assert console.errors == []


def test_a_layer_selected_in_the_table_is_ringed_in_the_graph(server, new_page):
    page, console = new_page()
    page.goto(server.url)
    row(page, "stage.1.conv2").click()
    expect(row(page, "stage.1.conv2")).to_have_class(_css_class("tabulator-selected"))
    page.locator(".bk-tab", has_text="Graph").click()
    wait_until(lambda: ringed(page) == ["stage.1.conv2"])
    ring = graph_plot(page).locator("g.trace.scatter").last.locator("path.point").bounding_box()
    x, y = node_position(page, "stage.1.conv2")
    assert abs(ring["x"] + ring["width"] / 2 - x) < 2 and abs(ring["y"] + ring["height"] / 2 - y) < 2
    assert console.errors == []


@pytest.mark.parametrize("width", [1400, 900])
def test_the_colour_bar_and_legend_lie_inside_the_figure(server, new_page, artifacts, width):
    page, console = new_page(width=width)
    open_graph(page, server.url)
    plot = graph_plot(page)
    figure = plot.locator(".main-svg").first.bounding_box()
    bar, legend = plot.locator(".colorbar").bounding_box(), plot.locator(".legend").bounding_box()
    title = plot.locator(".gtitle").bounding_box()
    assert inside(bar, figure) and inside(legend, figure) and inside(title, figure)
    assert not overlap(legend, title) and not overlap(legend, bar) and not overlap(bar, title)
    expect(plot.locator(".legend")).to_contain_text("add")
    expect(plot.locator(".legend")).to_contain_text("cat")
    expect(plot.locator(".colorbar")).to_contain_text("output SQNR")
    for label in ("stem", "head", "(output)"):  # node names written inside the plot area
        text = plot.locator(".textpoint text", has_text=label).first.bounding_box()
        assert inside(text, figure)
    page.screenshot(path=artifacts / f"ui-graph-{width}.png", full_page=True)
    assert console.errors == []

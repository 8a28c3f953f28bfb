"""The analysis views in headless chromium, on live demo sessions served on 127.0.0.1: Apply of a
per-tensor change updates that layer's cells in the table, the sensitivity sweep runs from its
button while the app stays usable, and picking a Pareto point applies its plan. Screenshots go
to test-artifacts/."""

from __future__ import annotations

import math
import re
import threading
import time

import pytest

from qviz.cli import demo_session
from qviz.plan import Plan
from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytestmark = [*BROWSER_MARKS, pytest.mark.slow]

LAYERS = 6
PACE_S = 1.0  # each swept layer takes at least this long, so the test can act during the sweep


def paced_demo():
    """A live demo session whose sweep takes at least PACE_S per layer; ``sweep_done`` is set
    when it ends (the test's proof that it acted while the sweep ran)."""
    session = demo_session(progress=False)
    session.sweep_done = threading.Event()
    real = session.sensitivity

    def sensitivity(*, callback=None, **kwargs):
        def paced(done, total):
            time.sleep(PACE_S)
            if callback is not None:
                callback(done, total)

        try:
            return real(callback=paced, **kwargs)
        finally:
            session.sweep_done.set()

    session.sensitivity = sensitivity
    return session


@pytest.fixture(scope="module")
def server(chromium_path):
    """Live demo sessions, a fresh one per browser session (``server.sessions`` lists them)."""
    running = serve_recording(paced_demo)
    yield running
    running.stop()


def open_app(page, url):
    page.goto(url)
    expect(page.locator(".tabulator-row")).to_have_count(LAYERS)
    expect(page.locator(".js-plotly-plot")).to_have_count(3)


def row(page, layer):
    return page.locator(".tabulator-row", has_text=layer)


def cell(page, layer, field):
    return row(page, layer).locator(f'.tabulator-cell[tabulator-field="{field}"]')


def tab(page, name):
    page.locator(".bk-tab", has_text=re.compile(rf"^{name}$")).click()


def histogram_title(page):
    return page.locator(".gtitle", has_text="output activation")


def test_per_tensor_apply_changes_the_layers_numbers_in_the_table(server, new_page, artifacts):
    page, console = new_page()
    open_app(page, server.url)
    session = server.sessions[-1]
    layer = "block_conv2"
    before = {f: cell(page, layer, f).inner_text() for f in ("weight_qscheme", "weight_sqnr")}
    assert before["weight_qscheme"].startswith("per_channel")
    other = cell(page, "fc1", "weight_sqnr").inner_text()
    row(page, layer).click()
    expect(page.get_by_text(f"Configure {layer}")).to_be_visible()
    page.locator(".bk-btn", has_text="per_tensor").click()
    page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
    expect(page.get_by_text(f"applied {layer}: weight=per_tensor").first).to_be_visible()
    after = session.to_dataframe().loc[layer]
    assert after["weight_qscheme"].startswith("per_tensor")
    expect(cell(page, layer, "weight_qscheme")).to_have_text(after["weight_qscheme"])
    expect(cell(page, layer, "weight_sqnr")).to_have_text(f"{after['weight_sqnr']:.2f}")
    assert cell(page, layer, "weight_sqnr").inner_text() != before["weight_sqnr"]
    assert cell(page, "fc1", "weight_sqnr").inner_text() == other  # upstream of nothing: same
    # the layer's card and charts follow the table on the next tick
    expect(page.locator(".markdown", has_text=f"weight qint8 {after['weight_qscheme']}")).to_be_visible()
    expect(page.locator(".gtitle", has_text="weight scale")).to_contain_text("(per_tensor")
    page.screenshot(path=artifacts / "ui-per-tensor-applied.png", full_page=True)
    assert console.errors == []


def test_sensitivity_sweep_runs_from_its_button_and_the_app_stays_usable(
    server, new_page, artifacts
):
    page, console = new_page()
    open_app(page, server.url)
    session = server.sessions[-1]
    tab(page, "Sensitivity")
    expect(page.get_by_text("No sensitivity sweep yet")).to_be_visible()
    page.get_by_role("button", name="Run sensitivity sweep").click()
    expect(page.get_by_text(re.compile(r"layer \d of 6"))).to_be_visible()  # the progress line
    expect(page.locator(".bk-Progress, progress").first).to_be_visible()
    page.screenshot(path=artifacts / "ui-sweep-running.png", full_page=True)
    # while the sweep runs: another tab, a row click, the histogram follows
    tab(page, "Layers")
    row(page, "fc2").click()
    expect(histogram_title(page)).to_contain_text("fc2: output activation")
    assert not session.sweep_done.is_set(), "the sweep ended before the app was used: raise PACE_S"
    tab(page, "Sensitivity")
    chart = page.locator(".js-plotly-plot").filter(has_text="Sensitivity ranking")
    expect(chart).to_have_count(1, timeout=120_000)
    expect(page.get_by_text("measured 6 layers")).to_be_visible()
    expect(page.get_by_text("sensitivity sweep done").first).to_be_visible()
    frame = session.results.sensitivity
    ticks = chart.locator(".ytick text").evaluate_all(  # top to bottom on the screen
        "els => els.map(e => [e.getBoundingClientRect().top, e.textContent])"
        ".sort((a, b) => a[0] - b[0]).map(p => p[1])"
    )
    assert ticks == list(frame.sort_values("rank").index)  # ranked, most sensitive on top
    expect(chart.locator("g.trace.bars path")).to_have_count(2 * LAYERS)
    expect(page.get_by_text("sensitive", exact=True).first).to_be_visible()  # the diagnosis
    page.screenshot(path=artifacts / "ui-sweep-done.png", full_page=True)
    assert console.errors == []


def test_picking_a_pareto_point_applies_its_plan(server, new_page, artifacts):
    page, console = new_page()
    open_app(page, server.url)
    session = server.sessions[-1]
    start = session.plan
    tab(page, "Mixed precision")
    page.get_by_role("button", name="Search").click()
    plot = page.locator(".js-plotly-plot").filter(has_text="Size vs error of the plans tried")
    expect(plot).to_have_count(1, timeout=120_000)
    expect(page.get_by_text("search done").first).to_be_visible()
    point = plot.locator("g.trace.scatter").nth(1).locator("path.point").nth(2)  # on the front
    message = page.get_by_text(re.compile(r"applied search candidate \d+")).first

    def clicked():
        point.click(force=True)  # plotly's hit test needs the pointer over the marker
        try:
            expect(message).to_be_visible(timeout=3000)
        except AssertionError:
            return False
        return True

    deadline = time.monotonic() + 60
    while not clicked():
        assert time.monotonic() < deadline, "clicking the Pareto point applied nothing"
    step = int(re.search(r"candidate (\d+)", message.inner_text()).group(1))
    assert session.plan != start
    result = session.search(target_sqnr=30)  # the same candidates: the search starts from int4
    assert session.plan == Plan.from_json(result.candidates.set_index("step").loc[step, "plan"])
    sqnr = session.summary()["output_sqnr"]
    # the model figure (and the editor's before/after, which now lists the model's new SQNR too)
    expect(page.get_by_text(f"{sqnr:.2f} dB", exact=True).first).to_be_visible()
    tab(page, "Layers")
    frame = session.to_dataframe()
    for layer in frame.index:
        value = frame.loc[layer, "output_sqnr"]  # a float layer fed by float layers: inf dB
        expect(cell(page, layer, "output_sqnr")).to_have_text("Infinity" if value == math.inf else f"{value:.2f}")
    page.screenshot(path=artifacts / "ui-pareto-applied.png", full_page=True)
    assert console.errors == []

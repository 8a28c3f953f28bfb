"""The Groups tab on the real MiniLM demo in headless chromium: opening it draws the selected
layer's int4 weight-group heat map (output channel x group), a layer selected in the Layers table
or in the tab's own picker redraws it, a group size picked redraws the what-if, and the colour bar
and the title lie inside the figure. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time

import pytest

from tests.browser.helpers import (
    BROWSER_MARKS,
    expect,
    heat_map_in,
    open_heat_map_tab,
    serve_recording,
)

pytestmark = [*BROWSER_MARKS, pytest.mark.slow]

FIRST = "encoder.layer.0.attention.self.query"


@pytest.fixture
def server(minilm_server):
    return minilm_server


def heat_map(page):
    return heat_map_in(page, "int4 weight groups")


def open_groups(page, url):
    open_heat_map_tab(page, url, "Groups", "int4 weight groups")


def drawn(page) -> tuple[str, int, int]:
    """(title, groups, output channels) of the heat map in the page."""
    return tuple(heat_map(page).evaluate("el => [el.layout.title.text, el.data[0].z.length, el.data[0].z[0].length]"))


def wait_for(page, layer: str, groups: int, channels: int, timeout: float = 30.0) -> None:
    """Until the heat map shows ``layer`` with ``groups`` x ``channels`` cells (it redraws after the
    server hears of the selection)."""
    deadline = time.monotonic() + timeout
    while not ((seen := drawn(page))[0].startswith(f"{layer}: int4 weight groups") and seen[1:] == (groups, channels)):
        assert time.monotonic() < deadline, f"the heat map shows {seen!r}, not {layer!r} {groups}x{channels}"
        time.sleep(0.1)


def test_the_tab_draws_the_selected_layer_with_its_colour_bar_and_title_inside(server, new_page, artifacts):
    page, console = new_page()
    open_groups(page, server.url)
    wait_for(page, FIRST, 12, 384)  # 384 inputs in groups of 32, 384 output channels
    plot = heat_map(page)
    figure = plot.locator(".main-svg").first.bounding_box()
    for part in (plot.locator(".colorbar"), plot.locator(".gtitle")):
        box = part.bounding_box()
        assert figure["x"] <= box["x"] and box["x"] + box["width"] <= figure["x"] + figure["width"]
        assert figure["y"] <= box["y"] and box["y"] + box["height"] <= figure["y"] + figure["height"]
    expect(page.get_by_text(re.compile(r"384 output channels × 12 groups of 32 inputs \(what-if\): median SQNR"))).to_be_visible()
    sizes = page.locator("select").filter(has=page.locator("option", has_text="layer's own"))
    assert sizes.evaluate("e => e.selectedOptions[0].textContent") == "layer's own"
    page.screenshot(path=artifacts / "ui-groups.png", full_page=True)
    assert console.errors == []


def test_selecting_another_layer_in_the_table_redraws_it(server, new_page, artifacts):
    page, console = new_page()
    open_groups(page, server.url)
    wait_for(page, FIRST, 12, 384)
    page.locator(".bk-tab", has_text=re.compile(r"^Layers$")).click()
    layer = "encoder.layer.1.output.dense"  # 1536 inputs: 48 groups of 32
    page.locator(".tabulator-row", has_text=layer).click()
    expect(page.locator(".gtitle", has_text="output activation")).to_contain_text(f"{layer}:")
    page.locator(".bk-tab", has_text=re.compile(r"^Groups$")).click()
    wait_for(page, layer, 48, 384)
    page.screenshot(path=artifacts / "ui-groups-selected.png", full_page=True)
    page.locator("select").filter(has=page.locator("option", has_text="layer's own")).select_option("128")
    wait_for(page, layer, 12, 384)  # the what-if at 128: 1536 / 128 groups
    page.locator("select").filter(has=page.locator("option", has_text=FIRST)).select_option(
        "encoder.layer.5.intermediate.dense")
    wait_for(page, "encoder.layer.5.intermediate.dense", 3, 1536)  # 384 inputs / 128, 1536 outputs
    assert console.errors == []


@pytest.fixture(scope="module")
def torchao_server(chromium_path):
    """A small torchao int4 session (two Linear layers), one fresh session per browser session."""
    import torch
    from torch import nn

    import qviz

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
        data = [torch.randn(4, 256, generator=torch.Generator().manual_seed(1))]
        return qviz.Session(model, data, flow="torchao", scheme="int4_weight_only", progress=False).run()

    running = serve_recording(make)
    yield running
    running.stop()


def test_apply_on_a_torchao_session_reconverts_the_layer_at_the_picked_group_size(torchao_server, new_page, artifacts):
    page, console = new_page()
    open_groups(page, torchao_server.url)
    wait_for(page, "0", 8, 64)  # torchao's own: 256 inputs in groups of 32
    assert "torchao's own scales" in drawn(page)[0]
    apply = page.get_by_role("button", name="Apply to this layer")
    expect(apply).to_be_disabled()
    page.locator("select").filter(has=page.locator("option", has_text="layer's own")).select_option("128")
    wait_for(page, "0", 2, 64)
    assert "what-if" in drawn(page)[0]
    expect(apply).to_be_enabled()
    apply.click()
    expect(page.get_by_text("applied 0: group_size=128")).to_be_visible()
    deadline = time.monotonic() + 30
    while "torchao's own scales" not in drawn(page)[0]:  # re-converted: torchao's scales at 128 now
        assert time.monotonic() < deadline, drawn(page)
        time.sleep(0.1)
    session = torchao_server.sessions[-1]
    assert session.plan["0"].group_size == 128 and session.quantized_model()[0].weight.block_size == (1, 128)
    page.screenshot(path=artifacts / "ui-groups-applied.png", full_page=True)
    page.locator(".bk-tab", has_text=re.compile(r"^Layers$")).click()
    editor_size = page.locator("select").filter(has=page.locator("option", has_text="session's"))
    expect(editor_size).to_be_visible()
    assert editor_size.evaluate("e => e.selectedOptions[0].textContent") == "128"
    page.screenshot(path=artifacts / "ui-groups-editor.png", full_page=True)
    assert console.errors == []

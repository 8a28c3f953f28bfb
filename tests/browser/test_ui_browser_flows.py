"""The dashboard on the migration-target flows in headless chromium: a PT2E session of the demo
model and a torchao session of a transformer block load without console errors, show their
layers, and apply a layer change from the config editor. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re

import pytest

from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytest.importorskip("torchao")

import torch  # noqa: E402

import qviz  # noqa: E402
from qviz.demo import calibration_batches, eval_batches, load_demo_model  # noqa: E402
from qviz.models import transformer_block  # noqa: E402

pytestmark = BROWSER_MARKS


def _pt2e():
    return qviz.Session(load_demo_model(), calibration_batches(), flow="pt2e",
                        eval_data=eval_batches(n_batches=1), progress=False).run()


def _torchao():
    torch.manual_seed(0)
    tokens = [torch.randn(4, 16, 64) for _ in range(2)]
    return qviz.Session(transformer_block().eval(), tokens, flow="torchao", scheme="int8_weight_only",
                        progress=False).run()


# (session factory, the layer to set float, layers in the table)
FLOWS = {"pt2e": (_pt2e, "block_conv1", 6), "torchao": (_torchao, "fc1", 4)}


@pytest.fixture(scope="module", params=list(FLOWS))
def served(request, chromium_path):
    factory, layer, rows = FLOWS[request.param]
    server = serve_recording(factory)
    yield request.param, server, layer, rows
    server.stop()


def _cell(page, layer, field):
    row = page.locator(".tabulator-row").filter(
        has=page.locator('.tabulator-cell[tabulator-field="layer"]', has_text=re.compile(rf"^{layer}$")))
    return row, row.locator(f'.tabulator-cell[tabulator-field="{field}"]')


def test_flow_session_loads_and_applies_from_the_editor(served, new_page, artifacts):
    flow, server, layer, rows = served
    page, console = new_page()
    page.goto(server.url)
    expect(page.locator(".tabulator-row")).to_have_count(rows, timeout=60_000)
    expect(page.locator(".js-plotly-plot")).to_have_count(3)
    session = server.sessions[-1]
    row, dtype = _cell(page, layer, "dtype")
    assert dtype.inner_text() != "float"
    row.click()
    expect(page.get_by_text(f"Configure {layer}")).to_be_visible()
    page.locator(".bk-btn", has_text=re.compile(r"^float$")).click()
    page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
    expect(page.get_by_text(f"applied {layer}: dtype=float").first).to_be_visible(timeout=60_000)
    assert session.plan[layer].dtype == "float" and not session.to_dataframe().loc[layer, "quantized"]
    expect(dtype).to_have_text("float")
    page.screenshot(path=artifacts / f"ui-{flow}-applied.png", full_page=True)
    assert console.errors == []

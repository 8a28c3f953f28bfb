"""The config editor of a torchao session in headless chromium: every number format is a dtype
button that fits the editor's column, and applying mxfp4 re-converts the layer, whose row then
says it is simulated. Screenshot in test-artifacts/."""

from __future__ import annotations

import re

import pytest

from tests.browser.helpers import BROWSER_MARKS, expect, serve_recording

pytest.importorskip("torchao")

import torch  # noqa: E402

import qviz  # noqa: E402
from qviz.models import transformer_block  # noqa: E402
from qviz.options import FORMAT_DTYPES  # noqa: E402

pytestmark = BROWSER_MARKS


def _torchao():
    torch.manual_seed(0)
    tokens = [torch.randn(4, 16, 64) for _ in range(2)]
    return qviz.Session(transformer_block().eval(), tokens, flow="torchao", progress=False).run()


def test_editor_applies_a_number_format(chromium_path, new_page, artifacts):
    server = serve_recording(_torchao)
    try:
        page, console = new_page()
        page.goto(server.url)
        row = page.locator(".tabulator-row").filter(
            has=page.locator('.tabulator-cell[tabulator-field="layer"]', has_text=re.compile(r"^fc1$")))
        row.click()
        expect(page.get_by_text("Configure fc1")).to_be_visible()
        column_right = page.get_by_text("Selected layer", exact=True).bounding_box()["x"]
        dtypes = page.locator(".bk-btn-group").filter(has_text="mxfp4").first  # the editor's dtype buttons
        buttons = [dtypes.locator(".bk-btn", has_text=re.compile(rf"^{d}$")) for d in
                   ("int8", "int4", *FORMAT_DTYPES, "float")]
        boxes = [b.bounding_box() for b in buttons]
        assert all(box["x"] + box["width"] <= column_right for box in boxes), boxes  # none under the next column
        assert all(a["x"] + a["width"] <= b["x"] + 1 or a["y"] + a["height"] <= b["y"] + 1
                   for a, b in zip(boxes, boxes[1:], strict=False)), boxes  # none overlapping the next
        buttons[FORMAT_DTYPES.index("mxfp4") + 2].click()
        page.locator(".bk-btn", has_text=re.compile(r"^Apply$")).click()
        expect(page.get_by_text("applied fc1: dtype=mxfp4").first).to_be_visible(timeout=60_000)
        expect(row.locator('.tabulator-cell[tabulator-field="dtype"]')).to_have_text("mxfp4 (dynamic, simulated)")
        session = server.sessions[-1]
        assert session.plan["fc1"].dtype == "mxfp4" and bool(session.to_dataframe().loc["fc1", "simulated"])
        page.screenshot(path=artifacts / "ui-torchao-mxfp4.png", full_page=True)
        assert console.errors == []
    finally:
        server.stop()

"""Browserless checks of the figures and tables behind issue 17's screen fixes (the drawn pages
are measured in test_ui_browser_screens.py): the compare view's names and units, the QAT heat
map's columns, and the report's labelled guide lines."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("panel")

import qviz  # noqa: E402
from qviz.cli import demo_session  # noqa: E402
from qviz.report.html import _depth_section, _label_guides  # noqa: E402
from qviz.ui.compare_view import (  # noqa: E402
    format_bytes,
    session_name,
    summary_differences,
    summary_table,
)
from qviz.ui.figures import AMBER_DB, RED_DB, depth_figure  # noqa: E402
from qviz.ui.qat_view import heatmap_columns, heatmap_figure, layer_events  # noqa: E402
from tests.qat_session import qat_session  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def demo():
    return demo_session(progress=False)


def test_bytes_read_as_whole_bytes_then_kb_and_mb():
    assert [format_bytes(n) for n in (0, 999, 12_282, 2_500_000)] == ["0 B", "999 B", "12.3 kB", "2.5 MB"]
    assert format_bytes(80, "+") == "+80 B" and format_bytes(-1500, "+") == "-1.5 kB"
    assert format_bytes(math.nan) == "–"


def test_figures_table_shows_units_and_the_headers_size(demo):
    a = demo.summary()
    b = dict(a, top1_agreement=a["top1_agreement"] - 0.05, weight_bytes=a["weight_bytes"] + 80)
    table = summary_table(summary_differences(a, b))
    assert list(table.index) == [
        "output SQNR", "top-1 agreement with float", "weights at their dtypes' widths", "weights in float"
    ]  # the header's weight sizes, not a second (serialized) definition beside them
    assert table.loc["top-1 agreement with float"].tolist() == [
        f"{100 * a['top1_agreement']:.1f} %", f"{100 * b['top1_agreement']:.1f} %", "-5.0 pts"
    ]
    assert table.loc["weights at their dtypes' widths", "B - A"] == "+80 B"
    old = summary_table(summary_differences({"output_sqnr": 20.0, "size_bytes": 1234}, {}))
    assert old.loc["saved model (torch.save)"].tolist() == ["1.2 kB", "–", "–"]  # a file without them


def test_sessions_are_named_by_file_or_by_flow_and_plan(demo, tmp_path):
    demo.save(tmp_path / "ptq.qviz")
    assert session_name(qviz.load(tmp_path / "ptq.qviz")) == "ptq.qviz"
    assert session_name(demo) == "in memory, fx flow, x86 backend, plan 6 int8"
    changed = demo.plan.with_changes({"fc1": {"dtype": "int4"}})
    other = type("Other", (), {"results": demo.results, "plan": changed})()
    assert session_name(other) == "in memory, fx flow, x86 backend, plan 5 int8 + 1 int4"


def test_heat_map_columns_are_centred_on_their_steps_and_leave_the_gaps_empty():
    edges = heatmap_columns([0, 20, 40])
    np.testing.assert_allclose(edges, [-5, 5, 15, 25, 35, 45])  # never the blocks from -10 to 50
    np.testing.assert_allclose(heatmap_columns([7]), [6, 8])
    timeline = qat_session().results.timeline
    point = "activation_post_process_1"
    heat = heatmap_figure(timeline, point, layer_events(timeline)).data[0]
    hsteps = timeline.arrays["hist_steps"]
    z = np.asarray(heat.z, dtype=float)
    assert len(heat.x) == 2 * len(hsteps) and z.shape[1] == 2 * len(hsteps) - 1
    np.testing.assert_allclose((np.asarray(heat.x[0::2]) + heat.x[1::2]) / 2, hsteps)
    assert np.isnan(z[:, 1::2]).all() and np.isfinite(z[:, 0::2]).any()
    assert heat.hoverongaps is False and list(heat.text[0][::2]) == [str(s) for s in hsteps]


def test_report_guide_lines_are_labelled_and_drawn_over_the_grid(demo):
    fig = _label_guides(depth_figure(demo.to_dataframe()))
    guides = [s for s in fig.layout.shapes if s.name == "threshold"]
    assert sorted(s.y0 for s in guides) == [RED_DB, AMBER_DB]
    assert all(s.layer == "above" and s.line.width >= 2 and s.line.dash == "dash" for s in guides)
    labels = {a.y: a.text for a in fig.layout.annotations if a.name == "threshold"}
    assert labels == {RED_DB: f"{RED_DB:g} dB", AMBER_DB: f"{AMBER_DB:g} dB"}
    assert f"{AMBER_DB:g} dB" in _depth_section(demo.to_dataframe())

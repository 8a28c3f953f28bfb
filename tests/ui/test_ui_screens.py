"""Screen defects of issue 17, checked on the Panel/plotly models without a browser (the drawn
pages are measured in test_ui_browser_screens.py): the editor offers only what the flow and
backend run, each message shows in one place, one size figure, one observer vocabulary, int4
rows say int4, charts keep their legends and ranges sane, the compare view's names and units,
the QAT heat map's columns, and the report's labelled guide lines."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import qviz
from qviz.charts.layers import depth_figure, view_range, weight_scale_figure
from qviz.charts.layout import AMBER_DB, RED_DB
from qviz.charts.qat import heatmap_columns, heatmap_figure
from qviz.charts.sensitivity import sensitivity_figure
from qviz.report.html import _depth_section
from qviz.ui.app import build_dashboard
from qviz.ui.compare_view import format_bytes, summary_differences, summary_table
from qviz.ui.qat_view import layer_events
from qviz.ui.sensitivity_view import PAIRS
from qviz.ui.state import session_name
from tests.qat_session import qat_session

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def live(demo_sessions):
    return demo_sessions()


def test_editor_offers_only_dtypes_the_flow_and_backend_run(demo_sessions, live):
    dashboard = build_dashboard(live)
    assert dashboard.editor.widgets["dtype"].options == ["int8", "int4", "float"]  # no static fp16 on x86
    dynamic = build_dashboard(demo_sessions("dynamic"))
    assert dynamic.editor.widgets["dtype"].options == ["int8", "fp16", "float"]  # no int4 in dynamic
    for dtype in dashboard.editor.widgets["dtype"].options:  # and each offered one really applies
        assert live.choices("fc1", "dtype", [dtype]) == (dtype,)


def test_a_message_shows_in_exactly_one_place(live):
    dashboard = build_dashboard(live)
    state = dashboard.state
    state.notify("sensitivity sweep done", "success")  # the page's floating line, not under Apply
    assert dashboard.messages.__panel__().visible and not dashboard.editor.messages.__panel__().visible
    assert dashboard.messages.__panel__().styles["position"] == "fixed"  # it never pushes the page down
    assert dashboard.editor.apply() is False  # nothing changed: the answer is under Apply
    assert dashboard.editor.messages.__panel__().visible and not dashboard.messages.__panel__().visible


def test_before_after_is_hidden_until_a_change(live):
    editor = build_dashboard(live).editor
    assert not editor.compare_box.visible


def test_one_size_figure_and_one_observer_vocabulary(demo_sessions):
    s = demo_sessions()
    counts = s.param_counts()
    assert s.summary()["weight_bytes"] == sum(counts.values())  # int8: one byte a weight
    assert s.summary()["float_weight_bytes"] == 4 * sum(counts.values())
    assert set(s.to_dataframe().observer) == {"histogram"}
    s.apply({"fc1": {"dtype": "int4"}, "fc2": {"activation": "minmax"}})
    row = s.to_dataframe().loc["fc1"]
    assert s.summary()["weight_bytes"] == sum(counts.values()) - counts["fc1"] // 2  # int4: half a byte
    assert row["dtype"].startswith("int4") and row["weight_dtype"].startswith("int4")
    assert s.to_dataframe().loc["fc2", "observer"] == "minmax"
    assert s.to_dataframe().loc["block_conv1", "observer"] == "histogram"  # the word apply() writes too


def test_sensitivity_legend_sits_inside_the_figure(live):
    frame = live.sensitivity(progress=False).frame
    for variants in PAIRS.values():
        fig = sensitivity_figure(frame, variants)
        legend = fig.layout.legend
        assert legend.yref in (None, "paper") and legend.y >= 1 and legend.yanchor == "bottom"
        assert fig.layout.margin.t >= 70  # room for the title and the legend above the bars
        assert {t.name for t in fig.data} == {*(sensitivity_figure.__globals__["LABELS"][v] for v in variants)}


def test_per_tensor_weights_draw_each_channel_against_the_one_scale(demo_sessions):
    s = demo_sessions().apply({"fc2": {"weight": "per_tensor"}})
    record = s.record("fc2.weight")
    fig = weight_scale_figure(record, "fc2")
    bars, line = fig.data
    weight = s.float_model().get_submodule("fc2").weight.detach().abs().amax(1).double().numpy()
    np.testing.assert_allclose(bars.y, weight / 127, rtol=1e-6)
    assert line.y[0] == pytest.approx(float(record.arrays["scale"][0]))


def test_histogram_view_stays_near_the_data():
    assert view_range(0.0, 1.0, (-10.0, 10.0)) == pytest.approx([-0.05, 1.05])  # far range: data only
    lo, hi = view_range(0.0, 1.0, (-0.2, 1.1))
    assert lo < -0.2 and hi > 1.1  # a near range is shown whole


@pytest.fixture(scope="module")
def demo(demo_sessions):
    return demo_sessions()


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
    fig = depth_figure(demo.to_dataframe(), static=True)
    guides = [s for s in fig.layout.shapes if s.name == "threshold"]
    assert sorted(s.y0 for s in guides) == [RED_DB, AMBER_DB]
    assert all(s.layer == "above" and s.line.width >= 2 and s.line.dash == "dash" for s in guides)
    labels = {a.y: a.text for a in fig.layout.annotations if a.name == "threshold"}
    assert labels == {RED_DB: f"{RED_DB:g} dB", AMBER_DB: f"{AMBER_DB:g} dB"}
    assert f"{AMBER_DB:g} dB" in _depth_section(demo.to_dataframe())


def test_charts_import_neither_panel_nor_the_ui_nor_the_report():
    code = ("import pkgutil, importlib, sys, qviz.charts\n"
            "for m in pkgutil.iter_modules(qviz.charts.__path__): importlib.import_module('qviz.charts.' + m.name)\n"
            "bad = [m for m in sys.modules if m == 'panel' or m.startswith(('qviz.ui', 'qviz.report'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_sensitivity_figure_outlines_the_selected_layer_in_either_reading(live):
    frame = live.sensitivity(progress=False).frame
    layer = str(frame.sort_values("rank").index[1])
    for variants in (None, *PAIRS.values()):
        fig = sensitivity_figure(frame, variants, selected=layer)
        for bars in fig.data:
            assert list(bars.marker.line.width) == [3 if n == layer else 0 for n in bars.y]
        assert fig.layout.yaxis.autorange == "reversed" and fig.layout.title.text.startswith("Sensitivity ranking")

"""Screen defects of issue 17, checked on the Panel/plotly models without a browser: the editor
offers only what the flow and backend run, each message shows in one place, one size figure,
one observer vocabulary, int4 rows say int4, charts keep their legends and ranges sane."""

from __future__ import annotations

import numpy as np
import pytest

from qviz.demo import demo_session
from qviz.ui import figures
from qviz.ui.app import build_dashboard
from qviz.ui.sensitivity_view import PAIRS, sensitivity_figure

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def live():
    return demo_session(progress=False)


def test_editor_offers_only_dtypes_the_flow_and_backend_run(live):
    dashboard = build_dashboard(live)
    assert dashboard.editor.widgets["dtype"].options == ["int8", "int4", "float"]  # no static fp16 on x86
    dynamic = build_dashboard(demo_session("dynamic", progress=False))
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


def test_one_size_figure_and_one_observer_vocabulary():
    s = demo_session(progress=False)
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


def test_per_tensor_weights_draw_each_channel_against_the_one_scale():
    s = demo_session(progress=False).apply({"fc2": {"weight": "per_tensor"}})
    record = s.record("fc2.weight")
    fig = figures.weight_scale_figure(record, "fc2")
    bars, line = fig.data
    weight = s.float_model().get_submodule("fc2").weight.detach().abs().amax(1).double().numpy()
    np.testing.assert_allclose(bars.y, weight / 127, rtol=1e-6)
    assert line.y[0] == pytest.approx(float(record.arrays["scale"][0]))


def test_histogram_view_stays_near_the_data():
    assert figures.view_range(0.0, 1.0, (-10.0, 10.0)) == pytest.approx([-0.05, 1.05])  # far range: data only
    lo, hi = figures.view_range(0.0, 1.0, (-0.2, 1.1))
    assert lo < -0.2 and hi > 1.1  # a near range is shown whole

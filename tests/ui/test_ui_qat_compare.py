"""Browserless tests of the QAT and Compare views on a real short QAT run of the demo model (and
the demo's PTQ session): the Plotly figures and the models Panel sends hold the sessions' own
numbers, selection is linked, and sessions without a timeline or a second session say so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("panel")

import panel as pn  # noqa: E402
from bokeh.document import Document  # noqa: E402
from pyviz_comms import Comm  # noqa: E402

import qviz  # noqa: E402
from qviz.analysis.qat_detectors import diagnose  # noqa: E402
from qviz.capture.qat import timeline_histogram  # noqa: E402
from qviz.cli import build_parser, main  # noqa: E402
from qviz.demo import session_factory
from qviz.ui.app import Dashboard, build_app  # noqa: E402
from qviz.ui.compare_view import CompareView, layer_differences, summary_differences  # noqa: E402
from qviz.ui.markup import md  # noqa: E402
from qviz.ui.qat_view import HOW_TO_RECORD, QatView, layer_points  # noqa: E402
from qviz.ui.serve import app_for  # noqa: E402
from qviz.ui.state import DashboardState  # noqa: E402
from tests.qat_session import BN_FROZEN, HISTOGRAMS_EVERY, OBSERVERS_OFF, STEPS, qat_session  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LAYERS = ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]
CONVS = ["stem_conv", "block_conv1", "block_conv2", "down_conv"]


@pytest.fixture(scope="module")
def qat():
    return qat_session()


@pytest.fixture(scope="module")
def ptq(demo_sessions):
    return demo_sessions()


@pytest.fixture(scope="module")
def files(qat, ptq, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat_compare")
    qat.save(folder / "qat.qviz")
    ptq.save(folder / "ptq.qviz")
    return folder / "qat.qviz", folder / "ptq.qviz"


def _model(viewable):
    """The Bokeh model Panel would send for ``viewable``."""
    return pn.panel(viewable).get_root(Document(), comm=Comm())


def _traces(fig) -> dict:
    return {t.name: t for t in fig.data}


def _tab_names(dashboard) -> list[str]:
    return list(dashboard.sections()[-1]._names)


# -- QAT view ------------------------------------------------------------------------------------
def test_qparams_traces_equal_the_timeline_at_its_steps(qat):
    tl = qat.results.timeline
    view = QatView(state=DashboardState(qat))
    for layer in LAYERS:
        view.state.selected_layer = layer
        points = layer_points(tl, layer)
        assert [p["role"] for p in points] == ["output", "weight"]
        assert list(view.point_select.options.values()) == [p["name"] for p in points]
        assert view.point_select.value == points[0]["name"]  # the output activation first
        for p in points:
            view.point_select.value = p["name"]
            traces = _traces(view.qparams.object)
            for q in ("scale", "zero_point", "min", "max"):
                steps, values = tl.series(p["name"], q)
                label = q.replace("_", " ")
                assert steps.tolist() == list(range(0, STEPS, 2))
                if p["channels"] == 1:
                    line = traces[label]
                    assert list(line.x) == steps.tolist()
                    np.testing.assert_array_equal(line.y, values[:, 0].astype(np.float64))
                else:  # per channel: median line inside a min-max band
                    k = values.shape[1]
                    line = traces[f"{label} (median of {k} channels)"]
                    assert list(line.x) == steps.tolist()
                    v = values.astype(np.float64)
                    np.testing.assert_allclose(line.y, np.median(v, axis=1))
                    np.testing.assert_allclose(traces[f"{label}: channel min"].y, v.min(axis=1))
                    np.testing.assert_allclose(traces[f"{label}: channel max"].y, v.max(axis=1))
                    assert traces[f"{label}: channel max"].fill == "tonexty"
    assert view.state.message == ""


def test_the_plotly_model_holds_the_timeline_numbers_and_follows_the_selection(qat):
    tl = qat.results.timeline
    state = DashboardState(qat)
    view = QatView(state=state)
    model = _model(view.qparams)
    state.selected_layer = "fc1"  # output point first: per-tensor scale
    assert model.layout["title"]["text"].startswith("fc1: activation_post_process_")
    names = [d["name"] for d in model.data]
    i = names.index("scale")
    _, scale = tl.series(view.point_select.value, "scale")
    np.testing.assert_array_equal(
        model.data_sources[i].data["y"][0], scale[:, 0].astype(np.float64)
    )
    view.point_select.value = "fc1.weight_fake_quant"
    assert model.layout["title"]["text"].startswith("fc1: fc1.weight_fake_quant")
    names = [d["name"] for d in model.data]
    assert "scale (median of 64 channels)" in names


def test_events_are_marked_at_their_steps(qat):
    state = DashboardState(qat)
    view = QatView(state=state)
    for layer in LAYERS:
        state.selected_layer = layer
        fig = view.qparams.object
        marks = sorted(s.x0 for s in fig.layout.shapes if s.name == "event")
        labels = {a.x: a.text for a in fig.layout.annotations if a.name == "event"}
        # observers disabled at 12 everywhere; BN frozen at 16 where the layer has a BN
        want = [OBSERVERS_OFF, BN_FROZEN] if layer in CONVS else [OBSERVERS_OFF]
        assert marks == want
        assert labels[OBSERVERS_OFF] == "observer disabled"
        if layer in CONVS:
            assert labels[BN_FROZEN] == "bn frozen"
        heat_marks = sorted(s.x0 for s in view.heatmap.object.layout.shapes if s.name == "event")
        assert heat_marks == want
    events = qat.results.timeline.events_frame()
    assert set(events.step) == {OBSERVERS_OFF, BN_FROZEN}


def test_heatmap_holds_the_histograms_over_steps(qat):
    tl = qat.results.timeline
    state = DashboardState(qat)
    view = QatView(state=state)
    for layer in ("stem_conv", "fc2"):
        state.selected_layer = layer
        point = view.point_select.value
        traces = _traces(view.heatmap.object)
        heat = traces["histogram"]
        hsteps = list(range(0, STEPS, HISTOGRAMS_EVERY))
        edges = np.asarray(heat.x)  # a column centred on each step, an empty one between
        np.testing.assert_allclose((edges[0::2] + edges[1::2]) / 2, hsteps)
        shares = np.asarray(heat.customdata, dtype=np.float64)[:, 0::2]  # bins x steps
        z = np.asarray(heat.z, dtype=np.float64)[:, 0::2]
        np.testing.assert_allclose(np.nansum(10**z, axis=0), 1.0)
        np.testing.assert_allclose(np.nan_to_num(10**z), shares, rtol=1e-12)
        centers = np.asarray(heat.y)
        width = centers[1] - centers[0]
        hists = [timeline_histogram(tl, point, s) for s in hsteps]
        assert centers[0] - width / 2 == pytest.approx(min(h.min for h in hists))
        assert centers[-1] + width / 2 == pytest.approx(max(h.max for h in hists))
        for j, h in enumerate(hists):  # same mass, same mean as the point's own histogram
            edges = h.edges
            mean = np.sum(h.counts * (edges[:-1] + edges[1:]) / 2) / h.total
            assert np.sum(shares[:, j] * centers) == pytest.approx(mean, abs=width / 2)
        # the representable range (per-tensor point) over the snapshot steps
        steps, scale = tl.series(point, "scale")
        _, zp = tl.series(point, "zero_point")
        info = tl.points_frame().loc[point]
        low = (info["quant_min"] - zp[:, 0].astype(np.float64)) * scale[:, 0].astype(np.float64)
        np.testing.assert_allclose(traces["range low"].y, low)
        assert list(traces["range low"].x) == steps.tolist()


def test_logged_scalars_and_findings(qat):
    tl = qat.results.timeline
    state = DashboardState(qat)
    view = QatView(state=state)
    traces = _traces(view.scalars.object)
    scalars = tl.scalars()
    assert set(traces) == {"loss", "kd_loss"}
    for name in ("loss", "kd_loss"):
        assert list(traces[name].x) == list(range(STEPS))
        np.testing.assert_array_equal(traces[name].y, scalars[name].to_numpy())
    found = diagnose(tl)
    pd.testing.assert_frame_equal(
        view.findings.value, found[list(view.findings.value.columns)].reset_index(drop=True)
    )
    assert len(found) > 0  # observers disabled while ranges still moved
    mine = found.index[found.layer.isin(LAYERS)]
    row = int(np.flatnonzero(view.findings.value.layer == found.layer[mine[0]])[0])
    view.findings.selection = [row]
    assert state.selected_layer == found.layer[mine[0]]
    assert f"**{md(state.selected_layer)}** over {STEPS} training steps" in view.header.object


def test_dashboard_links_the_qat_view_with_the_others(qat):
    dashboard = Dashboard(qat)
    assert "QAT" in _tab_names(dashboard) and "Compare" not in _tab_names(dashboard)
    assert _model(dashboard) is not None
    dashboard.table.widget.selection = [4]  # the layer table selects fc1
    assert dashboard.qat.point_select.value == "activation_post_process_8"
    assert dashboard.qat.qparams.object.layout.title.text.startswith("fc1:")
    assert dashboard.state.message == ""


def test_a_session_loaded_from_a_file_draws_the_same_timeline(qat, files):
    loaded = qviz.load(files[0])
    a, b = QatView(state=DashboardState(qat)), QatView(state=DashboardState(loaded))
    for view in (a, b):
        view.state.selected_layer = "block_conv2"
        view.point_select.value = "block_conv2.weight_fake_quant"
    for pane in ("qparams", "heatmap", "scalars"):
        fa, fb = getattr(a, pane).object, getattr(b, pane).object
        assert [t.name for t in fa.data] == [t.name for t in fb.data]
        for ta, tb in zip(fa.data, fb.data, strict=True):
            np.testing.assert_array_equal(
                np.asarray(ta.y, dtype=float), np.asarray(tb.y, dtype=float)
            )
    pd.testing.assert_frame_equal(a.findings.value, b.findings.value)


def test_without_a_timeline_the_tab_says_how_to_record_one(ptq, files):
    for session in (ptq, qviz.load(files[1])):
        dashboard = Dashboard(session)
        view = dashboard.qat
        assert view.timeline is None and list(view.__panel__().objects) == [view.empty]
        assert "qviz.watch(" in view.empty.object and "Session.from_qat" in view.empty.object
        assert view.empty.object == HOW_TO_RECORD
        dashboard.state.selected_layer = "fc2"  # nothing breaks
        assert _model(dashboard) is not None and dashboard.state.message == ""


# -- Compare view --------------------------------------------------------------------------------
def test_layer_differences_are_b_minus_a(ptq, qat):
    a, b = ptq.to_dataframe(), qat.to_dataframe()
    diff = layer_differences(a, b)
    assert list(diff.index) == LAYERS and (diff["in"] == "both").all()
    for c in ("output_sqnr", "local_sqnr", "weight_sqnr"):
        np.testing.assert_array_equal(diff[f"{c}_a"], a[c].to_numpy(dtype=float))
        np.testing.assert_array_equal(diff[f"{c}_b"], b.loc[LAYERS, c].to_numpy(dtype=float))
        np.testing.assert_allclose(diff[f"{c}_diff"], b.loc[LAYERS, c] - a.loc[LAYERS, c])
    assert diff["dtype_a"].tolist() == a["dtype"].tolist()


def test_layers_only_in_one_session_are_listed():
    a = pd.DataFrame(
        {
            "depth": [0, 1, 2],
            "dtype": "quint8",
            "output_sqnr": [30.0, 25.0, 20.0],
            "local_sqnr": [31.0, 28.0, 22.0],
            "weight_sqnr": [40.0, 41.0, 42.0],
        },
        index=pd.Index(["c1", "c2", "fc"], name="layer"),
    )
    b = a.drop(index="c2").rename(index={"fc": "fc"})
    b.loc["head"] = {
        "depth": 3,
        "dtype": "quint8",
        "output_sqnr": 18.0,
        "local_sqnr": 19.0,
        "weight_sqnr": 39.0,
    }
    b.loc["c1", "output_sqnr"] = 33.0
    diff = layer_differences(a, b)
    assert list(diff.index) == ["c1", "c2", "fc", "head"]
    assert diff["in"].tolist() == ["both", "A only", "both", "B only"]
    assert diff.loc["c1", "output_sqnr_diff"] == pytest.approx(3.0)
    assert np.isnan(diff.loc["c2", "output_sqnr_diff"]) and np.isnan(
        diff.loc["head", "output_sqnr_a"]
    )
    assert diff.loc["head", "output_sqnr_b"] == 18.0
    summary = summary_differences({"output_sqnr": 20.0, "size_bytes": 100}, {"output_sqnr": 18.0})
    assert summary.loc["output_sqnr"].tolist() == [20.0, 18.0, -2.0]
    assert np.isnan(summary.loc["size_bytes", "B"])


class _Other:
    """A second session as the compare view sees it: a frame and a summary."""

    def __init__(self, frame, summary):
        self.frame, self.figures = frame, summary

    def to_dataframe(self):
        return self.frame.copy()

    def summary(self):
        return dict(self.figures)


def test_compare_view_holds_both_sessions_numbers(ptq, qat):
    state = DashboardState(ptq)
    view = CompareView(state=state, other=qat)
    a, b = ptq.to_dataframe(), qat.to_dataframe()
    pd.testing.assert_frame_equal(view.differences, layer_differences(a, b))
    sa, sb = ptq.summary(), qat.summary()
    figures = view.figures.value  # each figure in its unit, as the header shows it
    assert figures.loc["output SQNR"].tolist() == [
        f"{sa['output_sqnr']:.2f} dB",
        f"{sb['output_sqnr']:.2f} dB",
        f"{sb['output_sqnr'] - sa['output_sqnr']:+.2f} dB",
    ]
    assert figures.loc["top-1 agreement with float", "A"] == f"{100 * sa['top1_agreement']:.1f} %"
    assert figures.loc["weights at their dtypes' widths", "B"] == f"{sb['weight_bytes'] / 1000:.1f} kB"
    fig = view.depth.object
    assert [t.name for t in fig.data] == ["A: output SQNR", "B: output SQNR"]
    for trace, frame in zip(fig.data, (a, b), strict=True):
        assert list(trace.x) == LAYERS
        np.testing.assert_allclose(
            np.asarray(trace.y, dtype=float), frame.loc[LAYERS, "output_sqnr"]
        )
    model = _model(view.depth)
    assert [d["name"] for d in model.data] == ["A: output SQNR", "B: output SQNR"]
    assert [s["x0"] for s in model.layout["shapes"] if s.get("name") == "selected"] == ["stem_conv"]
    assert view.only.object == "Both sessions have the same layers."
    assert _model(view) is not None


def test_compare_selection_selects_in_the_primary_session(ptq, qat):
    dashboard = Dashboard(ptq, compare_with=qat)
    view, state = dashboard.compare, dashboard.state
    assert "Compare" in _tab_names(dashboard)
    model = _model(view.depth)
    view.table.selection = [3]
    assert state.selected_layer == "down_conv"
    assert dashboard.table.widget.selection == [3]  # the layer table follows
    assert [s["x0"] for s in model.layout["shapes"] if s.get("name") == "selected"] == ["down_conv"]
    view.depth.click_data = {"points": [{"curveNumber": 1, "pointIndex": 5, "x": "fc2", "y": 33.0}]}
    assert state.selected_layer == "fc2" and view.table.selection == [5]
    dashboard.table.widget.selection = [1]  # and it follows the layer table
    assert view.table.selection == [1]
    assert dashboard.qat.timeline is None  # A is the PTQ session here


def test_compare_lists_layers_only_in_b_and_does_not_select_them(ptq):
    frame = ptq.to_dataframe().drop(index="fc1")
    frame.loc["extra"] = frame.loc["fc2"]
    frame.loc["extra", "depth"] = 99
    state = DashboardState(ptq)
    view = CompareView(state=state, other=_Other(frame, ptq.summary()))
    assert view.only.object == "Layers only in A: fc1; only in B: extra"
    assert view.differences.loc["extra", "in"] == "B only"
    view.table.selection = [list(view.differences.index).index("extra")]
    assert state.selected_layer == "stem_conv" and "only in the compared session" in state.message


def test_no_second_session_no_compare_tab(ptq):
    assert "Compare" not in _tab_names(Dashboard(ptq))
    assert Dashboard(ptq).compare is None


# -- entry points --------------------------------------------------------------------------------
def test_app_for_gives_each_browser_session_its_own_dashboard_over_one_loaded_file(files):
    qat_file, ptq_file = files
    factory, compare = session_factory(qat_file), session_factory(ptq_file)
    one, two = (app_for(factory, compare).dashboard for _ in range(2))
    assert one.state is not two.state and one.compare is not None and one.compare is not two.compare
    assert one.state._session is two.state._session and one.compare.other is two.compare.other  # loaded once
    one.state.selected_layer = "fc1"
    assert two.state.selected_layer != "fc1"  # what one visitor selects is theirs
    assert "Compare" in _tab_names(one) and one.qat.timeline is not None
    assert build_app(qviz.load(qat_file)).dashboard.compare is None


def test_cli_serve_compare(files, monkeypatch, capsys, tmp_path):
    import qviz.ui.serve

    qat_file, ptq_file = files
    args = build_parser().parse_args(["serve", str(qat_file), "--compare", str(ptq_file)])
    assert args.compare == str(ptq_file)
    calls = []
    monkeypatch.setattr(qviz.ui.serve, "serve", lambda factory, **kw: calls.append((factory, kw)))
    assert (
        main(["serve", str(qat_file), "--compare", str(ptq_file), "--no-show", "--port", "0"]) == 0
    )
    ((factory, kw),) = calls
    assert "compared with" in capsys.readouterr().out
    a, b = kw["compare"](), kw["compare"]()
    assert a is b and a.results.timeline is None  # the second file, loaded once for every visitor
    assert factory().results.timeline is not None
    assert (
        main(["serve", str(qat_file), "--compare", str(tmp_path / "missing.qviz"), "--no-show"])
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_show_compare_with_outside_a_notebook_serves_both(ptq, qat, monkeypatch):
    import qviz.ui.serve

    calls = []
    monkeypatch.setattr(qviz.ui.serve, "serve", lambda factory, **kw: calls.append((factory, kw)))
    ptq.show(compare_with=qat)
    ((factory, kw),) = calls
    assert factory() is ptq and kw["compare"]() is qat

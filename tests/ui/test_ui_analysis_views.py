"""Browserless tests of the sensitivity and mixed-precision views: their figures and the Plotly
models Panel sends equal the session's numbers, clicks select layers and apply plans, the buttons
run their task on a worker thread (the state stays usable meanwhile) and errors become messages."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("panel")

import panel as pn  # noqa: E402
from bokeh.document import Document  # noqa: E402
from pyviz_comms import Comm  # noqa: E402

import qviz  # noqa: E402
from qviz.errors import ConfigError  # noqa: E402
from qviz.plan import Plan  # noqa: E402
from qviz.ui.app import build_app, build_dashboard  # noqa: E402
from qviz.ui.pareto_view import ParetoView  # noqa: E402
from qviz.ui.sensitivity_view import PAIRS, SensitivityView  # noqa: E402
from qviz.ui.state import DashboardState  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

TIMEOUT = 120


@pytest.fixture(scope="module")
def session(demo_sessions):
    """One live demo session; each test leaves it on its starting plan."""
    return demo_sessions()


@pytest.fixture(scope="module")
def swept(session):
    """The demo's sensitivity frame (measured once)."""
    return session.sensitivity(progress=False).to_dataframe()


@pytest.fixture
def live(session, swept):
    """The live session with no sweep stored and its starting plan in force (restored after)."""
    start = session.plan
    session.results.sensitivity = None
    yield session
    session.apply(start)


@pytest.fixture
def loaded(session, swept, tmp_path):
    """A session loaded from a file saved with the sweep: results only, no model."""
    session.results.sensitivity = swept
    path = tmp_path / "swept.qviz"
    session.save(path)
    return qviz.load(path)


def _model(viewable):
    return pn.panel(viewable).get_root(Document(), comm=Comm())


def _join(thread):
    assert thread is not None
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def _gated(monkeypatch, session, name):
    """Make ``session.<name>`` wait for the returned event before running (a slow task)."""
    started, gate, real = threading.Event(), threading.Event(), getattr(session, name)

    def slow(**kwargs):
        started.set()
        assert gate.wait(TIMEOUT)
        return real(**kwargs)

    monkeypatch.setattr(session, name, slow)
    return started, gate


def _values(widget, name="value"):
    seen = []
    widget.param.watch(lambda e: seen.append(e.new), name)
    return seen


# -- the analysis callbacks ------------------------------------------------------------------------
def test_sensitivity_and_search_report_progress(live):
    calls = []
    live.sensitivity(progress=False, callback=lambda done, total: calls.append((done, total)))
    n = len(live.to_dataframe())
    assert calls == [(i, n) for i in range(1, n + 1)]
    calls.clear()
    result = live.search(target_sqnr=30, callback=lambda tried, most: calls.append((tried, most)))
    assert [c[0] for c in calls[:-1]] == list(range(1, len(result.candidates) + 1))
    # ``most`` bounds the conversions (probes, pairs, verifications); the last call says done
    assert len({c[1] for c in calls[:-1]}) == 1 and all(t <= most for t, most in calls)
    assert calls[-1][0] == calls[-1][1] == len(result.candidates)


# -- sensitivity -----------------------------------------------------------------------------------
def test_sensitivity_chart_equals_the_sweep(session, swept, live):
    live.results.sensitivity = swept
    state = DashboardState(live)
    view = SensitivityView(state=state)
    ranked = swept.sort_values("rank")
    for pair, variants in PAIRS.items():
        view.pair.value = pair
        fig = view.pane.object
        assert len(fig.data) == 2
        for trace, column in zip(fig.data, variants, strict=True):
            assert trace.orientation == "h"
            assert list(trace.y) == list(ranked.index) == list(trace.customdata)
            np.testing.assert_allclose(np.array(trace.x, dtype=float), ranked[column].to_numpy())
        (line,) = [s for s in fig.layout.shapes if s.name == "all quantized"]
        assert line.x0 == pytest.approx(live.summary()["output_sqnr"])
    model = _model(view.pane)
    assert model.data[0]["y"] == list(ranked.index)
    assert model.layout["yaxis"]["autorange"] == "reversed"  # rank 1 on top


def test_clicking_a_bar_or_a_finding_selects_the_layer(swept, live):
    live.results.sensitivity = swept
    dashboard = build_dashboard(live)
    state, view = dashboard.state, dashboard.sensitivity
    model = _model(view.pane)
    view.pane.click_data = {
        "points": [
            {"curveNumber": 1, "pointIndex": 2, "y": "block_conv2", "customdata": "block_conv2"}
        ]
    }
    assert state.selected_layer == "block_conv2"
    assert dashboard.table.widget.value.index[dashboard.table.widget.selection[0]] == "block_conv2"
    ranked = list(swept.sort_values("rank").index)
    widths = [3 if n == "block_conv2" else 0 for n in ranked]
    assert list(view.pane.object.data[0].marker.line.width) == widths
    assert list(model.data[0]["marker"]["line"]["width"]) == widths
    findings = view.diagnosis.value
    assert view.findings_box.objects == [view.findings, view.diagnosis]
    assert len(findings) and list(findings.columns) == [
        "severity",
        "layer",
        "cause",
        "evidence",
        "fix",
    ]
    pd.testing.assert_frame_equal(
        findings, live.diagnose()[findings.columns].reset_index(drop=True)
    )
    row = int(np.flatnonzero(findings["layer"] != "block_conv2")[0])
    view.diagnosis.selection = [row]  # what a click on that row does
    assert state.selected_layer == findings["layer"].iloc[row]


def test_sweep_button_runs_in_the_background_and_fills_the_chart(live, monkeypatch):
    dashboard = build_dashboard(live)
    state, view = dashboard.state, dashboard.sensitivity
    assert "No sensitivity sweep yet" in view.placeholder.object
    assert view.chart.objects == [view.placeholder]  # no plot on the page before a sweep
    assert not view.button.disabled and not view.note.visible
    started, gate = _gated(monkeypatch, live, "sensitivity")
    bar = _values(view.progress.bar)
    view.button.clicks += 1  # what pressing the button does
    thread = view.thread
    assert started.wait(TIMEOUT) and thread.is_alive()
    # the sweep is running: the app stays usable, plans wait, a second task is refused
    assert state.task == "sensitivity sweep" and view.button.disabled and view.progress.bar.visible
    assert dashboard.pareto.button.disabled
    state.selected_layer = "fc1"
    assert dashboard.layer.histogram.object.layout.title.text.startswith("fc1:")
    assert (
        not state.apply({"fc1": {"dtype": "int4"}})
        and "wait for the sensitivity sweep" in state.message
    )
    assert view.run() is None
    gate.set()
    _join(thread)
    frame = live.results.sensitivity
    assert frame is not None and state.task == ""
    n = len(frame)
    assert bar[-n:] == list(range(1, n + 1)) and view.progress.bar.max == n
    assert not view.progress.bar.visible and f"measured {n} layers" in view.progress.status.object
    assert state.message_kind == "success" and frame.index[0] in state.message
    assert view.chart.objects == [view.pane]
    fig = view.pane.object
    np.testing.assert_allclose(
        np.array(fig.data[0].x, dtype=float), frame.sort_values("rank")["quantize_only"]
    )
    assert len(view.diagnosis.value) == len(live.diagnose())
    assert not view.button.disabled and live.plan["fc1"].dtype == "int8"


def test_a_failing_sweep_becomes_a_message_and_the_app_keeps_working(live, monkeypatch):
    state = DashboardState(live)
    view = SensitivityView(state=state)
    real = live.sensitivity

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(live, "sensitivity", broken)
    _join(view.run())
    assert state.message_kind == "danger" and "out of memory" in state.message
    assert state.task == "" and not view.button.disabled and not view.progress.bar.visible
    assert "stopped" in view.progress.status.object
    assert "No sensitivity sweep yet" in view.placeholder.object and view.chart.objects == [
        view.placeholder
    ]
    monkeypatch.setattr(live, "sensitivity", real)
    _join(view.run())  # still works
    assert state.message_kind == "success" and len(view.pane.object.data) == 2


def test_loaded_session_shows_its_stored_sweep_and_cannot_run_one(loaded, swept):
    dashboard = build_dashboard(loaded)
    state, view = dashboard.state, dashboard.sensitivity
    assert not state.can_sweep
    assert (
        view.button.disabled
        and view.note.visible
        and "loaded from a file" in view.button.description
    )
    np.testing.assert_allclose(
        np.array(view.pane.object.data[0].x, dtype=float),
        swept.sort_values("rank")["quantize_only"],
    )
    assert len(view.diagnosis.value) == len(loaded.diagnose()) > 0
    assert view.run() is None and state.message_kind == "warning"


def test_loaded_session_without_a_sweep_says_so(session, tmp_path):
    session.results.sensitivity = None
    session.save(tmp_path / "plain.qviz")
    view = SensitivityView(state=DashboardState(qviz.load(tmp_path / "plain.qviz")))
    assert "none was saved" in view.placeholder.object and view.chart.objects == [view.placeholder]
    assert view.findings_box.objects == [view.findings]  # no findings: no table on the page
    assert "No findings" in view.findings.object


# -- mixed precision -------------------------------------------------------------------------------
def _search(dashboard, target=30.0):
    view = dashboard.pareto
    view.target = target
    view.button.clicks += 1
    _join(view.thread)
    return view


def test_search_fills_the_pareto_plot_with_the_candidates(live):
    dashboard = build_dashboard(live)
    state = dashboard.state
    start, version = live.plan, state.version
    view = dashboard.pareto
    assert "No search yet" in view.placeholder.object and view.chart.objects == [view.placeholder]
    bar = _values(view.progress.bar)
    _search(dashboard, 30.0)
    result = view.result
    assert view.chart.objects == [view.pane]
    candidates, front = result.candidates, result.pareto()
    assert state.task == "" and state.message_kind == "success" and state.version > version
    assert live.plan == start  # the search leaves the plan in force alone
    assert bar[-len(candidates) :] == list(range(1, len(candidates) + 1))
    fig = view.pane.object
    traces = {t.name: t for t in fig.data}
    assert list(traces) == ["candidates", "Pareto front", "plan found", "plan in force"]
    for name, rows in (("candidates", candidates), ("Pareto front", front)):
        assert list(traces[name].x) == rows["weight_bytes"].tolist()
        np.testing.assert_allclose(np.array(traces[name].y, dtype=float), rows["output_sqnr"])
        assert list(traces[name].customdata) == rows["step"].tolist()
    found = candidates[candidates["meets_target"]].iloc[0]
    assert list(traces["plan found"].customdata) == [found.step]
    assert Plan.from_json(found.plan) == result.plan
    (target,) = [s for s in fig.layout.shapes if s.name == "target"]
    assert target.y0 == 30.0
    model = _model(view.pane)
    assert model.data[0]["customdata"] == candidates["step"].tolist()


def test_clicking_a_point_applies_its_plan_and_undo_restores(live):
    dashboard = build_dashboard(live)
    state = dashboard.state
    view = _search(dashboard, 30.0)
    start = live.plan
    candidates = view.result.candidates
    step = int(candidates["step"].iloc[2])
    wanted = Plan.from_json(candidates.set_index("step").loc[step, "plan"])
    version = state.version
    view.pane.click_data = {"points": [{"curveNumber": 0, "pointIndex": step, "customdata": step}]}
    assert live.plan == wanted and state.version == version + 1
    assert state.message_kind == "success" and f"applied search candidate {step}" in state.message
    pd.testing.assert_frame_equal(dashboard.table.widget.value, live.to_dataframe())
    assert dashboard.summary.sqnr.value == pytest.approx(
        candidates.set_index("step").loc[step, "output_sqnr"]
    )
    traces = {t.name: t for t in view.pane.object.data}
    assert list(traces["plan in force"].customdata) == [step]
    assert dashboard.editor.code_text == live.plan.to_code(flow="fx")
    assert state.undo() and live.plan == start
    assert list({t.name: t for t in view.pane.object.data}["plan in force"].customdata) != [step]


def test_search_errors_become_messages(live, monkeypatch):
    dashboard = build_dashboard(live)
    state, view = dashboard.state, dashboard.pareto

    def broken(**kwargs):
        raise ConfigError("give a reachable target")

    monkeypatch.setattr(live, "search", broken)
    _search(dashboard)
    assert state.message_kind == "danger" and state.message == "give a reachable target"
    assert (
        state.task == "" and not view.button.disabled and "stopped" in view.progress.status.object
    )
    assert view.result is None and view.chart.objects == [view.placeholder]


def test_picking_waits_while_a_task_runs(live, monkeypatch):
    dashboard = build_dashboard(live)
    state = dashboard.state
    view = _search(dashboard)
    start = live.plan
    started, gate = _gated(monkeypatch, live, "sensitivity")
    thread = dashboard.sensitivity.run()
    assert started.wait(TIMEOUT)
    assert not view.pick(0) and live.plan == start and "wait for the" in state.message
    assert view.button.disabled and view.target_input.disabled
    gate.set()
    _join(thread)
    assert not view.button.disabled


def test_pareto_view_is_disabled_without_apply(loaded):
    state = DashboardState(loaded)
    view = ParetoView(state=state)
    assert view.button.disabled and view.target_input.disabled and view.note.visible
    assert "cannot search" in view.placeholder.object
    assert view.run() is None and state.message_kind == "warning"


# -- the app ----------------------------------------------------------------------------------------
def test_the_app_has_sensitivity_and_mixed_precision_tabs(live):
    app = build_app(live)
    (tabs,) = [o for o in app.objects if isinstance(o, pn.Tabs)]
    assert tabs._names[0] == "Layers" and {"Graph", "Sensitivity", "Mixed precision"} <= set(tabs._names)
    assert isinstance(app.dashboard.sensitivity, SensitivityView)
    assert isinstance(app.dashboard.pareto, ParetoView)
    assert _model(app) is not None

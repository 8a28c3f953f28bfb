"""The Algorithms tab without a browser: Run algorithms compares the selected layer on a worker
thread, the bars are the gains session.algorithms() measures (here on Hadamard inputs, where
SmoothQuant at alpha 1, AWQ and GPTQ provably equal RTN and their bars say "did nothing")."""

from __future__ import annotations

import pytest
from torch import nn

import qviz
from qviz.charts.algorithms import DID_NOTHING
from qviz.ui.algorithm_view import AlgorithmView
from qviz.ui.app import build_dashboard
from qviz.ui.state import DashboardState
from qviz.ui.views import select
from tests.analysis.test_algorithms import _hadamard


@pytest.fixture(scope="module")
def session():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    rows = _hadamard(64)
    return qviz.Session(model, [rows[i:i + 16] for i in range(0, 64, 16)], flow="torchao", progress=False).run()


def test_run_shows_the_selected_layers_gains_and_labels_did_nothing(session):
    view = AlgorithmView(state=DashboardState(session))
    select(view.state, "0")
    assert view.chart.objects == [view.placeholder] and "Run algorithms" in view.placeholder.object
    view.alpha = 1.0
    view.run().join()
    assert view.state.task == "" and view.button.label == "Run algorithms" and not view.button.disabled
    expected = session.algorithms(layers="0", alpha=1.0)
    shown = view.table.value
    assert list(shown.algorithm) == list(expected.algorithm) and list(shown.sqnr) == list(expected.sqnr)
    bars = view.pane.object.data[0]
    others = expected[expected.algorithm != "rtn"]
    assert list(bars.x) == list(others.algorithm) and list(bars.y) == list(others.gain_vs_rtn_db)
    labels = dict(zip(bars.x, bars.text, strict=True))
    assert {a for a, t in labels.items() if t == DID_NOTHING} == {"smoothquant", "awq", "gptq"}
    assert labels["hqq"].endswith(" dB")
    assert "did nothing" in view.state.message and view.state.message_kind == "warning"

    select(view.state, "2")  # another layer: nothing run for it yet
    assert view.chart.objects == [view.placeholder] and not view.table.visible
    select(view.state, "0")  # back: its comparison at once, no new run
    assert view.chart.objects == [view.pane] and view.table.visible


def test_a_failed_run_is_a_message_and_a_loaded_session_cannot_run(session, tmp_path):
    view = AlgorithmView(state=DashboardState(session))
    select(view.state, "0")
    view.group_size = 48  # does not divide 64
    view.run().join()
    assert view.state.message_kind == "danger" and "group_size 48 does not divide" in view.state.message
    assert view.chart.objects == [view.placeholder] and not view.button.disabled

    session.save(tmp_path / "s.qviz")
    loaded = AlgorithmView(state=DashboardState(qviz.load(tmp_path / "s.qviz")))
    assert loaded.button.disabled and "loaded from a file" in loaded.placeholder.object


def test_the_dashboard_has_the_tab(session):
    tabs = build_dashboard(session).sections()[-1]
    assert tabs._names[-1] == "Algorithms"

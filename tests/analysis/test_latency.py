"""Opt-in latency: the median of repeated runs, measured for the float and converted models."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from qviz.analysis.latency import median_latency_ms
from qviz.cli import demo_session, main


class Sleeper(nn.Module):
    """Takes a known time per call, and counts its calls."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_median_latency_measures_the_model_after_warmup():
    model = Sleeper(0.004)
    ms = median_latency_ms(model, (torch.zeros(1),), repeats=7, warmup=2)
    assert model.calls == 9
    assert 4.0 <= ms < 40.0  # at least the sleep; a loaded machine may add, but not tenfold


@pytest.fixture(scope="module")
def timed():
    return demo_session(progress=False, latency=True)


def test_session_reports_both_latencies_when_asked(timed):
    s = timed.summary()
    assert math.isfinite(s["latency_ms"]) and s["latency_ms"] > 0
    assert math.isfinite(s["float_latency_ms"]) and s["float_latency_ms"] > 0


def test_latency_is_remeasured_after_apply(timed):
    first = timed.summary()["float_latency_ms"]
    timed.apply({"fc2": {"dtype": "float"}})
    s = timed.summary()
    assert s["float_latency_ms"] == first  # the float model did not change: measured once
    assert s["latency_ms"] > 0
    timed.undo()


def test_latency_is_off_by_default(demo_sessions):
    s = demo_sessions().summary()
    assert "latency_ms" not in s and "float_latency_ms" not in s


def test_cli_demo_prints_latency(capsys):
    assert main(["demo", "--latency"]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "ms vs float" in out


def test_dashboard_shows_the_speedup_only_when_measured(demo_sessions, timed):
    from qviz.ui.state import DashboardState
    from qviz.ui.views import SummaryView

    s = timed.summary()
    view = SummaryView(state=DashboardState(timed))
    assert view.speedup.visible
    assert view.speedup.value == pytest.approx(s["float_latency_ms"] / s["latency_ms"])
    assert "ms float (median, this CPU)" in view.details.object
    untimed = SummaryView(state=DashboardState(demo_sessions()))
    assert not untimed.speedup.visible

"""The mixed-precision view: ``session.search(target_sqnr=...)`` on a worker thread with a
progress bar, then its candidates as a size-vs-error scatter with the Pareto front, the plan
found and the plan in force marked. Clicking a point applies that candidate's plan through
:meth:`DashboardState.apply_plan`, so it is undoable and every view updates.
"""

from __future__ import annotations

import threading

import panel as pn
import param
import plotly.graph_objects as go

from qviz.analysis.search import SearchResult
from qviz.charts.layout import message_figure
from qviz.charts.pareto import pareto_figure
from qviz.plan import Plan
from qviz.ui.progress import TaskProgress, ui_caller
from qviz.ui.views import _StateView

TASK = "mixed-precision search"
CANNOT = (
    "Mixed-precision search re-converts the model, and this session cannot: it was loaded from "
    "a file, or its flow or qconfigs are not qviz's. Re-create it from the float model (with "
    "`plan=...` instead of your own qconfigs or quantizer) to search."
)


class ParetoView(_StateView):
    """Target SQNR, Search, and the candidates' Pareto plot; clicking a point applies its plan."""

    target = param.Number(default=30.0, bounds=(0, None), doc="Model output SQNR to reach (dB).")

    def __init__(self, **params):
        super().__init__(**params)
        self.target_input = pn.widgets.FloatInput.from_param(
            self.param.target, label="target output SQNR (dB)", step=1, width=200
        )
        self.button = pn.widgets.Button(
            label="Search",
            color="primary",
            description="Measure each layer at each precision, solve for the smallest plan predicted to "
            "meet the target, then verify candidates by real conversion.",
            align="end",
        )
        self.button.on_click(lambda _: self.run())
        self.note = pn.pane.Markdown(
            CANNOT, visible=False, margin=(0, 10), styles={"color": "#555"}
        )
        self.progress = TaskProgress("candidate")
        self._plot_slot("pareto")
        self.result: SearchResult | None = None
        self.searched_target: float | None = None
        self._plans: dict[int, Plan] = {}
        self.thread: threading.Thread | None = None
        self.pane.param.watch(self._on_click, "click_data")
        self.state.param.watch(self._redraw, "version")
        self.state.param.watch(self._on_task, "task")
        self._redraw()
        self._on_task()

    # -- drawing ---------------------------------------------------------------------------------
    def _redraw(self, *_):
        """The plot once a search ran; until then a line of text (no plot to load)."""
        if self.result is None:
            why = (
                "set a target and press Search"
                if self.state.can_apply
                else "this session cannot search"
            )
            self._show_plot(None, f"No search yet: {why}.")
        else:
            self._show_plot(self._guard(
                "the Pareto plot",
                self._figure,
                lambda: message_figure("Size vs error", "could not draw this chart", 420),
            ))

    def _figure(self) -> go.Figure:
        plan = self.state.plan
        in_force = self._step_of(plan)
        found = None if self.result.plan is None else self._step_of(self.result.plan)
        return pareto_figure(
            self.result.candidates, self.result.pareto(), self.searched_target, found, in_force
        )

    # -- the search ------------------------------------------------------------------------------
    def run(self) -> threading.Thread | None:
        """Start ``session.search(target_sqnr=target)`` on a worker thread; returns the thread,
        or None when the session cannot search or another task runs."""
        if not self.state.can_apply:
            self.state.notify(CANNOT.replace("`", ""), "warning")
            return None
        target, ui = float(self.target), ui_caller()
        self.progress.start(f"searching for {target:g} dB ...")
        if self.result is None:  # "No search yet" does not belong under a running search
            self._show_plot(None, "")
        self.thread = self.state.run_task(
            TASK, lambda: self._search(target, ui), lambda r: self._done(r, target), ui
        )
        if self.thread is None:
            self.progress.finish("")
            self._redraw()
        return self.thread

    def _step_of(self, plan: Plan) -> int | None:
        """The candidate whose plan is ``plan`` (None if it is none of them)."""
        return next((step for step, p in self._plans.items() if p == plan), None)

    def _search(self, target: float, ui) -> SearchResult:
        def callback(tried, most):
            ui(self.progress.update, tried, most)

        return self.state.search(target, callback)

    def _done(self, result: SearchResult, target: float) -> None:
        self.state.refresh()  # every candidate was a real apply: re-read the plan in force
        self._plans = {int(r.step): Plan.from_json(r.plan) for r in result.candidates.itertuples()}
        self.result, self.searched_target = result, target
        count = len(result.candidates)
        self.progress.finish(f"tried {count} candidates in {self.progress.elapsed:.1f} s")
        self._redraw()
        if result.plan is None:
            text = f"no candidate reached {target:g} dB: click a point to apply one anyway"
        else:
            step = self._step_of(result.plan)
            best = result.candidates.set_index("step").loc[step]
            text = (
                f"search done: the plan found (candidate {step}, the star) meets {target:g} dB "
                f"with {int(best.weight_bytes):,} weight bytes ({best.output_sqnr:.2f} dB); "
                "click a point to apply its plan"
            )
        self.state.notify(text, "success" if result.plan is not None else "warning")

    def _on_task(self, *_):
        running = bool(self.state.task)
        self.button.disabled = self.target_input.disabled = running or not self.state.can_apply
        self.note.visible = not self.state.can_apply
        if not running and self.progress.running:  # the task ended without _done: it failed
            self.progress.finish("the search stopped: see the message above")
            self._redraw()
            self.state.refresh()  # it applied candidates before failing: re-read the plan in force

    # -- picking ---------------------------------------------------------------------------------
    def pick(self, step: int) -> bool:
        """Apply candidate ``step``'s plan (undoable; every view updates)."""
        if step not in self._plans:
            return False
        row = self.result.candidates.set_index("step").loc[step]
        what = (
            f"applied search candidate {step} ({row['changed']}): "
            f"{int(row['weight_bytes']):,} weight bytes, output SQNR {row['output_sqnr']:.2f} dB"
        )
        with pn.io.hold():
            return self.state.apply_plan(self._plans[step], what)

    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        step = points[0].get("customdata") if points else None
        if isinstance(step, (int, float)):
            self.pick(int(step))

    def __panel__(self):
        return pn.Column(
            pn.Row(self.target_input, self.button),
            self.note,
            self.progress,
            self.chart,
            sizing_mode="stretch_width",
        )

"""The sensitivity view: the per-layer sweep as a ranked bar chart, the diagnosis beside it, and
a button that runs ``session.sensitivity()`` on a worker thread with a progress bar.

The chart shows a pair of the sweep's variants per layer, most sensitive on top: "only this
layer quantized" vs "all but this layer quantized" (where to spend precision), or "only its
weight" vs "only its output activation" (which of the two to fix). Clicking a bar, or a
diagnosis row, selects that layer everywhere.
"""

from __future__ import annotations

import threading

import pandas as pd
import panel as pn
import plotly.graph_objects as go

from qviz.charts.layout import message_figure
from qviz.charts.sensitivity import LABELS, sensitivity_figure
from qviz.ui.progress import TaskProgress, ui_caller
from qviz.ui.views import _StateView, select

TASK = "sensitivity sweep"
PAIRS = {
    "quantize only / skip only": ("quantize_only", "skip_only"),
    "weight only / activation only": ("weight_only", "activation_only"),
}
DIAGNOSIS_COLUMNS = ["severity", "layer", "cause", "evidence", "fix"]
#: (column, least width in px, share of the width left) of the diagnosis table's other columns.
DIAGNOSIS_WIDTHS = (("layer", 110, 1), ("cause", 110, 1), ("evidence", 200, 3), ("fix", 200, 3))
NO_SWEEP_SAVED = "none was saved with this session, and a session loaded from a file cannot run one"
NO_MODEL = (
    "This session was loaded from a file: it holds results only, so it cannot sweep. "
    "Re-create it from the model (`qviz.Session(model, data, plan=...).run()`) to run one."
)
EXPLAIN = {
    "quantize_only": "the model's output when only this layer is quantized: the lower, the more "
    "this layer alone hurts",
    "skip_only": "every other layer quantized and this one left float: the higher above the "
    "all-quantized model, the more keeping this layer float buys",
    "weight_only": "only this layer's weight quantized",
    "activation_only": "only its output activation quantized: the lower of the two is the cause",
}


class SensitivityView(_StateView):
    """The ranked sweep, the diagnosis table and the "Run sensitivity sweep" button."""

    def __init__(self, **params):
        super().__init__(**params)
        self.pair = pn.widgets.RadioButtonGroup(options=list(PAIRS), value=next(iter(PAIRS)))
        self.button = pn.widgets.Button(
            label="Run sensitivity sweep",
            color="primary",
            description="Measure each layer alone (no calibration pass); the app stays usable.",
        )
        self.button.on_click(lambda _: self.run())
        self.note = pn.pane.Markdown(
            NO_MODEL, visible=False, margin=(0, 10), styles={"color": "#555"}
        )
        self.progress = TaskProgress("layer")
        self._plot_slot("sensitivity")
        self.explain = pn.pane.Markdown("", margin=(0, 10), styles={"color": "#555"})
        self.diagnosis = pn.widgets.Tabulator(
            pd.DataFrame(columns=DIAGNOSIS_COLUMNS),
            show_index=False,
            disabled=True,
            selectable=1,
            layout="fit_columns",
            # each title fits its column and the text columns wrap whole words: below these
            # widths the table scrolls sideways instead of cutting "severity" or a word
            widths={"severity": 100},
            configuration={"columns": [{"field": f, "minWidth": w, "widthGrow": g}
                                       for f, w, g in DIAGNOSIS_WIDTHS]},
            formatters={"evidence": {"type": "textarea"}, "fix": {"type": "textarea"}},
            sizing_mode="stretch_width",
            label="diagnosis",
        )
        self.findings = pn.pane.Markdown("", margin=(0, 10))
        self.findings_box = pn.Column(self.findings, sizing_mode="stretch_width", margin=0)
        self.thread: threading.Thread | None = None
        self.pane.param.watch(self._on_click, "click_data")
        self.diagnosis.param.watch(self._on_row, "selection")
        self.pair.param.watch(self._redraw_chart, "value")
        self.state.param.watch(self._redraw_chart, "selected_layer")
        self.state.param.watch(self._redraw, "version")
        self.state.param.watch(self._on_task, "task")
        self._redraw()
        self._on_task()

    # -- drawing ---------------------------------------------------------------------------------
    def _redraw(self, *_):
        """Chart now; the diagnosis (~0.1 s on 200 layers) on the next tick, so that an Apply's
        table and charts reach the browser first."""
        self._redraw_chart()
        ui_caller()(self._redraw_diagnosis)

    def _redraw_chart(self, *_):
        """The chart once there is a sweep; until then a line of text (no plot to load)."""
        frame = self.state.sensitivity_frame()
        if frame is None or frame.empty:
            why = "press Run sensitivity sweep" if self.state.can_sweep else NO_SWEEP_SAVED
            self._show_plot(None, f"No sensitivity sweep yet: {why}.")
        else:
            self._show_plot(self._guard("the sensitivity chart", self._figure, self._fallback))
        variants = PAIRS[self.pair.value]
        lines = [f"**{LABELS[v]}**: {EXPLAIN[v]}." for v in variants] + [
            "Click a bar to select its layer."
        ]
        self.explain.object = "  \n".join(lines)

    def _figure(self) -> go.Figure:
        frame = self.state.sensitivity_frame()
        all_quantized = self.state.summary.get("output_sqnr")
        if frame.attrs.get("metric", "output_sqnr") != "output_sqnr":
            all_quantized = None
        return sensitivity_figure(
            frame, PAIRS[self.pair.value], selected=self.state.selected_layer, all_quantized=all_quantized
        )

    def _fallback(self) -> go.Figure:
        return message_figure("Sensitivity", "could not draw this chart")

    def _redraw_diagnosis(self):
        frame = self._guard("the diagnosis", self.state.diagnosis, lambda: None)
        if frame is None:
            self.findings.object = "The diagnosis could not run: see the message above."
            frame = pd.DataFrame(columns=DIAGNOSIS_COLUMNS)
        else:
            swept = self.state.sensitivity_frame() is not None
            self.findings.object = (
                f"{len(frame)} finding(s)" + (", sensitive layers first" if swept else "")
                if len(frame)
                else "No findings: no rule fired on this session's layers."
            )
        self.diagnosis.value = frame[[c for c in DIAGNOSIS_COLUMNS if c in frame]].reset_index(
            drop=True
        )
        shown = [self.findings, self.diagnosis] if len(frame) else [self.findings]
        if self.findings_box.objects != shown:  # the table joins the page only with findings
            self.findings_box.objects = shown

    # -- selecting -------------------------------------------------------------------------------
    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        if points:
            point = points[0]
            select(self.state, point.get("customdata", point.get("y")))

    def _on_row(self, event):
        if event.new:
            select(self.state, self.diagnosis.value["layer"].iloc[event.new[0]])

    # -- the sweep -------------------------------------------------------------------------------
    def run(self) -> threading.Thread | None:
        """Start ``session.sensitivity()`` on a worker thread (the app stays responsive); returns
        the thread, or None when the session cannot sweep or another task runs."""
        if not self.state.can_sweep:
            self.state.notify(NO_MODEL.replace("`", ""), "warning")
            return None
        ui = ui_caller()
        self.progress.start("preparing the sweep ...")
        self.thread = self.state.run_task(TASK, lambda: self._sweep(ui), self._done, ui)
        if self.thread is None:
            self.progress.finish("")
        return self.thread

    def _sweep(self, ui):
        def callback(done, total):
            ui(self.progress.update, done, total)

        return self.state.sweep(callback)

    def _done(self, result) -> None:
        frame = result.frame
        self.progress.finish(f"measured {len(frame)} layers in {self.progress.elapsed:.1f} s")
        self._redraw()
        top = frame.index[0] if len(frame) else None
        self.state.notify(f"sensitivity sweep done: the most sensitive layer is {top}", "success")

    def _on_task(self, *_):
        running = bool(self.state.task)
        self.button.disabled = running or not self.state.can_sweep
        self.note.visible = not self.state.can_sweep
        if not self.state.can_sweep:
            self.button.description = NO_MODEL.replace("`", "")
        if not running and self.progress.running:  # the task ended without _done: it failed
            self.progress.finish("the sweep stopped: see the message above")

    def __panel__(self):
        left = pn.Column(
            pn.Row(self.button, self.pair),
            self.note,
            self.progress,
            self.chart,
            self.explain,
            sizing_mode="stretch_width",
        )
        right = pn.Column(
            pn.pane.Markdown("### Diagnosis", margin=(0, 10)),
            self.findings_box,
            sizing_mode="stretch_width",
        )
        return pn.Row(left, right, sizing_mode="stretch_width")

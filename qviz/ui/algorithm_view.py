"""The Algorithms tab: RTN vs SmoothQuant vs AWQ vs GPTQ vs HQQ on the selected layer.

"Run algorithms" runs ``session.algorithms(layer, ...)`` on a worker thread (through
:meth:`DashboardState.run_task`) and shows each algorithm's gain in layer output SQNR over
round-to-nearest as a bar, an algorithm that did nothing (RTN's weight and error) labelled so
on its bar, with the table of figures below. Results are kept per layer and options, so
selecting a layer again shows its comparison at once.
"""

from __future__ import annotations

import threading

import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from qviz.charts.algorithms import gain_figure
from qviz.ui.markup import md
from qviz.ui.progress import ui_caller
from qviz.ui.views import _StateView

TASK = "algorithm comparison"
EXPLAIN = (
    "Each algorithm quantizes the selected linear layer's weight on its own, from its inputs over the "
    "calibration batches: **sqnr** is the layer's output (float input, quantized weight) against its float "
    "output, **gain** that minus round-to-nearest's, **model sqnr** the model's output with only this layer "
    "changed. An algorithm whose weight and error are RTN's *did nothing*: its bar says so.")


class AlgorithmView(_StateView):
    """Run and show the algorithm comparison of the selected layer."""

    dtype = param.Selector(default="int4", objects=["int4", "int8"], doc="Weight dtype.")
    group_size = param.Integer(default=32, bounds=(1, None), doc="int4: inputs per group.")
    alpha = param.Number(default=0.5, bounds=(0, 1), step=0.05, doc="SmoothQuant's migration strength.")

    def __init__(self, **params):
        super().__init__(**params)
        self.note = pn.pane.Markdown(EXPLAIN, sizing_mode="stretch_width", margin=(0, 10), styles={"color": "#555"})
        self.button = pn.widgets.Button(label="Run algorithms", color="primary", width=160)
        self.button.on_click(lambda _: self.run())
        self.controls = pn.Row(
            pn.widgets.RadioButtonGroup.from_param(self.param.dtype),
            pn.widgets.IntInput.from_param(self.param.group_size, name="group size", width=110),
            pn.widgets.FloatInput.from_param(self.param.alpha, name="SmoothQuant alpha", width=140),
            self.button)
        self._plot_slot("algorithm gains")
        self.table = pn.widgets.Tabulator(
            None, disabled=True, show_index=False, layout="fit_data_table", sizing_mode="stretch_width",
            visible=False, formatters={c: NumberFormatter(format="0.00") for c in ("sqnr", "gain_vs_rtn_db", "model_sqnr")},
            titles={"gain_vs_rtn_db": "gain vs RTN (dB)", "model_sqnr": "model sqnr", "did_nothing": "did nothing"})
        self.results: dict[tuple, pd.DataFrame] = {}
        self.thread: threading.Thread | None = None
        self.state.param.watch(self._redraw, ["selected_layer"])
        self.state.param.watch(self._on_task, ["task"])
        self.param.watch(self._redraw, ["dtype", "group_size", "alpha"])
        self._redraw()

    def _key(self) -> tuple:
        return (self.state.selected_layer, self.dtype, self.group_size, self.alpha)

    def run(self) -> threading.Thread | None:
        """Start the comparison of the selected layer on a worker thread; returns the thread, or
        None when no layer is selected or another task runs."""
        key = self._key()
        if key[0] is None:
            self.state.notify("select a linear layer first", "warning")
            return None
        ui = ui_caller()
        self.thread = self.state.run_task(
            TASK, lambda: self.state.algorithms(key[0], dtype=key[1], group_size=key[2], alpha=key[3]),
            lambda frame: self._done(key, frame), ui)
        return self.thread

    def _done(self, key, frame: pd.DataFrame) -> None:
        self.results[key] = frame
        self._redraw()
        flagged = list(frame.algorithm[frame.did_nothing])
        self.state.notify(f"algorithms on {key[0]}: " + (f"{', '.join(flagged)} did nothing (RTN's weight)"
                                                         if flagged else "each one changed the weight"),
                          "warning" if flagged else "success")

    def _on_task(self, *_):
        running = self.state.task == TASK
        self.button.disabled = bool(self.state.task) or not self.state.can_sweep
        self.button.label = "Running…" if running else "Run algorithms"

    def _redraw(self, *_):
        frame = self.results.get(self._key())
        layer = self.state.selected_layer
        if not self.state.can_sweep:
            self.button.disabled = True
            self._show_plot(None, "This session was loaded from a file: it holds results only, so it cannot run "
                                  "the algorithms. Re-create it from the model (`qviz.Session(model, data).run()`).")
            return
        if frame is None:
            self.table.visible = False
            self._show_plot(None, "Select a linear layer and press **Run algorithms** to compare RTN, SmoothQuant, "
                                  f"AWQ, GPTQ and HQQ on it{f' ({md(layer)})' if layer else ''}.")
            return
        self._show_plot(self._guard("the algorithm chart", lambda: gain_figure(frame, layer), lambda: None),
                        "could not draw the algorithm chart")
        self.table.value = frame.reset_index(drop=True)
        self.table.visible = True

    def __panel__(self):
        return pn.Column(pn.pane.Markdown("### Quantization algorithms on the selected layer", margin=(0, 10)),
                         self.note, self.controls, self.chart, self.table, sizing_mode="stretch_width")

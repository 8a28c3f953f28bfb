"""The Outliers tab: which input channels of each linear layer carry the activation outliers.

A layer x channel heat map of every linear layer's input (abs-max per channel over the
calibration batches, or that over the layer's median channel) linked to the layer selection
both ways: clicking a row selects its layer everywhere, and the selected layer's row is
outlined. Below it, ``session.outliers(top)``: each layer's top channels, most extreme first,
with the persistence that tells a systematic outlier channel (per-channel scales, SmoothQuant)
from a spike (clipping, per-token scales). Everything comes from :class:`DashboardState`.
"""

from __future__ import annotations

import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from qviz.charts.outliers import TITLES, outlier_heatmap
from qviz.errors import QvizError
from qviz.ui.markup import md
from qviz.ui.views import _StateView, select

EXPLAIN = (
    "Each linear layer's input, channel by channel (the features of its last dimension), over the "
    "calibration batches. A per-tensor int8 scale is set by the largest channel, so a channel tens of "
    "times the median leaves the others a handful of levels. **persistence**: the share of tokens in "
    "which the channel exceeds 6x the token's median magnitude: near 1 a *systematic* outlier channel "
    "(try per-channel scales or SmoothQuant), near 0 a *spike* (try a percentile observer or "
    "per-token scales). **kurtosis**: the layer's input heaviness (0 for a Gaussian). Click a row of "
    "the heat map to select that layer.")


class OutlierView(_StateView):
    """The heat map of every linear layer's input channels and the top-outlier table."""

    value = param.Selector(default="ratio_to_median", objects=list(TITLES), doc="""
        What the heat map colours: abs-max over the layer's median channel, or the abs-max itself.""")
    top = param.Integer(default=4, bounds=(1, 64), doc="Channels per layer in the table.")

    def __init__(self, **params):
        super().__init__(**params)
        self.note = pn.pane.Markdown(EXPLAIN, sizing_mode="stretch_width", margin=(0, 10),
                                     styles={"color": "#555"})
        self.value_picker = pn.widgets.RadioButtonGroup.from_param(
            self.param.value, options={"ratio to median": "ratio_to_median", "abs-max": "absmax"})
        self.top_input = pn.widgets.IntInput.from_param(self.param.top, name="channels per layer", width=160)
        self._plot_slot("outlier heat map")
        self.table = pn.widgets.Tabulator(
            None, disabled=True, selectable=1, show_index=False, pagination="local", page_size=15,
            layout="fit_data_table", sizing_mode="stretch_width", label="top outliers",
            formatters={"absmax": NumberFormatter(format="0.0000"),
                        "ratio_to_median": NumberFormatter(format="0.00"),
                        "persistence": NumberFormatter(format="0.000"),
                        "kurtosis": NumberFormatter(format="0.0")},
            titles={"ratio_to_median": "ratio to median"})
        self.table_heading = pn.pane.Markdown("##### Top channels of each layer, most extreme first",
                                              margin=(0, 10))
        self.matrix = None  # the heat map's numbers: DashboardState.channel_matrix(self.value)
        self.available, self.shown = True, False
        self._show_plot(None, "measuring the activation outliers (a float pass over the calibration batches)…")
        self.pane.param.watch(self._on_click, "click_data")
        self.table.param.watch(self._on_row, "selection")
        self.state.param.watch(self._redraw, ["selected_layer", "version"])
        self.param.watch(self._redraw, "value")
        self.param.watch(self._refill, "top")

    def show(self) -> None:
        """Measure and draw, the first time the view is shown (the app calls it when its tab is
        opened); later changes redraw it as they come."""
        if not self.shown:
            self.shown = True
            with pn.io.hold():
                self._redraw()
                self._refill()

    def _redraw(self, *_):
        if not self.shown:
            return
        self._guard("the outlier heat map", self._draw, lambda: self._show_plot(None, "could not draw the heat map"))

    def _draw(self):
        try:
            self.matrix = self.state.channel_matrix(self.value)
        except QvizError as exc:
            self._unavailable(f"No activation-outlier statistics for this session: {md(exc)}. They are "
                              "measured on the float model over the calibration batches, so they need a "
                              "live session (`session.show()`, `qviz serve --demo minilm`) or a file it "
                              "saved after measuring them (`session.outliers()`).")
            return
        if self.matrix.empty:
            self._unavailable("No activation-outlier statistics: this model has no linear layer "
                              "(nn.Linear or Hugging Face Conv1D) whose input channels to measure.")
            return
        self._show_plot(outlier_heatmap(self.matrix, self.value, self.state.selected_layer))

    def _unavailable(self, text: str) -> None:
        """Say why there is nothing to show, instead of the heat map, its controls and the table."""
        self.available, self.matrix = False, None
        for part in (self.value_picker, self.top_input, self.table_heading, self.table):
            part.visible = False
        self._show_plot(None, text)

    def _refill(self, *_):
        if not (self.shown and self.available):
            return
        self.table.value = self._guard("the outlier table", lambda: self.state.outliers(self.top), lambda: None)

    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        if points:
            select(self.state, points[0].get("y"))

    def _on_row(self, event):
        if event.new and self.table.value is not None:
            select(self.state, self.table.value["layer"].iloc[event.new[0]])

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Activation outliers", margin=(0, 10)), self.note,
            pn.Row(self.value_picker, self.top_input), self.chart,
            self.table_heading, self.table, sizing_mode="stretch_width")

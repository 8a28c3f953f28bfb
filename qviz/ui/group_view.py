"""The Groups tab: the selected Linear layer's int4 weight groups, output channel x group.

Group-wise int4 gives each run of ``group_size`` input columns of each output row its own
scale, so one large weight coarsens only its group: the heat map shows which groups lose
precision (SQNR in dB) or carry large scales, hover showing both. It follows the layer
selection (a layer picker here, the table elsewhere). On a torchao session with the layer int4
the figures are torchao's own; a group size picked here is a what-if from the float weight,
and on a session that can re-convert "Apply" makes it the layer's ``group_size`` through
``session.apply()``. Everything comes from :class:`DashboardState`; drawn on first opening.
"""

from __future__ import annotations

import panel as pn
import param

from qviz.analysis.groups import worst_groups
from qviz.charts.groups import TITLES, group_heatmap
from qviz.errors import QvizError
from qviz.ui.markup import md
from qviz.ui.views import MessageView, _StateView, select

EXPLAIN = (
    "Group-wise int4 (torchao's `PerGroup`) gives each run of *group size* input columns of each output "
    "channel its own scale: one large weight coarsens the other weights of its group only. Dark cells are "
    "the groups int4 spoils (low SQNR); the outlined cell is the worst. Pick a group size to see what it "
    "would give (computed from the float weight with torchao's formulas), and apply it to the layer "
    "where the session can re-convert.")
SIZES = (32, 64, 128)


class GroupView(_StateView):
    """The heat map of the selected layer's weight groups, with a group-size what-if."""

    value = param.Selector(default="sqnr", objects=list(TITLES), doc="What the heat map colours.")
    group_size = param.Selector(default=0, objects=[0, *SIZES], doc="""
        The what-if's group size; 0: the layer's own (as converted, or the default).""")

    def __init__(self, **params):
        super().__init__(**params)
        self.note = pn.pane.Markdown(EXPLAIN, sizing_mode="stretch_width", margin=(0, 10), styles={"color": "#555"})
        self.layer_picker = pn.widgets.Select(label="layer", options=self.state.group_layers(), width=360)
        self.value_picker = pn.widgets.RadioButtonGroup.from_param(
            self.param.value, options={"SQNR (dB)": "sqnr", "scale": "scale"})
        self.size_picker = pn.widgets.Select.from_param(
            self.param.group_size, label="group size", width=160,
            options={"layer's own": 0, **{str(g): g for g in SIZES}})
        self.apply_button = pn.widgets.Button(label="Apply to this layer", color="primary", disabled=True,
                                              visible=self._can_apply_groups(), margin=(23, 10, 5, 10))
        self.apply_button.on_click(lambda _: self.apply())
        self.messages = MessageView(state=self.state, source="groups")
        self.summary = pn.pane.Markdown("", margin=(0, 10))
        self._plot_slot("weight group heat map")
        self.frame, self.shown = None, False
        self._show_plot(None, "drawing the weight groups…")
        self.layer_picker.param.watch(lambda event: select(self.state, event.new), "value")
        self.state.param.watch(self._redraw, ["selected_layer", "version"])
        self.param.watch(self._redraw, ["value", "group_size"])

    def _can_apply_groups(self) -> bool:
        return self.state.can_apply and "group_size" in (self.state.editable or {})

    def show(self) -> None:
        """Draw, the first time the view is shown (the app calls it when its tab is opened)."""
        if not self.shown:
            self.shown = True
            self._redraw()

    def _redraw(self, *_):
        if not self.shown:
            return
        self._guard("the weight group heat map", self._draw, lambda: self._show_plot(None, "could not draw it"))

    def _draw(self):
        layers = self.state.group_layers()
        layer = self.state.selected_layer
        with pn.io.hold():
            self.layer_picker.options = layers
            if layer in layers:
                self.layer_picker.value = layer
            self.apply_button.disabled = True
            if layer not in layers:
                self.frame, self.summary.object = None, ""
                self._show_plot(None, f"**{md(layer)}** is not a Linear layer: weight groups are the input "
                                      "columns of a Linear weight. Pick a Linear layer above.")
                return
            try:
                self.frame = self.state.weight_groups(layer, self.group_size or None)
            except QvizError as exc:
                self.frame, self.summary.object = None, ""
                self._show_plot(None, f"No weight groups for {md(layer)}: {md(exc)}")
                return
            self.summary.object = self._summary(self.frame)
            plan = self.state.plan
            config = plan.get(layer) if plan is not None else None
            self.apply_button.disabled = not (
                self._can_apply_groups() and self.group_size and config is not None
                and config.dtype == "int4" and config.group_size != self.group_size)
            self._show_plot(group_heatmap(self.frame, self.value))

    @staticmethod
    def _summary(frame) -> str:
        found = worst_groups(frame)
        return (f"{found['output_channels']} output channels × {found['groups']} groups of {found['group_size']} "
                f"inputs ({md(frame.attrs['source'])}): median SQNR "
                f"**{found['median_sqnr']:.2f} dB**, worst **{found['worst_sqnr']:.2f} dB** (output channel "
                f"{found['worst_channel']}, group {found['worst_group']})")

    def apply(self) -> bool:
        """Make the picked group size the selected layer's (``session.apply``)."""
        layer = self.state.selected_layer
        if layer is None or not self.group_size:
            self.state.notify("pick a group size first", "info", "groups")
            return False
        with pn.io.hold():
            return self.state.apply({layer: {"group_size": self.group_size}}, source="groups")

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Weight groups", margin=(0, 10)), self.note,
            pn.Row(self.layer_picker, self.size_picker, self.apply_button), self.messages,
            self.value_picker, self.summary, self.chart, sizing_mode="stretch_width")

"""The graph view: the model's graph (layers, residual adds, concatenations; see
:mod:`qviz.analysis.graph`) drawn top to bottom, each layer coloured by a chosen figure.

Modules can be collapsed to a module-path depth (``layer1.0`` for ``layer1.0.conv1`` and its
siblings at depth 2), a group coloured by its worst member. Clicking a layer selects it
everywhere; clicking a group selects its worst layer by the figure shown; the selected layer's
node (or its group) is ringed. The chart is :mod:`qviz.charts.graph`'s.
"""

from __future__ import annotations

import panel as pn

from qviz.analysis.graph import FIGURES
from qviz.charts.graph import graph_figure, ring_at
from qviz.charts.layout import message_figure
from qviz.errors import QvizError
from qviz.ui.views import _StateView, select

EVERY_LAYER = "every layer"


class GraphView(_StateView):
    """The model graph with a figure picker and a grouping depth; linked to the layer selection."""

    def __init__(self, **params):
        super().__init__(**params)
        self.figure = pn.widgets.Select(label="colour by", width=220)
        self.depth = pn.widgets.Select(label="group modules to depth", width=220)
        self.info = pn.pane.Markdown("", margin=(0, 10), styles={"color": "#555"})
        self._plot_slot("graph")
        self._graph = None
        self._shown = False
        self.pane.param.watch(self._on_click, "click_data")
        self.figure.param.watch(self._redraw, "value")
        self.depth.param.watch(self._redraw, "value")
        self.state.param.watch(self._move_ring, "selected_layer")
        self.state.param.watch(self._after_table(self._on_version), "version")

    def show(self) -> None:
        """Trace, lay out and draw the graph (the app calls this when its tab is first opened:
        a page not looking at the graph does not wait for it)."""
        if not self._shown:
            self._shown = True
            self._on_version()

    def _set_options(self) -> None:
        """The figures the session has (sensitivity once swept) and the depths its graph has,
        deepest grouping that fits on screen first."""
        try:
            full = self.state.graph()
        except QvizError:
            full = None
        figures_now = {FIGURES[f][0]: f for f in FIGURES
                       if f in self.state.table or (f == "sensitivity" and self.state.sensitivity_frame() is not None)}
        keep = self.figure.value if self.figure.value in figures_now.values() else next(iter(figures_now.values()))
        self.figure.param.update(options=figures_now, value=keep)
        if full is not None and not self.depth.options:
            depths = {str(d): d for d in range(1, full.max_depth)}
            depths[EVERY_LAYER] = 0
            default = full.default_depth()
            self.depth.param.update(options=depths, value=0 if default is None else default,
                                    disabled=len(depths) == 1)

    def _on_version(self, *_):
        if not self._shown:
            return
        with pn.io.hold():
            self._set_options()
            self._redraw()

    def _move_ring(self, *_):
        """Ring the newly selected layer's node in place (one restyle, not a new figure)."""
        ring = next((t for t in getattr(self.pane.object, "data", ()) if t.name == "selected"), None)
        if ring is None or self._graph is None:
            return
        x, y, name = ring_at(self._graph, self.state.selected_layer) or [None, None, None]
        with self.pane.object.batch_update():
            ring.update(x=[x], y=[y], customdata=[name])

    def _redraw(self, *_):
        if not self._shown:
            return
        try:
            self._graph = self.state.graph(self.depth.value or None)
        except QvizError as exc:
            self._graph = None
            self.info.object = ""
            self._show_plot(None, f"No graph: {exc}")
            return
        graph = self._graph
        counts = graph.nodes["kind"].value_counts()
        parts = [f"{counts.get(k, 0)} {k}{'s' if counts.get(k, 0) != 1 else ''}"
                 for k in ("layer", "group", "add", "cat") if counts.get(k, 0)]
        note = f"From {graph.source}: {', '.join(parts)}."
        if graph.missing:
            note += f" Not in the graph: {', '.join(map(str, graph.missing[:5]))}{' ...' if len(graph.missing) > 5 else ''}."
        self.info.object = note
        self._show_plot(self._guard("the model graph",
                                    lambda: graph_figure(graph, self.figure.value, self.state.selected_layer),
                                    lambda: message_figure("Model graph", "could not draw this chart")))

    def layer_of(self, name: str) -> str | None:
        """The layer a click on node ``name`` selects: the layer itself, a group's worst layer by
        the figure shown (its first when none has it), None for adds, cats, inputs and outputs."""
        if self._graph is None or name not in self._graph.nodes.index:
            return None
        members = list(self._graph.nodes.at[name, "members"])
        if len(members) <= 1:
            return members[0] if members else None
        figure = self.figure.value
        sweep = self.state.sensitivity_frame()
        source = sweep if figure == "sensitivity" and sweep is not None else self.state.table
        values = source[figure].reindex(members).astype(float) if figure in source else None
        if values is None or values.isna().all():
            return members[0]
        return values.idxmin() if FIGURES[figure][1] else values.idxmax()

    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        if points:
            select(self.state, self.layer_of(points[0].get("customdata")))

    def __panel__(self):
        return pn.Column(pn.Row(self.figure, self.depth), self.info, self.chart, sizing_mode="stretch_width")

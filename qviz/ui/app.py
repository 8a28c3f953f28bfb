"""The dashboard: every view over one :class:`DashboardState`, as a plain layout (notebooks,
ipywidgets) or under a "qviz" header bar (served apps).

Served apps use a plain layout rather than a template: a Panel template costs about a second
of browser CPU on first render (FastListTemplate's design also links a Google font, an error
and a stall where there is no internet), and first render is the number to keep low.
"""

from __future__ import annotations

import functools
import logging

import panel as pn
from panel.viewable import Viewer

from qviz.ui.algorithm_view import AlgorithmView
from qviz.ui.compare_view import CompareView
from qviz.ui.graph_view import GraphView
from qviz.ui.group_view import GroupView
from qviz.ui.markup import md
from qviz.ui.outlier_view import OutlierView
from qviz.ui.pareto_view import ParetoView
from qviz.ui.qat_view import QatView
from qviz.ui.sensitivity_view import SensitivityView
from qviz.ui.state import DashboardState
from qviz.ui.views import ConfigEditor, DepthChart, LayerTable, LayerView, MessageView, SummaryView

log = logging.getLogger(__name__)

TITLE = "qviz"


class Dashboard(Viewer):
    """All views of one session, linked through one state."""

    def __init__(self, session, compare_with=None, **params):
        super().__init__(**params)
        self.state = DashboardState(session)
        self.messages = MessageView(state=self.state)
        self.summary = self._build("the model figures", SummaryView)
        self.table = self._build("the layer table", LayerTable)
        self.depth = self._build("the error-along-depth chart", DepthChart)
        self.graph = self._build("the graph view", GraphView)
        self.layer = self._build("the layer view", LayerView)
        self.editor = self._build("the config editor", ConfigEditor) if self.state.can_apply else None
        self.sensitivity = self._build("the sensitivity view", SensitivityView)
        self.pareto = self._build("the mixed-precision view", ParetoView)
        self.qat = self._build("the QAT view", QatView)
        self.outliers = self._build("the outlier view", OutlierView)
        self.groups = self._build("the weight group view", GroupView) if self.state.group_layers() else None
        self.algorithms = self._build("the algorithm view", AlgorithmView)
        self.compare = (None if compare_with is None else
                        self._build("the compare view", functools.partial(CompareView, other=compare_with)))

    def _build(self, what: str, cls):
        """A view, or an Alert saying why it could not be built (the others still work)."""
        try:
            return cls(state=self.state)
        except Exception as exc:  # noqa: BLE001 - one broken view must not take the app down
            log.exception("qviz: could not build %s", what)
            self.state.notify(f"could not build {what}: {type(exc).__name__}: {exc}", "danger")
            return pn.pane.Alert(md(f"{what} is unavailable: {type(exc).__name__}: {exc}"), alert_type="danger")

    def sections(self) -> list:
        """The dashboard's parts, top to bottom: figures, messages, then one tab per view. Only the
        Layers tab is laid out at first; every other tab gets its view when first opened, so the
        first render pays for the tab on screen only (the views exist from the start and follow
        the state: a sweep or a search runs whichever tab is open)."""
        # Not dynamic: Panel 1.9 keeps a hidden dynamic tab's models detached and still updates them,
        # relinking shared stylesheets to its CDN (unreachable offline) when a message or card changes.
        views = [("Graph", self.graph), ("Sensitivity", self.sensitivity), ("Mixed precision", self.pareto),
                 ("QAT", self.qat), ("Outliers", self.outliers)]
        if self.groups is not None:  # only where there are Linear layers to group
            views.append(("Groups", self.groups))
        views.append(("Algorithms", self.algorithms))
        if self.compare is not None:
            views.append(("Compare", self.compare))
        holders = [pn.Column(sizing_mode="stretch_width") for _ in views]
        widget = pn.Tabs(("Layers", self._layers_tab()), *((name, holder) for (name, _), holder in
                                                          zip(views, holders, strict=True)),
                         dynamic=False, sizing_mode="stretch_width")
        lazy = [None, *((holder, view) for holder, (_, view) in zip(holders, views, strict=True))]
        widget.param.watch(lambda event: self._opened(*lazy[event.new]) if lazy[event.new] else None, "active")
        return [self.summary, self.messages, widget]

    @staticmethod
    def _opened(holder: pn.Column, view) -> None:
        """A tab was opened: on the first opening its view is laid out, and the views that measure
        or draw only when looked at (outliers: a float pass; the graph: a trace; the weight groups)
        do so now."""
        if not holder.objects:
            holder.append(view)
        if isinstance(view, (GraphView, OutlierView, GroupView)):  # not an Alert saying the view failed
            view.show()

    def _layers_tab(self) -> pn.Row:
        """Layer table, depth chart and config editor beside the selected layer's view."""
        left = [pn.pane.Markdown("### Layers", margin=(0, 10)), self.table, self.depth]
        if self.editor is not None:
            left += [pn.pane.Markdown("### Change this layer", margin=(0, 10)), self.editor]
        right = [pn.pane.Markdown("### Selected layer", margin=(0, 10)), self.layer]
        return pn.Row(pn.Column(*left, sizing_mode="stretch_width"), pn.Column(*right, sizing_mode="stretch_width"),
                      sizing_mode="stretch_width")

    def __panel__(self):
        return pn.Column(*self.sections(), sizing_mode="stretch_width")

    def page(self) -> pn.Column:
        """The served page: a "qviz" header bar above the dashboard (a plain layout)."""
        header = pn.pane.HTML(f"<span style='font-size: 1.5em'>{TITLE}</span>", sizing_mode="stretch_width",
                              styles={"background": "#4c78a8", "color": "white", "padding": "8px 16px"},
                              margin=0)
        page = pn.Column(header, *self.sections(), sizing_mode="stretch_width", name=TITLE)
        page.dashboard = self  # tests and callers reach the state through the page
        return page


def build_dashboard(session, compare_with=None) -> Dashboard:
    """The linked views of ``session`` as a plain Panel layout (a Compare tab with ``compare_with``)."""
    return Dashboard(session, compare_with=compare_with)


def build_app(session, compare_with=None):
    """The served app of ``session``: the dashboard under a "qviz" header (serve with title="qviz")."""
    return Dashboard(session, compare_with=compare_with).page()

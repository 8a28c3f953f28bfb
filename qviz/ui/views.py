"""The dashboard's views: ``pn.viewable.Viewer`` classes that read only a :class:`DashboardState`.

Each view builds its widgets and panes once and updates them in place when the state's
``selected_layer`` or ``version`` changes, so selecting a layer anywhere (table row, chart
point, code) selects it everywhere. A view that fails to draw says so in the state's message
(shown as an Alert by the app) and draws a placeholder: the rest keeps working.
"""

from __future__ import annotations

import html
import io
import logging
import math

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter, ScientificFormatter
from panel.viewable import Viewer

from qviz.charts.layers import depth_figure, histogram_figure, weight_scale_figure
from qviz.charts.layout import AMBER, AMBER_DB, GREEN, RED, RED_DB, message_figure, sqnr_color
from qviz.ui.markup import md
from qviz.ui.progress import ui_caller
from qviz.ui.state import (
    COMPARED_COLUMNS,
    COMPARED_SUMMARY,
    CONFIG_FIELDS,
    EDITOR_OPTIONS,
    DashboardState,
    offered,
)

log = logging.getLogger(__name__)

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_SQNR_COLUMNS = ("output_sqnr", "local_sqnr", "weight_sqnr")
_CELL_COLORS = {RED: "#f8d7da", AMBER: "#fff3cd", GREEN: "#d1e7dd"}


def select(state: DashboardState, layer) -> None:
    """Select ``layer`` in every view at once (one held update); unknown layers are ignored."""
    if layer is None or layer == state.selected_layer or layer not in state.param.selected_layer.objects:
        return
    with pn.io.hold():
        state.selected_layer = layer


class _StateView(Viewer):
    state = param.ClassSelector(class_=DashboardState, doc="The dashboard state this view reads.")

    def _guard(self, what: str, draw, fallback):
        """``draw()``; on an exception, the message says what failed and ``fallback()`` is drawn."""
        try:
            return draw()
        except Exception as exc:  # noqa: BLE001 - one view failing must not take the app down
            log.exception("qviz: could not draw %s", what)
            self.state.notify(f"could not draw {what}: {type(exc).__name__}: {exc}", "danger")
            return fallback()

    def _plot_slot(self, name: str) -> None:
        """``self.chart``: a column that holds ``self.placeholder`` (a line of text) until
        :meth:`_show_plot` has a figure for ``self.pane``: an empty plot still loads plotly.js."""
        self.pane = pn.pane.Plotly(config=_PLOTLY_CONFIG, sizing_mode="stretch_width", name=name)
        self.placeholder = pn.pane.Markdown("", margin=(10, 10), styles={"color": "#555"})
        self.chart = pn.Column(self.placeholder, sizing_mode="stretch_width", margin=0)

    def _show_plot(self, figure, text: str = "") -> None:
        """Show ``figure`` in the slot, or ``text`` instead when ``figure`` is None."""
        self.pane.object = figure
        self.placeholder.object = text
        shown = self.placeholder if figure is None else self.pane
        if self.chart.objects != [shown]:
            self.chart.objects = [shown]

    def _after_table(self, redraw):
        """A watcher of ``version`` that runs ``redraw`` on the next tick of the page's event loop:
        after an Apply the table's new numbers reach the browser first and the charts follow
        (redrawing them costs about 0.4 s on 200 layers). At once outside a served page."""
        return lambda *_: ui_caller()(redraw)


# -- messages --------------------------------------------------------------------------------------
#: The page's own message line floats over the page's top right corner: shown or hidden, it
#: never moves the page (a banner pushing the charts down is a click on the wrong chart).
FLOATING = {"position": "fixed", "top": "6px", "right": "12px", "z-index": "1000", "width": "min(560px, 45vw)",
            "box-shadow": "0 2px 8px rgba(0,0,0,0.2)", "background": "white", "border-radius": "4px"}


class MessageView(_StateView):
    """The state's message as an Alert with a dismiss button, when it belongs here: a view's
    own actions answer under that view (``source``), everything else on the page's floating
    line (``source=''``). Each message shows in exactly one place."""

    source = param.String(default="", doc="The message_source this view shows ('' the page's line).")

    def __init__(self, **params):
        super().__init__(**params)
        self.alert = pn.pane.Alert("", alert_type="info", sizing_mode="stretch_width", margin=(0, 5))
        self.dismiss = pn.widgets.Button(label="✕", color="light", width=40, margin=(5, 5))
        self.dismiss.on_click(lambda _: self.state.clear_message())
        self._layout = pn.Row(self.alert, self.dismiss, visible=False, sizing_mode="stretch_width",
                              styles=FLOATING if not self.source else {})
        self.state.param.watch(self._update, ["message", "message_kind", "message_source"])
        self._update()

    @property
    def shown(self) -> bool:
        """True when the state's message belongs to this view."""
        return bool(self.state.message) and self.state.message_source == self.source

    def _update(self, *_):
        if self.shown:
            self.alert.param.update(object=md(self.state.message), alert_type=self.state.message_kind)
        self._layout.visible = self.shown

    def __panel__(self):
        return self._layout


# -- model-level figures ----------------------------------------------------------------------------
class SummaryView(_StateView):
    """Model-level figures: output SQNR (coloured by the thresholds), top-1 agreement, size vs float."""

    def __init__(self, **params):
        super().__init__(**params)
        common = {"font_size": "26pt", "title_size": "11pt", "nan_format": "n/a", "margin": (0, 20)}
        self.sqnr = pn.indicators.Number(label="output SQNR", format="{value:.2f} dB", colors=[
            (RED_DB, RED), (AMBER_DB, AMBER), (math.inf, GREEN)], **common)
        self.top1 = pn.indicators.Number(label="top-1 agreement", format="{value:.2f} %", **common)
        self.size = pn.indicators.Number(label="weight size vs float", format="{value:.1f} %", **common)
        self.speedup = pn.indicators.Number(label="speed-up vs float", format="{value:.2f}x", visible=False,
                                            **common)
        # the width the figures leave, its words wrapped: on one line it ran off a 900 px screen
        self.details = pn.pane.Markdown("", margin=(10, 20), styles={"color": "#555"}, sizing_mode="stretch_width",
                                        min_width=160)
        self.state.param.watch(self._update, "version")
        self._update()

    def _update(self, *_):
        s = self.state.summary
        size, float_size = s.get("weight_bytes", math.nan), s.get("float_weight_bytes", math.nan)
        with pn.io.hold():
            self.sqnr.value = _number(s.get("output_sqnr"))
            self.top1.value = _number(s.get("top1_agreement")) * 100
            self.top1.visible = math.isfinite(self.top1.value)  # NaN where outputs are not class scores
            self.size.value = 100 * _number(size) / _number(float_size) if float_size else math.nan
            latency, float_latency = _number(s.get("latency_ms")), _number(s.get("float_latency_ms"))
            self.speedup.visible = math.isfinite(latency) and math.isfinite(float_latency)
            self.speedup.value = float_latency / latency if self.speedup.visible else math.nan
            meta = self.state.meta()
            parts = [f"{len(self.state.layers)} layers"]
            if math.isfinite(_number(size)) and math.isfinite(_number(float_size)):
                parts.append(f"weights {size / 1000:.1f} kB at their dtypes' widths "
                             f"(int4: 4 bits a value, MX/NVFP4 with their scales), float {float_size / 1000:.1f} kB")
            if self.speedup.visible:
                parts.append(f"{latency:.2f} ms quantized, {float_latency:.2f} ms float (median, this CPU)")
            parts += [f"{k} {md(meta[k])}" for k in ("flow", "backend", "torch") if meta.get(k)]
            self.details.object = " · ".join(parts)

    def __panel__(self):
        return pn.Row(self.sqnr, self.top1, self.size, self.speedup, self.details, sizing_mode="stretch_width")


def _number(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


# -- layer table -----------------------------------------------------------------------------------
def sqnr_cell_style(value) -> str:
    """CSS for an SQNR cell: red below 20 dB, amber below 30, green above; none when NaN."""
    color = sqnr_color(_number(value))
    return f"background-color: {_CELL_COLORS[color]}" if color else ""


_DECIMALS = {**dict.fromkeys(_SQNR_COLUMNS, 2), "scale": 5, "zero_point": 0, "min": 3, "max": 3,
             "cosine": 5, "max_abs_err": 4}


def _formatters() -> dict:
    """New Bokeh formatters for one table. Never share them between tables: Panel watches each
    formatter on behalf of its table, so a shared one keeps every table, dashboard and session
    that ever used it alive (a served app then leaks every visitor's session)."""
    return {
        **{c: NumberFormatter(format=f"0.{'0' * d}" if d else "0") for c, d in _DECIMALS.items()},
        "clip_frac": NumberFormatter(format="0.000%"), "mse": ScientificFormatter(precision=3),
    }


_TITLES = {"output_sqnr": "output SQNR (dB)", "local_sqnr": "local SQNR (dB)", "weight_sqnr": "weight SQNR (dB)",
           "clip_frac": "clipped", "zero_point": "zero point"}
_CHAR_PX, _HEADER_PX, _CELL_PX = 8, 34, 18  # average glyph; header sort arrow + padding; cell padding


def _cell_text(column: str, value) -> str:
    """Roughly what the table's formatter prints for ``value`` (for its width, not for display)."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return "NaN"
    if column in _DECIMALS:
        return f"{value:.{_DECIMALS[column]}f}"
    if column == "clip_frac":
        return f"{100 * value:.3f}%"
    if column == "mse":
        return f"{value:.3e}"
    return str(value)


def column_widths(table: pd.DataFrame) -> dict[str, int]:
    """Pixel width of every column (index included) from its title and longest formatted cell.

    Fixed widths spare Tabulator measuring every cell in the browser (its ``fitToData`` pass was
    a third of the table's first-render time on 200 layers)."""
    columns = {table.index.name or "index": table.index, **{c: table[c] for c in table.columns}}
    widths = {}
    for name, values in columns.items():
        cells = max((len(_cell_text(name, v)) for v in values), default=0)
        title = len(_TITLES.get(name, name))
        widths[name] = max(cells * _CHAR_PX + _CELL_PX, title * _CHAR_PX + _HEADER_PX)
    return widths


class LayerTable(_StateView):
    """Every layer's row of ``to_dataframe()``: sortable, filterable, SQNR cells colour-coded;
    selecting a row selects the layer."""

    PAGE_SIZE = 15

    def __init__(self, **params):
        super().__init__(**params)
        table = self.state.table
        paged = len(table) > self.PAGE_SIZE  # the browser lays out one page, not every row
        self.widget = pn.widgets.Tabulator(
            table, header_filters=True, selectable=1, disabled=True, sortable=True,
            formatters=_formatters(), titles=dict(_TITLES), frozen_columns=["layer"],
            widths=column_widths(table),
            pagination="local" if paged else None, page_size=self.PAGE_SIZE if paged else None,
            layout="fit_data_table", sizing_mode="stretch_width", label="layers")
        self.widget.style.map(sqnr_cell_style, subset=[c for c in _SQNR_COLUMNS if c in table.columns])
        self.widget.param.watch(self._on_selection, "selection")
        self.state.param.watch(self._on_selected, "selected_layer")
        self.state.param.watch(self._on_version, "version")
        self._on_selected()

    def _on_selection(self, event):
        if event.new:
            select(self.state, self.widget.value.index[event.new[0]])

    def _on_selected(self, *_):
        layer = self.state.selected_layer
        index = list(self.widget.value.index)
        wanted = [index.index(layer)] if layer in index else []
        if self.widget.selection != wanted:
            with pn.io.hold():
                self.widget.selection = wanted
                if wanted and self.widget.pagination:  # show the page that holds it
                    self.widget.page = wanted[0] // self.PAGE_SIZE + 1

    def _on_version(self, *_):
        self._guard("the layer table", self._show_table, lambda: None)
        self._on_selected()

    def _show_table(self):
        """The state's table, with the column widths its values now need, in one update."""
        table = self.state.table
        widths = column_widths(table)
        with pn.io.hold():
            if widths != self.widget.widths:  # a longer value (say per_channel_affine) needs room
                self.widget.widths = widths
            self.widget.value = table

    def __panel__(self):
        return self.widget


# -- error along depth -----------------------------------------------------------------------------
class DepthChart(_StateView):
    """local and output SQNR along depth; clicking a point selects its layer."""

    def __init__(self, **params):
        super().__init__(**params)
        self.pane = pn.pane.Plotly(self._figure(), config=_PLOTLY_CONFIG, sizing_mode="stretch_width",
                                   height=340, name="depth")
        self.pane.param.watch(self._on_click, "click_data")
        self.state.param.watch(self._redraw, "selected_layer")
        self.state.param.watch(self._after_table(self._redraw), "version")

    def _figure(self):
        return self._guard("the error-along-depth chart",
                           lambda: depth_figure(self.state.table, self.state.selected_layer),
                           lambda: message_figure("Error along depth", "could not draw this chart"))

    def _redraw(self, *_):
        self.pane.object = self._figure()

    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        if not points:
            return
        point = points[0]
        layer = point.get("x")
        if layer not in self.state.layers:  # fall back on the position in the trace
            i = point.get("pointIndex", point.get("pointNumber"))
            ordered = list(self.state.table.sort_values("depth").index)
            layer = ordered[i] if isinstance(i, int) and 0 <= i < len(ordered) else None
        select(self.state, layer)

    def __panel__(self):
        return self.pane


# -- selected layer: histogram and weights ----------------------------------------------------------
class LayerView(_StateView):
    """The selected layer: a one-line card of its numbers, the histogram of its output activation
    point (range band, clipped tails, grid; log-y toggle) and its per-channel weight scales."""

    log_y = param.Boolean(default=True, doc="Counts on a log scale (tails stay visible).")

    def __init__(self, **params):
        super().__init__(**params)
        self.card = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10), name="layer card")
        self.histogram = pn.pane.Plotly(config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=330,
                                        name="histogram")
        self.weights = pn.pane.Plotly(config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=270,
                                      name="weights")
        self.log_toggle = pn.widgets.Checkbox.from_param(self.param.log_y, label="log-scale counts")
        self.state.param.watch(self._redraw, "selected_layer")
        self.state.param.watch(self._after_table(self._redraw), "version")
        self.param.watch(self._redraw_histogram, "log_y")
        self._redraw()

    def _redraw(self, *_):
        with pn.io.hold():
            self.card.object = self._guard("the layer card", self._card, lambda: "")
            self._redraw_histogram()
            self.weights.object = self._guard(
                "the weight chart", self._weight_figure,
                lambda: message_figure("weights", "could not draw this chart", 260))

    def _redraw_histogram(self, *_):
        self.histogram.object = self._guard(
            "the histogram", self._histogram_figure,
            lambda: message_figure("histogram", "could not draw this chart"))

    def _card(self) -> str:
        layer = self.state.selected_layer
        if layer is None:
            return "No layer selected."
        r = self.state.row(layer)
        parts = [str(r.get("type", "")), f"{r.get('dtype', '')} {r.get('qscheme', '')}".strip(),
                 str(r.get("observer", "")), f"weight {r.get('weight_dtype', '')} {r.get('weight_qscheme', '')}".strip()]
        parts += [f"{c.split('_')[0]} SQNR {_number(r.get(c)):.2f} dB" for c in _SQNR_COLUMNS
                  if math.isfinite(_number(r.get(c)))]
        return " · ".join([f"**{md(layer)}**", *(md(p) for p in parts if p)])

    def _histogram_figure(self):
        layer = self.state.selected_layer
        if layer is None:
            return message_figure("histogram", "select a layer")
        point = self.state.activation_point(layer)
        if point is None:
            return message_figure(f"{layer}: output activation",
                                          "no activation point was recorded for this layer")
        return histogram_figure(self.state.record(point), layer, log_y=self.log_y)

    def _weight_figure(self):
        layer = self.state.selected_layer
        point = self.state.weight_point(layer) if layer is not None else None
        if point is None:
            return message_figure(f"{layer}: weight", "this layer has no quantized weight", 260)
        return weight_scale_figure(self.state.record(point), layer)

    def __panel__(self):
        return pn.Column(self.card, self.log_toggle, self.histogram, self.weights, sizing_mode="stretch_width")


# -- config editor (needs Session.apply) ------------------------------------------------------------
def _editor_param(o) -> param.Parameter:
    """The editor's parameter for option ``o`` (see :mod:`qviz.options`): its default and values."""
    if o.choices:
        return param.Selector(default=o.default, objects=list(o.choices), doc=o.doc)
    if o.type is bool:
        return param.Boolean(default=o.default, doc=o.doc)
    if o.optional:  # 0 stands for None (the session's value): a Select showing None at first shows nothing
        return param.Selector(default=0, objects=[0, *o.suggested], check_on_set=False, doc=f"{o.doc}; 0: the session's")
    return param.Number(default=o.default, bounds=o.bounds, inclusive_bounds=o.inclusive, step=0.01, doc=o.doc)


_WIDGETS = {"buttons": pn.widgets.RadioButtonGroup, "select": pn.widgets.Select, "number": pn.widgets.FloatInput,
            "checkbox": pn.widgets.Checkbox}
_NONE = {o.name: 0 for o in EDITOR_OPTIONS if o.optional}  # what stands for None in the editor's parameters


class ConfigEditor(_StateView):
    """Change the selected layer's quantization choices and re-convert (``session.apply``);
    before/after of the layer's numbers, Undo, and the plan as code. Only for live sessions
    whose ``can_apply`` is True."""

    # one parameter per option with an editor widget (qviz.options), its default and values
    locals().update({o.name: _editor_param(o) for o in EDITOR_OPTIONS})

    _FIELDS = CONFIG_FIELDS

    def __init__(self, **params):
        super().__init__(**params)
        self.heading = pn.pane.Markdown("", margin=(0, 10))
        self.messages = MessageView(state=self.state, source="apply")  # under Apply, where the user looks
        self.widgets = {o.name: _WIDGETS[o.widget].from_param(getattr(self.param, o.name),
                                                                label=o.name.replace("_", " "))
                        for o in EDITOR_OPTIONS}
        for o in EDITOR_OPTIONS:  # what the flow offers unless its editable says (dtype: torch.ao's)
            if offered(o):
                self.widgets[o.name].options = _options(o.name, offered(o))
        self._limit_to_flow()
        self.widgets["group_size"].visible = "group_size" in (self.state.editable or {})
        self.param.watch(self._toggle_percentile, "activation")
        self.apply_button = pn.widgets.Button(label="Apply", color="primary")
        self.undo_button = pn.widgets.Button(label="Undo", color="default")
        self.apply_button.on_click(lambda _: self.apply())
        self.undo_button.on_click(lambda _: self.undo())
        self.compare = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=True,
                                            sizing_mode="stretch_width", label="before/after")
        # the table joins the page on the first change: a hidden Tabulator still costs a first render
        self.compare_box = pn.Column(pn.pane.Markdown("##### Before / after", margin=(0, 10)),
                                     visible=False, sizing_mode="stretch_width")
        # plain <pre> text, selectable to copy: a code editor widget costs ~0.5 s of browser CPU
        # at first render, and this code is read and copied, not edited
        self.code_text = ""
        self.code = pn.pane.HTML("", sizing_mode="stretch_width", name="plan code",
                                 styles={"max-height": "220px", "overflow": "auto", "background": "#f7f7f7"})
        self.download = pn.widgets.FileDownload(callback=lambda: io.StringIO(self.state.plan_code()),
                                                filename="qviz_plan.py", label="Download plan.py",
                                                color="light")
        self.state.param.watch(self._load_layer, "selected_layer")
        self.state.param.watch(self._on_version, "version")
        self.state.param.watch(self._on_busy, "busy")
        self.state.param.watch(self._show_change, "last_change")
        self._load_layer()
        self._on_version()
        self._toggle_percentile()

    def _limit_to_flow(self) -> None:
        """Offer only what the session's flow honours (PT2E: int8/float and reduce_range; torchao:
        dtype and weight granularity); the rest is disabled and the note says why."""
        editable = self.state.editable
        self.flow_note = pn.pane.Markdown("", visible=editable is not None, margin=(0, 10),
                                          styles={"color": "#555", "font-size": "0.9em"})
        if editable is None:
            return
        for field, widget in self.widgets.items():
            widget.disabled = field not in editable
            if editable.get(field):
                widget.options = _options(field, editable[field])
        flow = self.state.meta().get("flow", "this flow")
        self.flow_note.object = md(f"flow {flow}: only {', '.join(editable)} apply here; other options "
                                   "need a session of your own quantizer or flow")

    def _toggle_percentile(self, *_):
        editable = self.state.editable
        self.widgets["percentile"].disabled = self.activation != "percentile" or (
            editable is not None and "percentile" not in editable)

    @property
    def enabled(self) -> bool:
        return self.state.can_apply

    def _load_layer(self, *_):
        layer = self.state.selected_layer
        self.heading.object = f"Configure **{md(layer)}**" if layer else "Configure"
        if layer is not None:
            config = self.state.layer_config(layer)
            with pn.io.hold():
                for field in ("dtype", "weight", "group_size"):  # what this layer can be under this flow
                    if not self.widgets[field].disabled and self.widgets[field].visible:
                        values = self.state.choices(layer, field)  # and what it is now, always
                        values = values if config[field] in values else [config[field], *values]
                        self.widgets[field].options = _options(field, values)
                self.param.update(**{f: _NONE.get(f, v) if v is None else v for f, v in config.items()})

    def _on_version(self, *_):
        self._load_layer()
        self.code_text = self._guard("the plan's code", self.state.plan_code, lambda: "")
        self.code.object = f"<pre style='margin: 4px 8px'>{html.escape(self.code_text)}</pre>"
        self.undo_button.disabled = not self.state.can_undo

    def _on_busy(self, event):
        self.apply_button.loading = self.undo_button.loading = event.new

    def changes(self) -> dict:
        """The fields that differ from the selected layer's current configuration."""
        current = self.state.layer_config(self.state.selected_layer)
        chosen = {f: getattr(self, f) for f in self._FIELDS}
        chosen.update({f: None for f, zero in _NONE.items() if chosen[f] == zero})
        return {f: v for f, v in chosen.items() if v != current[f]}

    def apply(self) -> bool:
        layer = self.state.selected_layer
        changes = self.changes()
        if layer is None or not changes:
            self.state.notify("nothing to apply: change a choice first", "info", "apply")
            return False
        with pn.io.hold():
            return self.state.apply({layer: changes})

    def undo(self) -> bool:
        with pn.io.hold():
            return self.state.undo()

    def _show_change(self, *_):
        """The last change's before/after: the choices that changed, the layer's numbers, the
        model's, each in its unit; hidden until there is a change (no empty table)."""
        change = self.state.last_change
        self.compare_box.visible = bool(change)
        if not change:
            return
        if self.compare not in self.compare_box.objects:
            self.compare_box.append(self.compare)
        before, after = change["before"], change["after"]
        layer = change["layer"]
        rows = {f"{layer}: {f.replace('_', ' ')}": (before[f], after[f]) for f in self._FIELDS
                if f in before and f in after and before[f] != after[f]}
        rows.update({f"{layer}: {_COMPARED_TITLES.get(c, c)}": (_fmt(before.get(c), c), _fmt(after.get(c), c))
                     for c in COMPARED_COLUMNS})
        rows.update({f"model: {_COMPARED_TITLES.get(k, k)}": (_fmt(change["summary_before"].get(k), k),
                                                             _fmt(change["summary_after"].get(k), k))
                     for k in COMPARED_SUMMARY})
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=["before", "after"]).astype(str)
        frame.index.name = "what"
        self.compare.value = frame

    def __panel__(self):
        controls = []
        for field, widget in self.widgets.items():
            if isinstance(widget, pn.widgets.RadioButtonGroup):  # it shows no label of its own
                controls.append(pn.pane.Markdown(field, margin=(5, 10, 0, 10)))
            controls.append(widget)
        return pn.Column(self.heading, self.flow_note, *controls, pn.Row(self.apply_button, self.undo_button), self.messages,
                         self.compare_box,
                         pn.pane.Markdown("##### Plan as code", margin=(0, 10)), self.code, self.download,
                         visible=self.enabled, sizing_mode="stretch_width")


def _options(field: str, values) -> list | dict:
    """A widget's options for ``field``'s ``values``; an optional one's labelled (None: the session's)."""
    if field not in _NONE:
        return list(values)
    return {"session's" if v is None else str(v): _NONE[field] if v is None else v for v in values}


_COMPARED_TITLES = {"weight_sqnr": "weight SQNR", "local_sqnr": "local SQNR", "output_sqnr": "output SQNR",
                    "clip_frac": "clipped", "zero_point": "zero point", "top1_agreement": "top-1 agreement",
                    "weight_bytes": "weight size"}


def _fmt(v, key: str = "") -> str:
    """``v`` in the unit of the number it is (``key``): dB, %, bytes; plain text otherwise."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        v = float(v)
        if not math.isfinite(v):
            return "n/a"
        if key.endswith("_sqnr"):
            return f"{v:.2f} dB"
        if key in ("clip_frac", "top1_agreement"):
            return f"{100 * v:.3g} %"
        if key.endswith("bytes"):
            return f"{v:,.0f} B"
        return f"{v:.4g}"
    return str(v)

"""The QAT view: the selected layer's QAT timeline (``Session.from_qat`` / ``results.timeline``).

Scale, zero point and observed min/max over the recorded steps (per-channel quantities as the
median over channels with a min-max band), the histogram over steps as a heat map, logged scalars,
the events of the run as labelled vertical lines, and the detector findings. The figure builders
are plain functions (timeline in, ``go.Figure`` out); :class:`QatView` wires them to the state.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import panel as pn
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qviz.analysis.qat_detectors import diagnose
from qviz.capture.qat import timeline_histogram
from qviz.errors import QvizError
from qviz.ui import figures
from qviz.ui.markup import md
from qviz.ui.views import _PLOTLY_CONFIG, _StateView, select

#: Shown instead of the view when the session holds no timeline.
HOW_TO_RECORD = """### No QAT timeline in this session

Record one inside your own training loop, then open the session made from it:

```python
with qviz.watch(qat_model, every=10, histograms_every=100) as rec:
    for x, y in loader:
        loss = loss_fn(qat_model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        rec.log(loss=loss.item())          # any scalars: loss, kd_loss, lr, ...
s = qviz.Session.from_qat(qat_model, rec, calib_batches)
s.show()                                   # or s.save("run.qviz"), then: qviz serve run.qviz
```
"""

HEATMAP_BINS = 80
FINDING_COLUMNS = ["layer", "point", "detector", "start", "end", "evidence", "fix"]
_COLORS = {"scale": "#4c78a8", "zero_point": "#f58518", "min": "#54a24b", "max": "#e45756"}
_ROLE_ORDER = {"output": 0, "input": 1, "weight": 2}


def timeline_of(session):
    """The session's QAT timeline (``results.timeline``), None when it has none."""
    return getattr(getattr(session, "results", None), "timeline", None)


def layer_points(timeline, layer) -> list[dict]:
    """The timeline's points of ``layer``: output activation first, then input, then weight."""
    found = [p for p in timeline.points if p["layer"] == layer]
    return sorted(found, key=lambda p: _ROLE_ORDER.get(p["role"], 3))


def layer_events(timeline, layer=None) -> pd.DataFrame:
    """(step, kind) of the events of ``layer`` (of the whole run when None), once each, by step."""
    events = timeline.events_frame()
    if layer is not None:
        events = events[events["layer"] == layer]
    return (
        events[["step", "kind"]]
        .drop_duplicates()
        .sort_values(["step", "kind"])
        .reset_index(drop=True)
    )


def _event_marks(events: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """Vertical lines (shapes named "event") and their labels (annotations named "event")."""
    shapes, notes = [], []
    for step, group in events.groupby("step", sort=True):
        label = ", ".join(k.replace("_", " ") for k in group["kind"])
        shapes.append(
            {
                "type": "line",
                "xref": "x",
                "x0": int(step),
                "x1": int(step),
                "yref": "paper",
                "y0": 0,
                "y1": 1,
                "name": "event",
                "line": {"color": "#7f7f7f", "width": 1, "dash": "dot"},
            }
        )
        notes.append(
            {
                "x": int(step),
                "xref": "x",
                "y": 1,
                "yref": "paper",
                "yanchor": "top",
                "xanchor": "left",
                "text": label,
                "showarrow": False,
                "bgcolor": "rgba(255,255,255,0.75)",
                "name": "event",
                "font": {"size": 10, "color": "#444"},
            }
        )
    return shapes, notes


def _mark_events(fig: go.Figure, events: pd.DataFrame) -> go.Figure:
    shapes, notes = _event_marks(events)
    fig.update_layout(
        shapes=[*fig.layout.shapes, *shapes], annotations=[*fig.layout.annotations, *notes]
    )
    return fig


def channel_summary(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, min, max) over channels per step of a steps x channels array (NaN-aware)."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN step stays NaN
        return np.nanmedian(values, axis=1), np.nanmin(values, axis=1), np.nanmax(values, axis=1)


def _quantity_traces(steps, values, quantity: str) -> list[go.Scatter]:
    """One line for a per-tensor quantity; median line plus a min-max band for per-channel."""
    color, label = _COLORS[quantity], quantity.replace("_", " ")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return []
    steps = np.asarray(steps)
    if values.shape[1] == 1:
        return [
            go.Scatter(
                x=steps,
                y=values[:, 0],
                name=label,
                mode="lines+markers",
                line={"color": color},
                hovertemplate="step %{x}<br>" + label + " %{y:.5g}<extra></extra>",
            )
        ]
    mid, lo, hi = channel_summary(values)
    k = values.shape[1]
    return [
        go.Scatter(
            x=steps,
            y=lo,
            name=f"{label}: channel min",
            mode="lines",
            line={"width": 0, "color": color},
            showlegend=False,
            hoverinfo="skip",
        ),
        go.Scatter(
            x=steps,
            y=hi,
            name=f"{label}: channel max",
            mode="lines",
            line={"width": 0, "color": color},
            fill="tonexty",
            opacity=0.25,
            showlegend=False,
            hoverinfo="skip",
        ),
        go.Scatter(
            x=steps,
            y=mid,
            name=f"{label} (median of {k} channels)",
            mode="lines+markers",
            line={"color": color},
            hovertemplate="step %{x}<br>median " + label + " %{y:.5g}<extra></extra>",
        ),
    ]


def qparams_figure(timeline, point: str, events: pd.DataFrame) -> go.Figure:
    """Scale, zero point and observed min/max of ``point`` over the snapshot steps, events marked.
    Each row is named by its y-axis title, not a subplot title above it: the legend above the
    plots (four long entries for a per-channel point) then has nothing to lie over."""
    info = next(p for p in timeline.points if p["name"] == point)
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    rows = (
        (1, ("scale",), "scale"),
        (2, ("zero_point",), "zero point"),
        (3, ("min", "max"), "min / max"),
    )
    for row, quantities, name in rows:
        fig.update_yaxes(title_text=name, automargin=True, row=row, col=1)
        for q in quantities:
            steps, values = timeline.series(point, q)
            for trace in _quantity_traces(steps, values, q):
                fig.add_trace(trace, row=row, col=1)
    fig.update_xaxes(title_text="training step", row=3, col=1)
    title = f"{info['layer']}: {point} ({info['role']}, {info['qscheme']}) over training"
    _mark_events(fig, events)
    return figures.layout(fig, title, height=520)


def _rebinned_shares(hist, edges: np.ndarray) -> np.ndarray:
    """Share of ``hist``'s values in each bin of ``edges``, which span [hist.min, hist.max] or more
    (values spread uniformly within a bin; what a bin reaches beyond min or max stays in the ends)."""
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts, dtype=np.float64)])
    cum = np.interp(edges, hist.edges, cdf)
    cum[0], cum[-1] = 0.0, cdf[-1]
    return np.diff(cum) / hist.total


def histogram_grid(timeline, point: str, bins: int = HEATMAP_BINS):
    """(histogram steps, common value edges, shares: bins x steps) of ``point``, or None when no
    histogram was recorded; a step whose point saw no values is a column of NaN."""
    hsteps = timeline.arrays.get("hist_steps", np.zeros(0, dtype=np.int64))
    hists = []
    for step in hsteps.tolist():
        try:
            hists.append(timeline_histogram(timeline, point, step))
        except QvizError:  # no histograms for this point
            return None
    seen = [h for h in hists if h.total]
    if not seen:
        return None
    lo, hi = min(h.min for h in seen), max(h.max for h in seen)
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    edges[-1] = np.nextafter(hi, np.inf)  # the top value belongs to the last bin
    shares = np.full((bins, len(hists)), np.nan)
    for j, h in enumerate(hists):
        if h.total:
            shares[:, j] = _rebinned_shares(h, edges)
    return hsteps, edges, shares


def heatmap_columns(hsteps) -> np.ndarray:
    """x edges of the heat map: for each histogram step a column centred on it, half as wide as
    the closest gap between steps (2 steps for a single histogram), then an empty column to the
    next. A histogram is a sample at its step: blocks filling the gaps would claim the steps
    between (and before the first, after the last) were recorded too."""
    steps = np.asarray(hsteps, dtype=np.float64)
    half = np.diff(steps).min() / 4 if len(steps) > 1 else 1.0
    return np.column_stack([steps - half, steps + half]).ravel()


def _with_gaps(values: np.ndarray, fill=np.nan) -> np.ndarray:
    """bins x steps values with a column of ``fill`` between consecutive steps (heatmap_columns)."""
    shape = (values.shape[0], 2 * values.shape[1] - 1)
    out = np.full(shape, fill, dtype=np.result_type(values, np.asarray(fill)))
    out[:, ::2] = values
    return out


def heatmap_figure(timeline, point: str, events: pd.DataFrame) -> go.Figure:
    """What ``point`` saw at each histogram step (colour: log10 of the share of values per bin; a
    column centred on each step, see :func:`heatmap_columns`), the representable range of
    per-tensor points over the snapshot steps, events marked."""
    title = f"{point}: histogram over training"
    grid = histogram_grid(timeline, point)
    if grid is None:
        return figures.message_figure(
            title,
            "no histograms were recorded for this point: qviz.watch(model, histograms_every=N)",
        )
    hsteps, edges, shares = grid
    centers = (edges[:-1] + edges[1:]) / 2
    with np.errstate(divide="ignore"):
        z = np.where(shares > 0, np.log10(np.where(shares > 0, shares, 1.0)), np.nan)
    fig = go.Figure(
        go.Heatmap(
            x=heatmap_columns(hsteps),
            y=centers,
            z=_with_gaps(z),
            customdata=_with_gaps(shares),
            text=_with_gaps(np.broadcast_to(np.asarray(hsteps).astype(str), shares.shape), ""),
            hoverongaps=False,
            name="histogram",
            colorscale="Viridis",
            colorbar={"title": {"text": "log10 share"}},
            hovertemplate="step %{text}<br>value %{y:.4g}<br>%{customdata:.3%} of values"
            "<extra></extra>",
        )
    )
    info = next(p for p in timeline.points if p["name"] == point)
    steps, scale = timeline.series(point, "scale")
    _, zp = timeline.series(point, "zero_point")
    if scale.size and scale.shape[1] == 1:
        s, z0 = scale[:, 0].astype(np.float64), zp[:, 0].astype(np.float64)
        for bound, q in (("range low", info["quant_min"]), ("range high", info["quant_max"])):
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=(q - z0) * s,
                    name=bound,
                    mode="lines",
                    line={"color": "#d62728", "width": 1.5, "dash": "dash"},
                    hovertemplate="step %{x}<br>" + bound + " %{y:.4g}<extra></extra>",
                )
            )
        fig.update_yaxes(range=[float(edges[0]), float(edges[-1])])
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="value")
    _mark_events(fig, events)
    return figures.layout(fig, title, height=360)


def scalars_figure(timeline, events: pd.DataFrame) -> go.Figure:
    """The scalars logged with ``rec.log(...)`` (loss, kd_loss, lr, ...) over steps, events marked."""
    frame = timeline.scalars()
    if frame.empty:
        return figures.message_figure(
            "logged scalars", "nothing logged: call rec.log(loss=loss.item()) in the loop"
        )
    fig = go.Figure()
    for name in frame.columns:
        series = frame[name].dropna()
        fig.add_trace(
            go.Scatter(
                x=series.index.to_numpy(),
                y=series.to_numpy(dtype=np.float64),
                name=str(name),
                mode="lines",
                hovertemplate="step %{x}<br>" + str(name) + " %{y:.5g}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="training step")
    _mark_events(fig, events)
    return figures.layout(fig, "logged scalars (rec.log)", height=300)


class QatView(_StateView):
    """The selected layer's QAT timeline; the how-to when the session has none. Selecting a
    finding's row selects its layer."""

    def __init__(self, **params):
        super().__init__(**params)
        self.header = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.point_select = pn.widgets.Select(label="quantization point", options={}, width=380)
        self.qparams = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=520, name="qat qparams"
        )
        self.heatmap = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=360, name="qat histograms"
        )
        self.scalars = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=300, name="qat scalars"
        )
        self.findings = pn.widgets.Tabulator(
            pd.DataFrame(columns=FINDING_COLUMNS),
            disabled=True,
            selectable=1,
            show_index=False,
            layout="fit_data_stretch",
            sizing_mode="stretch_width",
            max_height=320,
            formatters={"evidence": {"type": "textarea"}, "fix": {"type": "textarea"}},
            widths={"evidence": 360, "fix": 360},
            label="findings",
        )
        self.empty = pn.pane.Markdown(HOW_TO_RECORD, sizing_mode="stretch_width", margin=(0, 10))
        self._layout = pn.Column(sizing_mode="stretch_width")
        self._timeline = self._diagnosis = None
        self._loading = False
        self.point_select.param.watch(self._on_point, "value")
        self.findings.param.watch(self._on_finding, "selection")
        self.state.param.watch(self._on_layer, "selected_layer")
        self.state.param.watch(self._on_version, "version")
        self._on_version()

    @property
    def timeline(self):
        return self._timeline

    # -- reacting to the state ---------------------------------------------------------------------
    def _on_version(self, *_):
        timeline = timeline_of(self.state.session)
        if timeline is not self._timeline:
            self._timeline = timeline
            self._diagnosis = (
                None
                if timeline is None
                else self._guard(
                    "the QAT findings",
                    lambda: diagnose(timeline),
                    lambda: pd.DataFrame(columns=FINDING_COLUMNS),
                )
            )
            self.findings.value = (
                pd.DataFrame(columns=FINDING_COLUMNS)
                if self._diagnosis is None
                else self._diagnosis[FINDING_COLUMNS].reset_index(drop=True)
            )
        if timeline is None:
            self._layout.objects = [self.empty]
            return
        self._layout.objects = [
            self.header,
            self.point_select,
            self.qparams,
            self.heatmap,
            self.scalars,
            pn.pane.Markdown(
                "#### Detector findings (select a row to select its layer)", margin=(0, 10)
            ),
            self.findings,
        ]
        self._on_layer()

    def _on_layer(self, *_):
        if self._timeline is None:
            return
        points = layer_points(self._timeline, self.state.selected_layer)
        options = {f"{p['name']} ({p['role']})": p["name"] for p in points}
        self._loading = True
        try:
            with pn.io.hold():
                self.point_select.options = options
                self.point_select.value = points[0]["name"] if points else None
        finally:
            self._loading = False
        self._redraw()

    def _on_point(self, *_):
        if not self._loading:
            self._redraw()

    def _on_finding(self, event):
        if event.new:
            select(self.state, self.findings.value["layer"].iloc[event.new[0]])

    # -- drawing --------------------------------------------------------------------------------
    def _redraw(self):
        tl, layer, point = self._timeline, self.state.selected_layer, self.point_select.value
        with pn.io.hold():
            self.header.object = self._guard("the QAT header", self._header, lambda: "")
            if point is None:
                text = f"no quantization point of {layer} was recorded in the timeline"
                self.qparams.object = figures.message_figure(f"{layer}: QAT timeline", text)
                self.heatmap.object = figures.message_figure(
                    f"{layer}: histogram over training", text
                )
            else:
                events = layer_events(tl, layer)
                self.qparams.object = self._guard(
                    "the QAT qparams chart",
                    lambda: qparams_figure(tl, point, events),
                    lambda: figures.message_figure(
                        f"{point} over training", "could not draw this chart"
                    ),
                )
                self.heatmap.object = self._guard(
                    "the QAT histogram heat map",
                    lambda: heatmap_figure(tl, point, events),
                    lambda: figures.message_figure(
                        f"{point}: histogram over training", "could not draw this chart"
                    ),
                )
            self.scalars.object = self._guard(
                "the logged scalars",
                lambda: scalars_figure(tl, layer_events(tl)),
                lambda: figures.message_figure("logged scalars", "could not draw this chart"),
            )

    def _header(self) -> str:
        tl, layer = self._timeline, self.state.selected_layer
        meta, steps = tl.meta, tl.arrays["steps"]
        found = (
            self._diagnosis
            if self._diagnosis is not None
            else pd.DataFrame(columns=FINDING_COLUMNS)
        )
        mine = int((found["layer"] == layer).sum())
        return f"**{md(layer)}** " + md(
            f"over {meta.get('steps', '?')} training steps: {len(steps)} snapshots (every "
            f"{meta.get('snapshot_stride', '?')} steps), {len(tl.arrays.get('hist_steps', []))} histograms, "
            f"events for this layer: {len(layer_events(tl, layer))} · findings: {len(found)}, {mine} for this layer"
        )

    def __panel__(self):
        return self._layout

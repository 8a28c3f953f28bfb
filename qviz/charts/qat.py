"""The QAT tab's charts over a recorded timeline (``results.timeline``, plain arrays): scale,
zero point and observed min/max over the snapshot steps (per-channel quantities as the median
over channels with a min-max band), the histogram over steps as a heat map, the logged scalars;
the run's events (a frame of step and kind) as labelled vertical lines on each.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qviz.capture.qat import timeline_histogram
from qviz.charts.layout import layout, message_figure
from qviz.errors import QvizError

HEATMAP_BINS = 80
_COLORS = {"scale": "#4c78a8", "zero_point": "#f58518", "min": "#54a24b", "max": "#e45756"}


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
    return layout(fig, title, height=520)


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
        return message_figure(
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
    return layout(fig, title, height=360)


def scalars_figure(timeline, events: pd.DataFrame) -> go.Figure:
    """The scalars logged with ``rec.log(...)`` (loss, kd_loss, lr, ...) over steps, events marked."""
    frame = timeline.scalars()
    if frame.empty:
        return message_figure(
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
    return layout(fig, "logged scalars (rec.log)", height=300)

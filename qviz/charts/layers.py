"""The Layers tab's charts (the HTML report draws the same): error along depth, the histogram of
a point's values against its representable range and grid, and the weight scales per channel.

Plain data in (the per-layer frame, point records), ``go.Figure`` out. Shapes carry a ``name``
("representable range", "grid", "selected", "threshold") so tests and callers can find them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qviz.charts.layout import AMBER, AMBER_DB, RED, RED_DB, layout, message_figure

IN_RANGE, CLIPPED = "#4c78a8", "#d62728"
BAND, TAIL = "rgba(44,160,44,0.13)", "rgba(214,39,40,0.18)"
MAX_BARS, MAX_GRID_LINES = 200, 64
_PER_TENSOR = ("per_tensor_affine", "per_tensor_symmetric")


# -- error along depth ----------------------------------------------------------------------------
def depth_figure(table: pd.DataFrame, selected: str | None = None, *, static: bool = False) -> go.Figure:
    """local_sqnr and output_sqnr per layer in depth order (x: layer names), selected layer marked,
    guide lines at the thresholds. ``static`` (the HTML report): no click hint in the title, and
    the guide lines dashed, 2 px, over the grid, each labelled with its dB at the right end: the
    app's faint dotted lines vanish in a report (on paper above all)."""
    ordered = table.sort_values("depth")
    layers = [str(n) for n in ordered.index]
    fig = go.Figure()
    for column, label, color in (("local_sqnr", "local SQNR", "#9467bd"), ("output_sqnr", "output SQNR", "#1f77b4")):
        values = [None if not np.isfinite(v) else float(v) for v in ordered[column].astype(float)]
        fig.add_trace(go.Scatter(
            x=layers, y=values, name=label, mode="lines+markers", customdata=layers,
            line={"color": color}, marker={"size": 8 if len(layers) <= 60 else 5},
            hovertemplate="%{x}<br>" + label + " %{y:.2f} dB<extra></extra>"))
    guide = {"layer": "above", "width": 2, "dash": "dash"} if static else {"layer": "below", "width": 1.5, "dash": "dot"}
    shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y,
               "name": "threshold", "layer": guide["layer"],
               "line": {"color": RED if y == RED_DB else AMBER, "width": guide["width"], "dash": guide["dash"]}}
              for y in (RED_DB, AMBER_DB)]
    if static:
        fig.update_layout(annotations=[
            {"x": 1, "xref": "paper", "xanchor": "right", "y": y, "yref": "y", "yanchor": "bottom",
             "text": f"{y:g} dB", "showarrow": False, "name": "threshold",
             "font": {"size": 11, "color": RED if y == RED_DB else AMBER}} for y in (RED_DB, AMBER_DB)])
    if selected in layers:
        shapes.append({"type": "line", "xref": "x", "x0": selected, "x1": selected, "yref": "paper", "y0": 0,
                       "y1": 1, "name": "selected", "line": {"color": "#444", "width": 2, "dash": "dash"}})
    fig.update_layout(shapes=shapes)  # at once: add_shape re-validates every shape on each call
    if len(layers) > 8:  # else plotly's "auto" turns the names only when they would overlap
        fig.update_xaxes(tickangle=-45)
    fig.update_xaxes(type="category")
    finite = [float(v) for c in ("local_sqnr", "output_sqnr") for v in ordered[c].astype(float) if np.isfinite(v)]
    if finite:  # the guide lines stay in view even when every layer is far above them
        lo, hi = min(*finite, RED_DB), max(*finite, AMBER_DB)
        pad = 0.06 * (hi - lo) + 1
        fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_yaxes(title_text="SQNR (dB)")
    fig.update_layout(clickmode="event", hovermode="closest")
    title = ("Own error (local SQNR) and accumulated error (output SQNR) along depth" if static
             else "Error along depth (click a point to select its layer)")
    return layout(fig, title)


# -- histogram ------------------------------------------------------------------------------------
def display_bins(counts: np.ndarray, edges: np.ndarray, max_bars: int = MAX_BARS,
                 cuts=()) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) for display: cropped to the non-empty bins, k adjacent bins merged
    (k = ceil(n / max_bars)), and split at each of ``cuts`` inside the data (e.g. the range
    limits, so that a bar is either inside or outside the range), a split bin's count shared
    out as if its values were uniform in it. Counts always sum to the total."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return np.zeros(0), np.zeros(1)
    a, b = nz[0], nz[-1] + 1
    n = b - a
    k = max(1, math.ceil(n / max_bars))
    m = math.ceil(n / k)
    width = float(edges[1] - edges[0])
    coarse = float(edges[a]) + np.arange(m + 1) * (k * width)
    inner = [float(c) for c in cuts if coarse[0] < c < coarse[-1]]
    out_edges = np.unique(np.concatenate([coarse, inner])) if inner else coarse
    cdf = np.concatenate([[0.0], np.cumsum(counts[a:b], dtype=np.float64)])
    fine = float(edges[a]) + np.arange(n + 1) * width
    return np.diff(np.interp(out_edges, fine, cdf)), out_edges


def quant_range(record) -> tuple[float, float] | None:
    """[(qmin - zp) * scale, (qmax - zp) * scale] for a per-tensor point, None otherwise."""
    info, arrays = record.info, record.arrays
    scale = np.asarray(arrays.get("scale", []), dtype=np.float64).reshape(-1)
    zp = np.asarray(arrays.get("zero_point", []), dtype=np.float64).reshape(-1)
    if scale.size != 1 or zp.size != 1 or "quant_min" not in info or not np.isfinite(scale[0]):
        return None
    s, z = float(scale[0]), float(zp[0])
    return (info["quant_min"] - z) * s, (info["quant_max"] - z) * s


def grid_levels(record, max_lines: int = MAX_GRID_LINES) -> np.ndarray:
    """Values of every k-th quantization level from qmin (k keeps at most ``max_lines`` lines)."""
    if quant_range(record) is None:
        return np.zeros(0)
    info = record.info
    s = float(np.asarray(record.arrays["scale"]).reshape(-1)[0])
    z = float(np.asarray(record.arrays["zero_point"]).reshape(-1)[0])
    qmin, qmax = int(info["quant_min"]), int(info["quant_max"])
    k = max(1, math.ceil((qmax - qmin + 1) / max_lines))
    return (np.arange(qmin, qmax + 1, k) - z) * s


def view_range(lo: float, hi: float, rng: tuple[float, float] | None) -> list[float]:
    """The x range of a histogram: the data with 5% either side, widened to each end of the
    representable range ``rng`` that lies near the data (within half the data's span): a
    range far wider than the data would squeeze every bar into a sliver."""
    span = (hi - lo) or abs(hi) or 1.0
    view = [lo - 0.05 * span, hi + 0.05 * span]
    if rng is not None:
        if lo - 0.5 * span <= rng[0] < view[0]:
            view[0] = rng[0] - 0.02 * span
        if view[1] < rng[1] <= hi + 0.5 * span:
            view[1] = rng[1] + 0.02 * span
    return view


def histogram_figure(record, layer: str, *, log_y: bool = True, max_bars: int = MAX_BARS) -> go.Figure:
    """Histogram of the values the point saw (bars from its counts/edges), the representable
    range as a shaded band, the clipped tails in red, and the quantization grid."""
    hist = record.stats.histogram
    title = f"{layer}: output activation ({record.name})"
    if hist.total == 0:
        return message_figure(title, "this point saw no finite values during calibration")
    rng = quant_range(record)
    counts, edges = display_bins(hist.counts, hist.edges, max_bars, cuts=rng or ())
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    outside = np.zeros(len(counts), dtype=bool) if rng is None else (centers < rng[0]) | (centers > rng[1])
    keep = counts > 0
    fig = go.Figure()
    for mask, name, color in ((~outside, "in range", IN_RANGE), (outside, "clipped", CLIPPED)):
        mask = mask & keep
        fig.add_trace(go.Bar(x=centers[mask], y=counts[mask], width=widths[mask], name=name,
                             marker={"color": color, "line": {"width": 0}},
                             hovertemplate="%{x:.4g}: %{y:.4~g} values<extra>" + name + "</extra>"))
    if rng is not None:
        band = {"type": "rect", "xref": "x", "x0": rng[0], "x1": rng[1], "yref": "paper", "y0": 0, "y1": 1,
                "fillcolor": BAND, "line": {"width": 0}, "layer": "below", "name": "representable range"}
        grid = [{"type": "line", "xref": "x", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                 "layer": "below", "name": "grid", "line": {"color": "rgba(0,0,0,0.12)", "width": 1}}
                for x in grid_levels(record).tolist()]
        tails = [{"type": "rect", "xref": "x", "x0": x0, "x1": x1, "yref": "paper", "y0": 0, "y1": 1,
                  "fillcolor": TAIL, "line": {"width": 0}, "layer": "below", "name": "clipped region"}
                 for x0, x1 in ((hist.min, rng[0]), (rng[1], hist.max)) if x0 < x1]
        fig.update_layout(shapes=[band, *tails, *grid])  # at once: add_shape is quadratic
        s = float(np.asarray(record.arrays["scale"]).reshape(-1)[0])
        z = int(np.asarray(record.arrays["zero_point"]).reshape(-1)[0])
        clip = hist.fraction_outside(*rng)
        detail = f"scale {s:.4g}, zero point {z}, range [{rng[0]:.4g}, {rng[1]:.4g}], clipped {clip:.3%}"
    elif record.role == "dynamic":
        detail = "dynamic: range computed per batch"
    elif np.asarray(record.arrays.get("scale", [])).size > 1:
        detail = "per-channel: no single range to draw"
    else:
        detail = ""
    fig.update_layout(barmode="overlay", bargap=0)
    fig.update_xaxes(title_text="value", range=view_range(edges[0], edges[-1], rng))
    if log_y:  # ticks at powers of ten only: low counts otherwise get a label at 2, 3, 4, 5, ...
        fig.update_yaxes(title_text="count", type="log", dtick=1)
    else:
        fig.update_yaxes(title_text="count", type="linear")
    return layout(fig, title, detail=detail)  # the numbers on their own line: a long name needs the room


# -- per-channel weights ---------------------------------------------------------------------------
def weight_scale_figure(record, layer: str) -> go.Figure:
    """The weight point's scale per output channel; per-group weights (torchao int4) show one
    bar per group, output channel by output channel; a per-tensor weight, see
    :func:`per_tensor_weight_figure`."""
    scale = np.asarray(record.arrays.get("scale", []), dtype=np.float64).reshape(-1)
    qscheme = str(record.info.get("qscheme", ""))
    unit = "group" if qscheme.startswith("per_group") else "channel"
    title, detail = f"{layer}: weight scale per {unit}", f"({qscheme})"
    if scale.size == 0:
        return message_figure(f"{title} {detail}", "no weight scale recorded for this layer")
    if scale.size == 1 and qscheme in _PER_TENSOR:
        return per_tensor_weight_figure(record, layer, float(scale[0]))
    zp = np.asarray(record.arrays.get("zero_point", np.zeros_like(scale)), dtype=np.float64).reshape(-1)
    if zp.size != scale.size:
        zp = np.broadcast_to(zp, scale.shape) if zp.size == 1 else np.zeros_like(scale)
    channels = np.arange(scale.size)
    fig = go.Figure(go.Bar(x=channels, y=scale, name="scale", customdata=zp, marker={"color": "#72b7b2"},
                           hovertemplate=unit + " %{x}<br>scale %{y:.4g}<br>zero point %{customdata}<extra></extra>"))
    if scale.size > 1 and scale.min() > 0:
        detail += f" · {scale.size} {unit}s, max/min {scale.max() / scale.min():.1f}x"
    fig.update_xaxes(title_text="output channel" if unit == "channel" else "group (output channel-major)")
    fig.update_yaxes(title_text="scale")
    return layout(fig, title, height=280, detail=detail)


def per_tensor_weight_figure(record, layer: str, scale: float) -> go.Figure:
    """A per-tensor weight: its one scale as a line over the scale each output channel would
    get on its own (its abs-max over qmax), so the channels that one scale serves badly show."""
    qscheme = str(record.info.get("qscheme", ""))
    absmax = np.asarray(record.arrays.get("channel_absmax", []), dtype=np.float64).reshape(-1)
    title, detail = f"{layer}: weight scale, one for the tensor", f"({qscheme}): {scale:.4g}"
    if absmax.size == 0:
        return message_figure(f"{title} {detail}", "one scale for the whole weight; no per-channel ranges were "
                              "recorded", 260)
    own = absmax / float(record.info.get("quant_max", 127))
    channels = np.arange(absmax.size)
    fig = go.Figure(go.Bar(x=channels, y=own, name="each channel's own scale (abs-max / qmax)",
                           marker={"color": "#72b7b2"},
                           hovertemplate="channel %{x}<br>own scale %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[-0.5, absmax.size - 0.5], y=[scale, scale], mode="lines", name="the tensor's scale",
                             line={"color": "#444", "dash": "dash"}, hoverinfo="skip"))
    fig.update_xaxes(title_text="output channel", range=[-0.5, absmax.size - 0.5])
    fig.update_yaxes(title_text="scale")
    return layout(fig, title, height=300, detail=detail)

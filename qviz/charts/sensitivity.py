"""The sensitivity chart, one for the dashboard's Sensitivity tab and the HTML report: the sweep
(``Session.sensitivity()``'s frame) as horizontal bars per layer in rank order, most sensitive
on top.

Two readings of one sweep. The ranking (``variants=None``, the report's): one bar from 0 per
layer, its length what the layer alone costs; for output_sqnr the output noise it alone adds,
in % of the output's power (noise powers add up, so bars compare as shares of the total). A pair
of variants (the dashboard's): the model's metric with "only this layer quantized" vs "all but
this layer", or "only its weight" vs "only its output activation", against a line at the
all-quantized model. Either way the ``selected`` layer's bars are outlined.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qviz.charts.layout import AMBER, RED, layout

LABELS = {
    "quantize_only": "only this layer quantized",
    "skip_only": "all but this layer quantized",
    "weight_only": "only its weight quantized",
    "activation_only": "only its output activation quantized",
}
COLORS = {"quantize_only": RED, "skip_only": "#4c78a8", "weight_only": "#72b7b2", "activation_only": AMBER}
#: The sweep's variant columns a ranking bar's hover lists besides the layer's sensitivity.
VARIANTS = tuple(LABELS)


def sensitivity_figure(frame: pd.DataFrame, variants: tuple[str, ...] | None = None, *,
                       selected: str | None = None, all_quantized: float | None = None,
                       metric: str | None = None) -> go.Figure:
    """The ``frame``'s layers in rank order: the ranking of each layer's cost (``variants``
    None), or bars of the model's metric under each of ``variants`` (columns of ``LABELS``) with
    a line (a shape named "all quantized") at ``all_quantized``. ``metric`` defaults to the
    frame's ``attrs["metric"]``, else output_sqnr."""
    ordered = frame.sort_values("rank", kind="stable") if "rank" in frame else frame
    layers = [str(n) for n in ordered.index]
    metric = metric or frame.attrs.get("metric") or "output_sqnr"
    outline = {"color": "#222", "width": [3 if n == selected else 0 for n in layers]}
    if variants is None:
        fig = _ranking(ordered, layers, metric, outline)
        bars = 1
    else:
        fig = _variants(ordered, layers, metric, outline, variants, all_quantized)
        bars = len(variants)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(barmode="group", clickmode="event", hovermode="closest")
    return layout(fig, f"Sensitivity ranking ({metric}): most sensitive on top",
                  height=max(320, 150 + 22 * bars * len(layers)),
                  detail="each layer measured on its own: the model with only it quantized, or only it left float")


def _ranking(ordered: pd.DataFrame, layers: list[str], metric: str, outline: dict) -> go.Figure:
    """One bar from 0 per layer: its ``sensitivity``, as the % of output power it adds for output_sqnr."""
    values = pd.to_numeric(ordered["sensitivity"], errors="coerce").to_numpy(dtype=float)
    noise = metric == "output_sqnr"
    bars = 100 * 10 ** (values / 10) if noise else values
    extra = [c for c in VARIANTS if c in ordered]
    first = "output noise %{x:.3g}% of its power" if noise else "sensitivity %{customdata[0]:.4g}"
    hover = "%{y}<br>" + first + "".join(
        f"<br>{c.replace('_', ' ')} %{{customdata[{i + 1}]:.4g}}" for i, c in enumerate(extra))
    custom = np.column_stack([values, *(ordered[c].to_numpy(dtype=float) for c in extra)])
    fig = go.Figure(go.Bar(
        x=[None if not math.isfinite(v) else float(v) for v in bars], y=layers, orientation="h",
        name="sensitivity", marker={"color": RED, "line": outline}, customdata=custom,
        hovertemplate=hover + "<extra></extra>"))
    fig.update_xaxes(title_text="output noise the layer alone adds (% of the output's power)" if noise
                     else f"sensitivity ({metric}): what the layer alone costs", rangemode="tozero")
    return fig


def _variants(ordered: pd.DataFrame, layers: list[str], metric: str, outline: dict,
              variants: tuple[str, ...], all_quantized: float | None) -> go.Figure:
    """A bar per variant per layer: the model's ``metric`` with that variant."""
    unit = " dB" if metric == "output_sqnr" else ""
    fig = go.Figure()
    for column in variants:
        values = [float(v) if np.isfinite(v) else None for v in ordered[column].astype(float)]
        fig.add_trace(go.Bar(
            y=layers, x=values, orientation="h", name=LABELS[column], customdata=layers,
            marker={"color": COLORS[column], "line": outline},
            hovertemplate="%{y}<br>" + LABELS[column] + ": %{x:.4g}" + unit + "<extra></extra>"))
    if all_quantized is not None and math.isfinite(all_quantized):
        fig.update_layout(shapes=[{"type": "line", "xref": "x", "x0": all_quantized, "x1": all_quantized,
                                   "yref": "paper", "y0": 0, "y1": 1, "name": "all quantized",
                                   "line": {"color": "#444", "width": 1, "dash": "dot"}}])
    fig.update_xaxes(title_text=f"model {metric} (dB)" if unit else f"model {metric}")
    return fig

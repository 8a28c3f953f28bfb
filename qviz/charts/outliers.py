"""The activation-outlier heat map: layers x input channels, plain data in, ``go.Figure`` out.

No Panel here, so the dashboard's Outliers tab and the HTML report draw the same figure.
Layers whose inputs have different widths (a BERT layer's 384-wide and 1536-wide linear
inputs) get one panel each, stacked, so every panel's channels span the full width instead of
a 384-wide row filling a quarter of a 1536-wide one. Colour is log10 of the value (outliers
are tens of times the median channel, ordinary channels a fraction of it), on one colour bar
labelled in the values themselves; the hover shows the exact value.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qviz.charts.layout import RED, TEMPLATE

TITLES = {"ratio_to_median": "abs-max / layer's median channel", "absmax": "abs-max"}
SELECTED_COLOR = RED
ROW_PX, PANEL_GAP_PX, TOP_PX, BOTTOM_PX = 15, 70, 60, 50


def width_groups(matrix: pd.DataFrame) -> list[tuple[int, list[str]]]:
    """``(input width, layers)`` per distinct width, in the order the widths first appear."""
    widths = matrix.notna().sum(axis=1)
    groups: dict[int, list[str]] = {}
    for layer, width in widths.items():
        groups.setdefault(int(width), []).append(str(layer))
    return list(groups.items())


def _ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks at 1, 2, 5 x powers of ten within [10**low, 10**high], labelled as values."""
    values = [m * 10.0**e for e in range(math.floor(low) - 1, math.ceil(high) + 1) for m in (1, 2, 5)]
    inside = [v for v in values if low - 1e-9 <= math.log10(v) <= high + 1e-9]
    return [math.log10(v) for v in inside], [f"{v:g}" for v in inside]


def outlier_heatmap(matrix: pd.DataFrame, value: str = "ratio_to_median", selected: str | None = None,
                    title: str | None = None) -> go.Figure:
    """The heat map of ``matrix`` (rows: layers, columns: channel indices, NaN past a layer's
    width; see ``DashboardState.channel_matrix``): one panel per input width, the ``selected``
    layer's row outlined (a shape named "selected") and its tick label in bold."""
    groups = width_groups(matrix)
    heights = [len(layers) for _, layers in groups]
    fig = make_subplots(rows=len(groups), cols=1, row_heights=heights,
                        vertical_spacing=min(0.3, PANEL_GAP_PX / (ROW_PX * sum(heights) + PANEL_GAP_PX * len(groups))),
                        subplot_titles=[f"inputs of {w} channels ({len(ls)} layers)" for w, ls in groups])
    positive = matrix.to_numpy(dtype=float)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    low, high = (math.log10(positive.min()), math.log10(positive.max())) if positive.size else (0.0, 1.0)
    if high - low < 0.3:  # one flat layer: still a readable bar
        low, high = low - 0.15, high + 0.15
    for row, (width, layers) in enumerate(groups, start=1):
        raw = matrix.loc[layers].iloc[:, :width].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(raw > 0, np.log10(raw), np.nan)
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(width)), y=layers, customdata=raw, coloraxis="coloraxis", hoverongaps=False,
            name=f"{width} channels",
            hovertemplate="%{y}<br>channel %{x}<br>" + TITLES[value] + " %{customdata:.4g}<extra></extra>"),
            row=row, col=1)
        ticktext = [f"<b>{n}</b>" if n == selected else n for n in layers]
        fig.update_yaxes(type="category", autorange="reversed", tickvals=layers, ticktext=ticktext,
                         tickfont={"size": 11}, row=row, col=1)
        fig.update_xaxes(title_text="input channel" if row == len(groups) else None, range=[-0.5, width - 0.5],
                         row=row, col=1)
        if selected in layers:
            i = layers.index(selected)
            axis = "" if row == 1 else str(row)
            fig.add_shape(type="rect", xref=f"x{axis}", yref=f"y{axis}", x0=-0.5, x1=width - 0.5,
                          y0=i - 0.5, y1=i + 0.5, line={"color": SELECTED_COLOR, "width": 2},
                          fillcolor="rgba(0,0,0,0)", name="selected")
    tickvals, ticktext = _ticks(low, high)
    fig.update_layout(
        coloraxis={"colorscale": "Viridis", "cmin": low, "cmax": high,
                   "colorbar": {"title": {"text": TITLES[value], "side": "right"}, "tickvals": tickvals,
                                "ticktext": ticktext, "thickness": 14, "len": 1.0, "y": 0.5, "yanchor": "middle",
                                "x": 1.0, "xanchor": "left", "xpad": 8}},
        height=TOP_PX + BOTTOM_PX + ROW_PX * sum(heights) + PANEL_GAP_PX * (len(groups) - 1),
        title={"text": title or f"Activation outliers: {TITLES[value]} of each linear layer's input channels",
               "x": 0.01, "font": {"size": 14}},
        margin={"l": 10, "r": 110, "t": TOP_PX, "b": BOTTOM_PX}, template=TEMPLATE)
    for annotation in fig.layout.annotations:  # the panel titles: small, left-aligned
        annotation.update(font={"size": 12}, x=0, xanchor="left")
    return fig

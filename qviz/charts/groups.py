"""The weight-group heat map of one Linear layer: groups x output channels, plain data in,
``go.Figure`` out.

No Panel here, so the dashboard's Groups tab and the HTML report draw the same figure from
``Session.weight_groups()``'s frame. Output channels run along x (a layer has hundreds to
thousands), groups of input columns along y (one row per group, a handful to tens); the colour
is the group's SQNR in dB (dark: the groups int4 spoils) or its scale, and the hover shows both,
with the input columns the group covers. The worst group is outlined (a shape named "worst").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qviz.analysis.groups import group_matrix
from qviz.charts.layout import RED, TEMPLATE

TITLES = {"sqnr": "SQNR (dB)", "scale": "scale"}
ROW_PX, MIN_PLOT_PX, MAX_PLOT_PX, TOP_PX, BOTTOM_PX = 14, 140, 520, 60, 50
SOURCES = {"torchao": "torchao's own scales", "what-if": "what-if from the float weight"}


def group_heatmap(frame: pd.DataFrame, value: str = "sqnr", title: str | None = None) -> go.Figure:
    """The heat map of ``frame`` (``Session.weight_groups()``: one row per output channel and
    group, ``attrs`` naming the layer, group size and source), coloured by ``value``."""
    attrs = frame.attrs
    size = attrs["group_size"]
    sqnr, scale = group_matrix(frame, "sqnr"), group_matrix(frame, "scale")
    groups, channels = sqnr.shape
    shown = np.where(np.isfinite(sqnr), sqnr, np.nan) if value == "sqnr" else scale
    first = np.arange(groups)[:, None] * size
    custom = np.stack([np.broadcast_to(first, sqnr.shape), np.broadcast_to(first + size - 1, sqnr.shape),
                       sqnr, scale], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=shown, x=list(range(channels)), y=list(range(groups)), customdata=custom, colorscale="Viridis",
        hoverongaps=False, name="groups",
        colorbar={"title": {"text": TITLES[value], "side": "right"}, "thickness": 14, "len": 1.0, "y": 0.5,
                  "yanchor": "middle", "x": 1.0, "xanchor": "left", "xpad": 8},
        hovertemplate=("output channel %{x}<br>group %{y} (inputs %{customdata[0]}–%{customdata[1]})"
                       "<br>SQNR %{customdata[2]:.2f} dB<br>scale %{customdata[3]:.4g}<extra></extra>")))
    finite = np.where(np.isfinite(sqnr), sqnr, np.inf)
    if np.isfinite(finite).any():
        g, c = np.unravel_index(np.argmin(finite), finite.shape)
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=g - 0.5, y1=g + 0.5, name="worst",
                      line={"color": RED, "width": 2}, fillcolor="rgba(0,0,0,0)")
    plot = min(MAX_PLOT_PX, max(MIN_PLOT_PX, ROW_PX * groups))
    ticks = {"tickvals": list(range(groups))} if groups <= 16 else {"tickmode": "auto", "nticks": 12}
    fig.update_yaxes(title_text=f"group of {size} inputs", autorange="reversed", **ticks)
    fig.update_xaxes(title_text="output channel", range=[-0.5, channels - 0.5])
    fig.update_layout(
        height=TOP_PX + BOTTOM_PX + plot,
        title={"text": title or f"{attrs['layer']}: int4 weight groups of {size} ({SOURCES[attrs['source']]}), "
                                f"{TITLES[value]}", "x": 0.01, "font": {"size": 14}},
        margin={"l": 10, "r": 110, "t": TOP_PX, "b": BOTTOM_PX}, template=TEMPLATE)
    return fig

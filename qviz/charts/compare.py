"""The Compare tab's chart: two sessions' output SQNR along depth, from the per-layer
differences frame (``qviz.ui.compare_view.layer_differences``: ``output_sqnr_a`` / ``_b``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from qviz.charts.layout import layout

_COLORS = {"A": "#1f77b4", "B": "#ff7f0e"}


def compare_depth_figure(diff: pd.DataFrame, selected=None) -> go.Figure:
    """Output SQNR of A and B per layer along depth (x: layer names), the selected layer marked."""
    layers = [str(n) for n in diff.index]
    fig = go.Figure()
    for side in ("A", "B"):
        values = [
            None if not np.isfinite(v) else float(v) for v in diff[f"output_sqnr_{side.lower()}"]
        ]
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=values,
                name=f"{side}: output SQNR",
                mode="lines+markers",
                line={"color": _COLORS[side]},
                connectgaps=False,
                hovertemplate="%{x}<br>" + side + " output SQNR %{y:.2f} dB<extra></extra>",
            )
        )
    shapes = []
    if selected in layers:
        shapes.append(
            {
                "type": "line",
                "xref": "x",
                "x0": selected,
                "x1": selected,
                "yref": "paper",
                "y0": 0,
                "y1": 1,
                "name": "selected",
                "line": {"color": "#444", "width": 2, "dash": "dash"},
            }
        )
    fig.update_layout(shapes=shapes, clickmode="event", hovermode="closest")
    fig.update_xaxes(type="category", tickangle=-45 if len(layers) > 8 else 0)
    fig.update_yaxes(title_text="output SQNR (dB)")
    return layout(
        fig, "A vs B: output SQNR along depth (click a point to select its layer)"
    )

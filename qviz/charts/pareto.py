"""The Mixed-precision tab's chart: a search's candidates (``SearchResult.candidates``) as
weight size vs output SQNR, the Pareto front, the target, the plan found and the plan in force."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from qviz.charts.layout import AMBER, GREEN, RED, TEMPLATE

TITLE = "Size vs error of the plans tried (click a point to apply its plan)"


def _finite(values) -> list:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def pareto_figure(
    candidates: pd.DataFrame,
    front: pd.DataFrame,
    target: float | None = None,
    found: int | None = None,
    in_force: int | None = None,
) -> go.Figure:
    """Every candidate (weight bytes vs output SQNR; green when it meets the target), the Pareto
    front as a line, the plan ``found`` as a star and the plan ``in_force`` ringed. Each point's
    customdata is its candidate's step."""
    colors = [GREEN if meets else "#999" for meets in candidates["meets_target"]]
    hover = "step %{customdata}: %{text}<br>%{x:,} weight bytes<br>output SQNR %{y:.2f} dB<extra></extra>"

    def points(rows, name, **style):
        return go.Scatter(
            x=rows["weight_bytes"].tolist(),
            y=_finite(rows["output_sqnr"]),
            customdata=rows["step"].tolist(),
            text=rows["changed"].tolist(),
            name=name,
            hovertemplate=hover,
            **style,
        )

    fig = go.Figure(
        [
            points(candidates, "candidates", mode="markers", marker={"color": colors, "size": 9}),
            points(
                front,
                "Pareto front",
                mode="lines+markers",
                marker={"color": "#4c78a8", "size": 11},
                line={"color": "#4c78a8", "width": 2},
            ),
        ]
    )
    for step, name, marker in (
        (found, "plan found", {"symbol": "star", "size": 18, "color": AMBER}),
        (
            in_force,
            "plan in force",
            {"symbol": "circle-open", "size": 22, "color": "#222", "line": {"width": 2}},
        ),
    ):
        if step is not None:
            rows = candidates[candidates["step"] == step]
            fig.add_trace(points(rows, name, mode="markers", marker=marker))
    if target is not None:
        fig.update_layout(
            shapes=[
                {
                    "type": "line",
                    "xref": "paper",
                    "x0": 0,
                    "x1": 1,
                    "yref": "y",
                    "y0": target,
                    "y1": target,
                    "name": "target",
                    "line": {"color": RED, "width": 1, "dash": "dot"},
                }
            ]
        )
    fig.update_xaxes(title_text="weight size (bytes)")
    fig.update_yaxes(title_text="model output SQNR (dB)")
    fig.update_layout(
        title={"text": TITLE, "x": 0.01, "font": {"size": 14}},
        clickmode="event",
        hovermode="closest",
        template=TEMPLATE,
        height=420,
        margin={"l": 60, "r": 15, "t": 40, "b": 45},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
    )
    return fig

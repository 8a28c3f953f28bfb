"""The Graph tab's chart: a laid-out :class:`qviz.analysis.graph.ModelGraph` (layers, residual
adds, concatenations, module groups) drawn top to bottom, each layer coloured by a figure, the
selected layer's node ringed.
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go

from qviz.analysis.graph import FIGURES, ModelGraph
from qviz.charts.layout import layout

MAX_LABELS = 120  # names written beside the nodes up to this many nodes (beyond: on hover)
_LEVEL_PX, _MIN_PX, _MAX_PX = 38, 420, 2400
_STYLE = {  # kind -> (legend name, marker symbol, size, fill)
    "add": ("add", "diamond", 15, "#d9d9d9"),
    "cat": ("cat", "hexagon", 15, "#d9d9d9"),
    "input": ("input / output", "triangle-down", 13, "#ffffff"),
    "output": ("input / output", "triangle-down", 13, "#ffffff"),
}


def _hover(graph: ModelGraph, figure: str) -> list[str]:
    label = FIGURES[figure][0]
    lines = []
    for name, node in graph.nodes.iterrows():
        text = f"<b>{html.escape(str(name))}</b>"
        if node["kind"] == "group":
            text += f"<br>{len(node['members'])} layers (worst shown)"
        elif node["kind"] == "layer":
            text += f"<br>{html.escape(str(node.get('type', '')))}, {html.escape(str(node.get('dtype', '')))}"
        else:
            text += f"<br>{node['kind']}"
        if node["kind"] in ("layer", "group"):
            value = node.get(figure, math.nan)
            text += f"<br>{label}: " + (f"{value:.4g}" if np.isfinite(value) else "n/a")
        lines.append(text)
    return lines


def ring_at(graph: ModelGraph, selected: str | None) -> list:
    """[x, y, node name] of the node that holds layer ``selected`` (itself or its group); [] if none."""
    for name, node in graph.nodes.iterrows():
        if selected is not None and selected in node["members"]:
            return [node["x"], node["y"], str(name)]
    return []


def graph_figure(graph: ModelGraph, figure: str, selected: str | None = None) -> go.Figure:
    """The laid-out ``graph``: edges as lines along their routes, layers and groups coloured by
    ``figure`` (red is worse; grey where a layer has none), adds, cats, inputs and the output as
    grey shapes of their own, the node of ``selected`` ringed (a trace named "selected", empty
    when no node holds it)."""
    nodes = graph.nodes
    label, lower_is_worse = FIGURES[figure]
    xs, ys = [], []
    for ex, ey in zip(graph.edges["xs"], graph.edges["ys"], strict=True):
        xs += [*ex, None]
        ys += [*ey, None]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#9aa5b1", "width": 1.2},
                               hoverinfo="skip", showlegend=False, name="edges"))
    hover = np.array(_hover(graph, figure), dtype=object)
    names = np.array([str(n) for n in nodes.index], dtype=object)
    text = names if len(nodes) <= MAX_LABELS else np.full(len(nodes), "", dtype=object)
    text = np.array([html.escape(t) for t in text], dtype=object)
    kind = nodes["kind"].to_numpy()
    values = nodes[figure].to_numpy(dtype=float) if figure in nodes else np.full(len(nodes), np.nan)
    scored = np.isin(kind, ("layer", "group"))
    coloured, grey = scored & np.isfinite(values), scored & ~np.isfinite(values)
    common = {"mode": "markers+text", "textposition": "middle right", "textfont": {"size": 11},
              "hovertemplate": "%{hovertext}<extra></extra>"}
    levels = int(nodes["level"].max()) + 1 if len(nodes) else 1
    height = int(np.clip(_LEVEL_PX * levels + 110, _MIN_PX, _MAX_PX))
    scale = float(np.clip((height - 110) / levels / _LEVEL_PX, 0.5, 1))  # markers shrink with the levels' spacing
    sizes = np.where(kind == "group", 19, 13) * scale
    symbols = np.where(kind == "group", "square", "circle")
    if coloured.any():
        finite = values[coloured]
        fig.add_trace(go.Scatter(
            x=nodes["x"][coloured], y=nodes["y"][coloured], text=text[coloured], hovertext=hover[coloured],
            customdata=names[coloured], name="layers", showlegend=False, **common,
            marker={"color": finite, "colorscale": "RdYlGn" if lower_is_worse else "RdYlGn_r",
                    "size": sizes[coloured], "symbol": symbols[coloured], "line": {"color": "#333", "width": 1},
                    "cmin": float(finite.min()), "cmax": float(finite.max()) if finite.max() > finite.min()
                    else float(finite.min()) + 1,
                    "colorbar": {"title": {"text": label, "side": "right"}, "thickness": 14,
                                 # at most 300 px, from the top: in view on a tall graph, never below the plot
                                 "len": min(1.0, 300 / (height - 115)), "lenmode": "fraction", "y": 1, "yanchor": "top",
                                 "x": 1, "xanchor": "left"}}))
    if grey.any():
        fig.add_trace(go.Scatter(
            x=nodes["x"][grey], y=nodes["y"][grey], text=text[grey], hovertext=hover[grey],
            customdata=names[grey], name=f"no {label.split(' (')[0]}", **common,
            marker={"color": "#bdbdbd", "size": sizes[grey], "symbol": symbols[grey],
                    "line": {"color": "#333", "width": 1}}))
    if (kind == "group").any():  # a legend entry only: groups are coloured like layers
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="module group (its worst layer)",
                                 marker={"color": "#ffffff", "size": 13, "symbol": "square",
                                         "line": {"color": "#333", "width": 1}}))
    for legend in dict.fromkeys(_STYLE[k][0] for k in kind if k in _STYLE):
        mask = np.array([k in _STYLE and _STYLE[k][0] == legend for k in kind])
        style = _STYLE[kind[mask][0]]
        fig.add_trace(go.Scatter(
            x=nodes["x"][mask], y=nodes["y"][mask], text=text[mask], hovertext=hover[mask],
            customdata=names[mask], name=legend, **common,
            marker={"color": style[3], "size": style[2] * scale, "symbol": style[1], "line": {"color": "#333", "width": 1.5}}))
    ring = ring_at(graph, selected)
    fig.add_trace(go.Scatter(x=ring[:1], y=ring[1:2], customdata=ring[2:], mode="markers", name="selected",
                             hoverinfo="skip", showlegend=False,
                             marker={"size": 30 * scale, "symbol": "circle-open", "color": "#222",
                                     "line": {"width": 3, "color": "#222"}}))
    width = float(nodes["x"].max()) if len(nodes) else 0.0
    # at least 6 columns wide, so that a narrow graph is not stretched across the page
    fig.update_xaxes(visible=False, range=[-0.6, max(width + (1.6 if len(nodes) <= MAX_LABELS else 0.6), 6)])
    fig.update_yaxes(visible=False, range=[-levels + 0.4, 0.6])
    title = "Model graph (click a node to select its layer)"
    layout(fig, title, height=height)
    fig.update_layout(clickmode="event", hovermode="closest", dragmode="pan", margin={"l": 15, "r": 15})
    return fig

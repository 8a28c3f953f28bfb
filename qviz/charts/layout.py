"""The house look every qviz chart shares: the palette, the SQNR thresholds and their colours,
the plotly template, :func:`layout` (title, detail line, legend band) and :func:`message_figure`.

Every module of :mod:`qviz.charts` builds on this one; it imports nothing of qviz.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

#: SQNR colour thresholds (dB): red below RED, amber below AMBER, green above.
RED_DB, AMBER_DB = 20.0, 30.0
RED, AMBER, GREEN = "#d62728", "#ff9f1c", "#2ca02c"


def sqnr_color(value: float) -> str | None:
    """Red / amber / green for an SQNR in dB; None when it is not a number."""
    if value is None or not np.isfinite(value):
        return None
    return RED if value < RED_DB else AMBER if value < AMBER_DB else GREEN


_GRID, _INK = "#EBF0F8", "#2a3f5f"
_AXIS = {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "zerolinewidth": 2, "ticks": "",
         "automargin": True, "title": {"standoff": 15}}
#: The 2-D part of plotly's "plotly_white" look. The full template is 6.5 KB per figure, and it
#: costs 15 ms to build on the server and more to apply in the browser, for 3-D, polar and geo
#: settings no qviz chart has.
TEMPLATE = go.layout.Template(layout={
    "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880"],
    "font": {"color": _INK}, "hovermode": "closest", "hoverlabel": {"align": "left"},
    "paper_bgcolor": "white", "plot_bgcolor": "white", "xaxis": _AXIS, "yaxis": _AXIS,
    "shapedefaults": {"line": {"color": _INK}},
    "annotationdefaults": {"arrowcolor": _INK, "arrowhead": 0, "arrowwidth": 1},
})


def layout(fig: go.Figure, title: str, height: int = 320, detail: str = "") -> go.Figure:
    """The house look: the title (and a smaller ``detail`` line under it) at the top left, the
    legend, when there is one, in its own band between them and the plot. Beside the title the
    legend ran over long titles on narrow screens; here it lies over neither title nor data."""
    text = f"{title}<br><span style='font-size: 12px'>{detail}</span>" if detail else title
    legend = sum(trace.showlegend is not False for trace in fig.data) > 1
    top = 40 + (20 if detail else 0) + (24 if legend else 0)
    fig.update_layout(title={"text": text, "x": 0.01, "y": 1, "yref": "container", "yanchor": "top",
                             "pad": {"t": 14}, "font": {"size": 14}},
                      height=height, margin={"l": 55, "r": 15, "t": top, "b": 45}, template=TEMPLATE,
                      legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1, "yanchor": "bottom"})
    return fig


def message_figure(title: str, text: str, height: int = 320) -> go.Figure:
    """An empty figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 13, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return layout(fig, title, height)

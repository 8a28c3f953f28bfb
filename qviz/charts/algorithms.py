"""The Algorithms tab's chart: each algorithm's gain in layer output SQNR over round-to-nearest
(``Session.algorithms()``'s frame), an algorithm that did nothing labelled so on its bar."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from qviz.charts.layout import AMBER, GREEN, RED

DID_NOTHING = "did nothing"


def gain_figure(frame: pd.DataFrame, layer: str) -> go.Figure:
    """Bars of ``gain_vs_rtn_db`` per algorithm (RTN, the baseline, left out), "did nothing"
    written on the bars of the algorithms that equal RTN."""
    rows = frame[frame.algorithm != "rtn"]
    gains = rows.gain_vs_rtn_db.astype(float)
    colors = [AMBER if n else (GREEN if g > 0 else RED)
              for g, n in zip(gains, rows.did_nothing, strict=True)]
    text = [DID_NOTHING if n else f"{g:+.2f} dB" for g, n in zip(gains, rows.did_nothing, strict=True)]
    fig = go.Figure(go.Bar(x=list(rows.algorithm), y=list(gains), marker_color=colors, text=text,
                           textposition="outside", cliponaxis=False,
                           customdata=list(rows.note), hovertemplate="%{x}: %{y:+.3f} dB<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=dict(text=f"Gain in layer output SQNR over RTN: {layer}", x=0.01),
                      yaxis_title="dB vs RTN", height=320, margin=dict(l=60, r=20, t=50, b=40),
                      plot_bgcolor="white")
    span = max(1.0, float(gains.abs().max()) if len(gains) else 1.0)
    fig.update_yaxes(range=[min(-0.3 * span, float(gains.min()) * 1.3 if len(gains) else 0), span * 1.3],
                     zeroline=True, zerolinecolor="#888", gridcolor="#eee")
    return fig

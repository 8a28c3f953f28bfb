"""The sensitivity report: one self-contained HTML file for a session.

``write_report(session, path)`` writes it (atomically); ``build_report(session)`` returns the
text. plotly.js is inlined once and every figure is a plotly div, so the file opens offline
and refers to no other host. Sections: the model-level summary, the sensitivity ranking, the
error along depth, histograms of the worst layers, the diagnosis, the plan in force with its
code, and the per-layer table. The sensitivity sweep and the diagnosis are looked up at run
time; when a session has none, their sections say how to get them.

Numbers in tables show 5 significant digits; each numeric cell also carries the exact value
in its ``data-value`` attribute (``repr`` of the float), so nothing is lost to rounding.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gzip
import html
import json
import math
import numbers
import pathlib

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from qviz.analysis.diagnosis import diagnose
from qviz.analysis.groups import linear_rows, worst_groups
from qviz.analysis.outliers import channel_matrix
from qviz.charts.groups import group_heatmap
from qviz.charts.layers import depth_figure, histogram_figure
from qviz.charts.layout import AMBER_DB, RED_DB, message_figure, sqnr_color
from qviz.charts.outliers import outlier_heatmap
from qviz.charts.sensitivity import sensitivity_figure
from qviz.errors import QvizError
from qviz.io.atomic import atomic_write, check_target
from qviz.report.template import CSS, LOADER, PAGE
from qviz.results import output_record
from qviz.version import __version__

#: How many of the worst layers (by local_sqnr) get a histogram.
WORST_LAYERS = 4
#: The outlier table: at most this many channels per layer, this many rows in all.
OUTLIER_CHANNELS, OUTLIER_ROWS = 3, 30
#: The weight-group table: this many layers, those whose worst int4 group loses most.
GROUP_LAYERS = 8
SENSITIVITY_COLUMNS = ("rank", "quantize_only", "skip_only", "weight_only", "activation_only",
                       "sensitivity", "float_metric")
_SQNR_COLUMNS = ("weight_sqnr", "local_sqnr", "output_sqnr")
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_NAV = (("summary", "Summary"), ("sensitivity", "Sensitivity"), ("depth", "Error along depth"),
        ("histograms", "Worst layers"), ("outliers", "Outliers"), ("groups", "Weight groups"),
        ("diagnosis", "Diagnosis"), ("plan", "Plan"),
        ("layers", "Per-layer table"))


def _e(value) -> str:
    return html.escape(str(value), quote=True)


# -- cells and tables -----------------------------------------------------------------------------
def format_number(value) -> str:
    """How a table shows a number: 5 significant digits, "–" for NaN."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "–"
    return f"{value:.5g}"


def _cell(value, color: str | None = None) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Number):
        return f"<td>{_e('' if value is None else value)}</td>"
    exact = str(int(value)) if isinstance(value, numbers.Integral) else repr(float(value))
    style = f' style="color:{color}"' if color else ""
    return f'<td class="num" data-value="{_e(exact)}"{style}>{_e(format_number(value))}</td>'


def frame_table(frame: pd.DataFrame, *, table_id: str, caption: str = "",
                index: bool = True, sqnr_columns=()) -> str:
    """A frame as an HTML table: a header row of column names, one row per frame row (the index
    as a row header when ``index``); SQNR columns coloured red/amber/green."""
    head = ([f'<th scope="col">{_e(frame.index.name or "")}</th>'] if index else [])
    head += [f'<th scope="col">{_e(c)}</th>' for c in frame.columns]
    rows = []
    for key, row in zip(frame.index, frame.itertuples(index=False), strict=True):
        cells = [f'<th scope="row">{_e(key)}</th>'] if index else []
        for column, value in zip(frame.columns, row, strict=True):
            color = sqnr_color(float(value)) if column in sqnr_columns and _is_real(value) else None
            cells.append(_cell(value, color))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table id="{_e(table_id)}">{cap}<thead><tr>{"".join(head)}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _figure(fig: go.Figure, fig_id: str) -> str:
    """A figure's div and the script that draws it once plotly.js is unpacked (see PAGE)."""
    height = fig.layout.height or 450
    spec = fig.to_json().replace("</", "<\\/")  # JSON inside <script>: no closing tag in strings
    return (f'<div class="figure"><div id="{_e(fig_id)}" class="plotly-graph-div" style="height:{height}px">'
            f'</div><script>qvizPlot("{_e(fig_id)}", {spec}, {json.dumps(_PLOT_CONFIG)});</script></div>')


@functools.lru_cache(maxsize=1)
def packed_plotlyjs() -> str:
    """plotly.js gzipped and base64-encoded: a third of its 4.6 MB; the page unpacks it with the
    browser's DecompressionStream (every current browser has it), offline."""
    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# -- what the session holds -----------------------------------------------------------------------
def _results(session):
    results = getattr(session, "results", None)
    if results is None:
        raise QvizError("this session has not run yet: call session.run() before session.report()")
    return results


def sensitivity_frame(results) -> pd.DataFrame | None:
    """The sensitivity sweep stored with the results (``session.sensitivity()``), or None."""
    frame = getattr(results, "sensitivity", None)
    return frame if isinstance(frame, pd.DataFrame) else None


def _sensitivity_metric(results, frame: pd.DataFrame) -> str:
    meta = getattr(results, "meta", None) or {}
    return str(frame.attrs.get("metric") or getattr(results, "sensitivity_metric", None)
               or meta.get("sensitivity_metric") or "the metric")


def worst_layers(table: pd.DataFrame, n: int = WORST_LAYERS) -> list[str]:
    """The quantized layers with the lowest local_sqnr (their own error), worst first."""
    quantized = table[table["quantized"].astype(bool)] if "quantized" in table else table
    local = pd.to_numeric(quantized["local_sqnr"], errors="coerce")
    return [str(i) for i in local[np.isfinite(local)].sort_values(kind="stable").index[:n]]


# -- sections -------------------------------------------------------------------------------------
def _kib(n) -> str:
    return f"{n / 1024:.1f} KiB"


def _summary_section(results) -> str:
    s, meta, table = results.summary, results.meta, results.table
    rows = []
    sqnr = s.get("output_sqnr")
    rows.append(("model output SQNR", "not measured" if sqnr is None else f"{sqnr:.2f} dB"))
    top1 = s.get("top1_agreement")
    rows.append(("top-1 agreement with float", "not measured (outputs are not class scores)"
                 if top1 is None else f"{top1:.2%}"))
    size, fsize = s.get("size_bytes"), s.get("float_size_bytes")
    if size and fsize:
        rows.append(("size vs float", f"{_kib(size)} vs {_kib(fsize)} float "
                     f"({size / fsize:.1%}, {fsize / size:.2f}x smaller)"))
    quantized = int(table["quantized"].astype(bool).sum()) if "quantized" in table else len(table)
    rows.append(("layers", f"{len(table)} ({quantized} quantized, {len(table) - quantized} float)"))
    worst = worst_layers(table, 1)
    if worst:
        rows.append(("worst layer (own error)",
                     f"{worst[0]}: local SQNR {float(table.loc[worst[0], 'local_sqnr']):.2f} dB"))
    rows += [("flow", meta.get("flow", "?")), ("backend", meta.get("backend", "?")),
             ("torch", meta.get("torch", "?")), ("qviz", meta.get("qviz", "?"))]
    shown = {"output_sqnr", "top1_agreement", "size_bytes", "float_size_bytes"}
    for key, value in s.items():
        if key in shown:
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "none"
        elif _is_real(value):
            value = format_number(value)
        rows.append((key.replace("_", " "), value))
    body = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in rows)
    return (f'<section id="summary"><h2>Summary</h2><div class="table-wrap">'
            f'<table class="summary" id="summary-table"><tbody>{body}</tbody></table></div></section>')


def _sensitivity_section(frame: pd.DataFrame | None, metric: str) -> str:
    head = '<section id="sensitivity"><h2>Sensitivity</h2>'
    if frame is None:
        return head + _note("no sensitivity sweep in this session: run s.sensitivity() (then "
                            "s.report(...) or s.save(...) again) to rank the layers") + "</section>"
    if frame.empty:
        return head + _note("the sensitivity sweep found no layers to rank") + "</section>"
    columns = [c for c in SENSITIVITY_COLUMNS if c in frame] + [c for c in frame if c not in SENSITIVITY_COLUMNS]
    how = ("-quantize_only: the output noise this layer alone adds, in dB relative to the signal; "
           "the bars show that noise in % of the output's power (noise powers add up across layers)"
           if metric == "output_sqnr" else "float_metric - quantize_only: what this layer alone costs")
    explain = _note(
        f"each layer measured alone, metric {metric}: quantize_only, the float model with only "
        "this layer quantized; skip_only, the quantized model with only this layer left float; "
        "weight_only and activation_only, the float model with only this layer's weight or "
        f"output activation quantized. sensitivity = {how}.")
    return (head + explain + _figure(sensitivity_figure(frame, metric=metric), "qviz-sensitivity")
            + frame_table(frame[columns], table_id="sensitivity-table",
                          caption=f"the sweep, metric: {metric}; most sensitive first") + "</section>")


def _depth_section(table: pd.DataFrame) -> str:
    fig = depth_figure(table, static=True)
    return ('<section id="depth"><h2>Error along depth</h2>'
            + _note("local SQNR: the layer's own error, fed the quantized model's input; output "
                    "SQNR: the error accumulated up to that layer. Dashed guide lines at "
                    f"{RED_DB:g} dB (red below) and {AMBER_DB:g} dB (amber below).")
            + _figure(fig, "qviz-depth") + "</section>")


def _histogram_section(results) -> str:
    table = results.table
    layers = worst_layers(table)
    head = ('<section id="histograms"><h2>Worst layers</h2>'
            + _note("the output activations of the layers with the lowest local SQNR: the "
                    "representable range shaded, the quantization grid as thin lines, clipped "
                    "values and regions in red"))
    if not layers:
        return head + _note("no quantized layer has a local SQNR to rank") + "</section>"
    parts = []
    for i, layer in enumerate(layers):
        row = table.loc[layer]
        record = output_record(results.records, layer)
        fig = (histogram_figure(record, layer) if record is not None else
               message_figure(f"{layer}: output activation",
                                      "no activation point was recorded for this layer"))
        parts.append(f"<h3>{i + 1}. {_e(layer)} · local SQNR {float(row['local_sqnr']):.2f} dB, "
                     f"output SQNR {float(row['output_sqnr']):.2f} dB</h3>"
                     + _figure(fig, f"qviz-hist-{i}"))
    return head + "".join(parts) + "</section>"


def _outliers_section(session) -> str:
    """The activation-outlier heat map (every linear layer's input channels, ratio to the layer's
    median channel) and the most extreme channels; a note when the session cannot measure them
    (a session file saved before they were measured)."""
    head = ('<section id="outliers"><h2>Activation outliers</h2>'
            + _note("each linear layer's input, channel by channel, over the calibration batches: "
                    "abs-max over the layer's median channel. A channel tens of times the median sets "
                    "a per-tensor scale that leaves the others a few levels. persistence near 1: a "
                    "systematic outlier channel (per-channel scales, SmoothQuant); near 0: a spike "
                    "(clipping, per-token scales)"))
    if not callable(getattr(session, "outliers", None)):
        return head + _note("not measured: this session keeps no activation-outlier statistics") + "</section>"
    try:
        frame = session.outliers(top=2**62)  # every channel of every layer
    except QvizError as exc:
        return head + _note(f"not measured: {exc}") + "</section>"
    if frame.empty:
        return head + _note("no linear layer whose input channels to measure") + "</section>"
    matrix = channel_matrix(frame, "ratio_to_median", [str(n) for n in _results(session).table.index])
    top = frame.groupby("layer", sort=False).head(OUTLIER_CHANNELS).head(OUTLIER_ROWS)
    return (head + _figure(outlier_heatmap(matrix), "qviz-outliers")
            + frame_table(top, table_id="outlier-table", index=False,
                          caption=f"the {len(top)} most extreme channels (at most {OUTLIER_CHANNELS} per "
                                  "layer), session.outliers()") + "</section>")


def _groups_section(session) -> str:
    """The int4 weight groups of every Linear layer (``session.weight_groups``): the layers whose
    worst group has the lowest SQNR, and the heat map of the worst one; a note when the session
    cannot group its weights (a loaded session holds none)."""
    head = ('<section id="groups"><h2>Weight groups</h2>'
            + _note("group-wise int4 (torchao's PerGroup): each run of group-size input columns of each output "
                    "channel has its own scale, so one large weight coarsens its group only. torchao's own "
                    "scales where the torchao flow made the layer int4; elsewhere the what-if of torchao's "
                    "int4 at the layer's group size (32 by default), from the float weight"))
    layers = linear_rows(_results(session).table)
    if not layers or not callable(getattr(session, "weight_groups", None)):
        return head + _note("no Linear layer whose weights to group") + "</section>"
    rows, worst = [], None
    for layer in layers:
        try:
            frame = session.weight_groups(layer)
        except QvizError as exc:
            if not getattr(session, "is_live", False):
                return head + _note(f"not measured: {exc}") + "</section>"
            continue  # a row that is no Linear module of the model (a functional op)
        rows.append(worst_groups(frame))
        if worst is None or rows[-1]["worst_sqnr"] < worst[0]:  # keep one frame only: the worst layer's
            worst = (rows[-1]["worst_sqnr"], frame)
    if worst is None:
        return head + _note("no Linear module whose weights to group") + "</section>"
    summary = pd.DataFrame(rows).sort_values("worst_sqnr", kind="stable").head(GROUP_LAYERS)
    return (head + _figure(group_heatmap(worst[1]), "qviz-groups")
            + frame_table(summary, table_id="group-table", index=False,
                          caption=f"the {len(summary)} layers whose worst int4 group loses most (SQNR in dB), "
                                  "session.weight_groups()") + "</section>")


def _diagnosis_section(frame: pd.DataFrame) -> str:
    head = '<section id="diagnosis"><h2>Diagnosis</h2>'
    if frame.empty:
        return head + _note("no problem found: no layer shows a known cause of quantization error") + "</section>"
    return head + frame_table(frame, table_id="diagnosis-table", index=False) + "</section>"


def _plan_section(session, results) -> str:
    head = '<section id="plan"><h2>Plan</h2>'
    plan = getattr(session, "plan", None)
    if plan is None:
        return head + _note("no plan: session files keep results, not the plan; re-create the "
                            "session from the model (qviz.Session(...).run()) to report its plan "
                            "and the code that builds it") + "</section>"
    rows = pd.DataFrame.from_dict({name: {**config.to_dict(), "description": config.describe()}
                                   for name, config in plan.items()}, orient="index")
    rows.index.name = "layer"
    code = plan.code_for(results.meta)
    return (head + frame_table(rows, table_id="plan-table", caption=f"the plan in force (backend {plan.backend})")
            + "<h3>As code (plain torch, no qviz needed)</h3>"
            + f'<pre id="plan-code"><code>{_e(code)}</code></pre></section>')


def _layers_section(table: pd.DataFrame) -> str:
    return ('<section id="layers"><h2>Per-layer table</h2>'
            + frame_table(table, table_id="layer-table", sqnr_columns=_SQNR_COLUMNS,
                          caption="session.to_dataframe(): one row per layer, in execution order; "
                                  "SQNR in dB")
            + "</section>")


# -- the page -------------------------------------------------------------------------------------
def build_report(session, *, title: str | None = None) -> str:
    """The report of ``session`` (a run or loaded :class:`qviz.Session`) as HTML text."""
    results = _results(session)
    meta = results.meta
    sens = sensitivity_frame(results)
    title = title or f"qviz report · {meta.get('flow', '?')} flow, {meta.get('backend', '?')} backend"
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(f'<a href="#{key}">{_e(label)}</a>' for key, label in _NAV)
    body = "\n".join([
        f"<header><h1>{_e(title)}</h1><p class=\"meta\">written by qviz {_e(__version__)} on "
        f"{_e(stamp)}</p><nav>{nav}</nav></header>",
        _summary_section(results),
        _sensitivity_section(sens, _sensitivity_metric(results, sens) if sens is not None else ""),
        _depth_section(results.table),
        _histogram_section(results),
        _outliers_section(session),
        _groups_section(session),
        _diagnosis_section(diagnose(results, sens)),
        _plan_section(session, results),
        _layers_section(results.table),
    ])
    return PAGE.format(version=_e(__version__), title=_e(title), css=CSS, plotlyjs=packed_plotlyjs(),
                       loader=LOADER, body=body)


def write_report(session, path, *, title: str | None = None) -> pathlib.Path:
    """Write the report of ``session`` to ``path`` (atomically: see :mod:`qviz.io.atomic`);
    return the path."""
    path = check_target(path, what="the report")  # before the work of building it
    text = build_report(session, title=title)
    with atomic_write(path, what="the report") as fh:
        fh.write(text.encode("utf-8"))
    return path

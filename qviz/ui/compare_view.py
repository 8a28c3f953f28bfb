"""The compare view: the dashboard's session (A) beside a second one (B), e.g. PTQ vs QAT or two
plans of one model. Model-level figures of both, a per-layer table of A, B and B - A (layers
matched by name; layers only in one session listed), and both output SQNRs along depth.
Selecting a layer here selects it in A's state, so every other view follows. A and B are named
by their session files (``qviz serve a.qviz --compare b.qviz``), or by flow, backend and plan when
they live in memory.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models.widgets.tables import NumberFormatter

from qviz.charts.compare import compare_depth_figure
from qviz.charts.layout import message_figure
from qviz.ui.markup import md
from qviz.ui.state import session_meta, session_name
from qviz.ui.views import _PLOTLY_CONFIG, _StateView, select

SQNR_COLUMNS = ("output_sqnr", "local_sqnr", "weight_sqnr")
SUMMARY_KEYS = (
    "output_sqnr",
    "top1_agreement",
    "weight_bytes",
    "float_weight_bytes",
    "size_bytes",
    "float_size_bytes",
)
#: How the model-figures table names each figure (the dashboard header's words).
FIGURE_LABELS = {
    "output_sqnr": "output SQNR",
    "top1_agreement": "top-1 agreement with float",
    "weight_bytes": "weights at their dtypes' widths",
    "float_weight_bytes": "weights in float",
    "size_bytes": "saved model (torch.save)",
    "float_size_bytes": "saved float model (torch.save)",
}


def layer_differences(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per layer, matched by name (A's depth order, then layers only B has): where it is ("both",
    "A only", "B only"), each session's dtype, and ``{c}_a``, ``{c}_b``, ``{c}_diff`` (B - A) for
    output, local and weight SQNR."""
    a, b = _by_depth(a), _by_depth(b)
    layers = list(a.index) + [n for n in b.index if n not in a.index]
    out = pd.DataFrame(index=pd.Index(layers, name="layer"))
    out["in"] = [
        "both" if n in a.index and n in b.index else "A only" if n in a.index else "B only"
        for n in layers
    ]
    for side, frame in (("a", a), ("b", b)):
        out[f"dtype_{side}"] = frame["dtype"].reindex(layers).fillna("") if "dtype" in frame else ""
    for c in SQNR_COLUMNS:
        va, vb = (_numbers(frame, c, layers) for frame in (a, b))
        out[f"{c}_a"], out[f"{c}_b"], out[f"{c}_diff"] = va, vb, vb - va
    return out


def _by_depth(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("depth", kind="stable") if "depth" in frame else frame


def _numbers(frame: pd.DataFrame, column: str, layers: list) -> np.ndarray:
    if column not in frame:
        return np.full(len(layers), math.nan)
    return pd.to_numeric(frame[column].reindex(layers), errors="coerce").to_numpy(dtype=np.float64)


def summary_differences(a: dict, b: dict) -> pd.DataFrame:
    """The model-level figures of A and B, and B - A, one row per figure."""
    rows = {k: (_float(a.get(k)), _float(b.get(k))) for k in SUMMARY_KEYS if k in a or k in b}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["A", "B"])
    frame["B - A"] = frame["B"] - frame["A"]
    frame.index.name = "figure"
    return frame


def summary_table(diff: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_differences` as the table shows it: one row per figure under its label, each
    value in its unit (dB, %, bytes as B / kB / MB); the serialized sizes only when neither
    session has the weight sizes the header shows."""
    if diff.index.isin(["weight_bytes", "float_weight_bytes"]).any():
        diff = diff.drop(index=["size_bytes", "float_size_bytes"], errors="ignore")
    rows = {}
    for key, values in diff.iterrows():
        show = _SHOW[key]
        rows[FIGURE_LABELS.get(key, key)] = [
            show(values["A"], ""),
            show(values["B"], ""),
            show(values["B - A"], "+"),
        ]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["A", "B", "B - A"])
    frame.index.name = "figure"
    return frame


def format_bytes(n: float, sign: str = "") -> str:
    """Bytes as people read them: whole bytes below 1 kB, then kB and MB (1000s, as the header)."""
    if not math.isfinite(n):
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:{sign}.1f} {unit}"
    return f"{n:{sign}.0f} B"


def _percent(v: float, sign: str) -> str:
    """A share in % (the header's unit); a difference of shares in percentage points."""
    return "–" if not math.isfinite(v) else f"{100 * v:{sign}.1f}" + (" pts" if sign else " %")


_SHOW = {
    "output_sqnr": lambda v, sign: "–" if not math.isfinite(v) else f"{v:{sign}.2f} dB",
    "top1_agreement": _percent,
    **dict.fromkeys(
        ("weight_bytes", "float_weight_bytes", "size_bytes", "float_size_bytes"), format_bytes
    ),
}


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


_TITLES = {
    "in": "in",
    "dtype_a": "dtype A",
    "dtype_b": "dtype B",
    **{
        f"{c}_{s}": f"{c.split('_')[0]} SQNR {t}"
        for c in SQNR_COLUMNS
        for s, t in (("a", "A"), ("b", "B"), ("diff", "B - A"))
    },
}


def _formatters() -> dict:
    """New formatters for one table (shared ones keep every table that used them alive: see
    :func:`qviz.ui.views._formatters`)."""
    return {
        f"{c}_{s}": NumberFormatter(format="+0.00" if s == "diff" else "0.00")
        for c in SQNR_COLUMNS
        for s in ("a", "b", "diff")
    }


def _diff_style(value) -> str:
    """Green where B is better by more than 0.5 dB, red where it is worse."""
    v = _float(value)
    if not math.isfinite(v) or abs(v) <= 0.5:
        return ""
    return "background-color: #d1e7dd" if v > 0 else "background-color: #f8d7da"


class CompareView(_StateView):
    """The dashboard's session (A) beside ``other`` (B): figures, per-layer differences, depth chart."""

    other = param.Parameter(
        doc="The second session (B): anything with to_dataframe() and summary()."
    )

    def __init__(self, **params):
        super().__init__(**params)
        self.header = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.figures = pn.widgets.Tabulator(
            pd.DataFrame(),
            disabled=True,
            show_index=True,
            label="model figures",
            text_align={c: "right" for c in ("A", "B", "B - A")},
        )
        self.only = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(),
            disabled=True,
            selectable=1,
            sortable=True,
            header_filters=True,
            formatters=_formatters(),
            titles=dict(_TITLES),
            frozen_columns=["layer"],
            layout="fit_data_table",
            sizing_mode="stretch_width",
            label="A vs B per layer",
        )
        self.table.style.map(_diff_style, subset=[f"{c}_diff" for c in SQNR_COLUMNS])
        self.depth = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=340, name="compare depth"
        )
        self.table.param.watch(self._on_selection, "selection")
        self.depth.param.watch(self._on_click, "click_data")
        self.state.param.watch(self._on_selected, "selected_layer")
        self.state.param.watch(self._on_version, "version")
        self._on_version()

    @property
    def differences(self) -> pd.DataFrame:
        return self.table.value

    def _on_version(self, *_):
        a, b = self.state.table, self.other.to_dataframe()
        with pn.io.hold():
            self.table.value = layer_differences(a, b)
            names = {"A": self.state.session_label(), "B": session_name(self.other)}
            self.figures.titles = {side: f"{side}: {name}" for side, name in names.items()}
            self.figures.value = summary_table(
                summary_differences(self.state.summary, self.other.summary())
            )
            self.header.object = (
                f"**A**: {md(names['A'])}, this session ({_describe(len(a), self.state.meta())}) · "
                f"**B**: {md(names['B'])}, the compared session ({_describe(len(b), session_meta(self.other))})"
            )
            only = self.table.value["in"]
            parts = [
                f"only in {side}: {', '.join(md(n) for n in only.index[only == f'{side} only'])}"
                for side in ("A", "B")
                if (only == f"{side} only").any()
            ]
            self.only.object = (
                "Layers " + "; ".join(parts) if parts else "Both sessions have the same layers."
            )
            self._on_selected()

    def _on_selected(self, *_):
        layer = self.state.selected_layer
        index = list(self.table.value.index)
        wanted = [index.index(layer)] if layer in index else []
        with pn.io.hold():
            if self.table.selection != wanted:
                self.table.selection = wanted
            self.depth.object = self._guard(
                "the compare chart",
                lambda: compare_depth_figure(self.table.value, layer),
                lambda: message_figure("A vs B", "could not draw this chart"),
            )

    def _on_selection(self, event):
        if event.new:
            self._select(self.table.value.index[event.new[0]])

    def _on_click(self, event):
        points = (event.new or {}).get("points") or []
        if points:
            self._select(points[0].get("x"))

    def _select(self, layer) -> None:
        if layer in self.state.layers:
            select(self.state, layer)
        elif layer is not None:
            self.state.notify(
                f"{layer} is only in the compared session (B): nothing to select in A", "info"
            )

    def __panel__(self):
        return pn.Column(
            self.header,
            pn.pane.Markdown("#### Model figures", margin=(0, 10)),
            self.figures,
            pn.pane.Markdown(
                "#### Per layer (B - A in dB; select a row to select its layer)", margin=(0, 10)
            ),
            self.only,
            self.table,
            self.depth,
            sizing_mode="stretch_width",
        )


def _describe(layers: int, meta: dict) -> str:
    parts = [f"{layers} layers"]
    parts += [f"{k} {meta[k]}" for k in ("flow", "backend") if meta.get(k)]
    return md(", ".join(parts))

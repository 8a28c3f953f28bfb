"""The QAT view: the selected layer's QAT timeline (``Session.from_qat`` / ``results.timeline``).

Scale, zero point and observed min/max over the recorded steps (per-channel quantities as the
median over channels with a min-max band), the histogram over steps as a heat map, logged scalars,
the events of the run as labelled vertical lines, and the detector findings. The charts are
:mod:`qviz.charts.qat`'s; :class:`QatView` wires them to the state.
"""

from __future__ import annotations

import pandas as pd
import panel as pn

from qviz.analysis.qat_detectors import diagnose
from qviz.charts.layout import message_figure
from qviz.charts.qat import heatmap_figure, qparams_figure, scalars_figure
from qviz.ui.markup import md
from qviz.ui.views import _PLOTLY_CONFIG, _StateView, select

#: Shown instead of the view when the session holds no timeline.
HOW_TO_RECORD = """### No QAT timeline in this session

Record one inside your own training loop, then open the session made from it:

```python
with qviz.watch(qat_model, every=10, histograms_every=100) as rec:
    for x, y in loader:
        loss = loss_fn(qat_model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        rec.log(loss=loss.item())          # any scalars: loss, kd_loss, lr, ...
s = qviz.Session.from_qat(qat_model, rec, calib_batches)
s.show()                                   # or s.save("run.qviz"), then: qviz serve run.qviz
```
"""

FINDING_COLUMNS = ["layer", "point", "detector", "start", "end", "evidence", "fix"]
_ROLE_ORDER = {"output": 0, "input": 1, "weight": 2}


def layer_points(timeline, layer) -> list[dict]:
    """The timeline's points of ``layer``: output activation first, then input, then weight."""
    found = [p for p in timeline.points if p["layer"] == layer]
    return sorted(found, key=lambda p: _ROLE_ORDER.get(p["role"], 3))


def layer_events(timeline, layer=None) -> pd.DataFrame:
    """(step, kind) of the events of ``layer`` (of the whole run when None), once each, by step."""
    events = timeline.events_frame()
    if layer is not None:
        events = events[events["layer"] == layer]
    return (
        events[["step", "kind"]]
        .drop_duplicates()
        .sort_values(["step", "kind"])
        .reset_index(drop=True)
    )


class QatView(_StateView):
    """The selected layer's QAT timeline; the how-to when the session has none. Selecting a
    finding's row selects its layer."""

    def __init__(self, **params):
        super().__init__(**params)
        self.header = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.point_select = pn.widgets.Select(label="quantization point", options={}, width=380)
        self.qparams = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=520, name="qat qparams"
        )
        self.heatmap = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=360, name="qat histograms"
        )
        self.scalars = pn.pane.Plotly(
            config=_PLOTLY_CONFIG, sizing_mode="stretch_width", height=300, name="qat scalars"
        )
        self.findings = pn.widgets.Tabulator(
            pd.DataFrame(columns=FINDING_COLUMNS),
            disabled=True,
            selectable=1,
            show_index=False,
            layout="fit_data_stretch",
            sizing_mode="stretch_width",
            max_height=320,
            formatters={"evidence": {"type": "textarea"}, "fix": {"type": "textarea"}},
            widths={"evidence": 360, "fix": 360},
            label="findings",
        )
        self.empty = pn.pane.Markdown(HOW_TO_RECORD, sizing_mode="stretch_width", margin=(0, 10))
        self._layout = pn.Column(sizing_mode="stretch_width")
        self._timeline = self._diagnosis = None
        self._loading = False
        self.point_select.param.watch(self._on_point, "value")
        self.findings.param.watch(self._on_finding, "selection")
        self.state.param.watch(self._on_layer, "selected_layer")
        self.state.param.watch(self._on_version, "version")
        self._on_version()

    @property
    def timeline(self):
        return self._timeline

    # -- reacting to the state ---------------------------------------------------------------------
    def _on_version(self, *_):
        timeline = self.state.timeline()
        if timeline is not self._timeline:
            self._timeline = timeline
            self._diagnosis = (
                None
                if timeline is None
                else self._guard(
                    "the QAT findings",
                    lambda: diagnose(timeline),
                    lambda: pd.DataFrame(columns=FINDING_COLUMNS),
                )
            )
            self.findings.value = (
                pd.DataFrame(columns=FINDING_COLUMNS)
                if self._diagnosis is None
                else self._diagnosis[FINDING_COLUMNS].reset_index(drop=True)
            )
        if timeline is None:
            self._layout.objects = [self.empty]
            return
        self._layout.objects = [
            self.header,
            self.point_select,
            self.qparams,
            self.heatmap,
            self.scalars,
            pn.pane.Markdown(
                "#### Detector findings (select a row to select its layer)", margin=(0, 10)
            ),
            self.findings,
        ]
        self._on_layer()

    def _on_layer(self, *_):
        if self._timeline is None:
            return
        points = layer_points(self._timeline, self.state.selected_layer)
        options = {f"{p['name']} ({p['role']})": p["name"] for p in points}
        self._loading = True
        try:
            with pn.io.hold():
                self.point_select.options = options
                self.point_select.value = points[0]["name"] if points else None
        finally:
            self._loading = False
        self._redraw()

    def _on_point(self, *_):
        if not self._loading:
            self._redraw()

    def _on_finding(self, event):
        if event.new:
            select(self.state, self.findings.value["layer"].iloc[event.new[0]])

    # -- drawing --------------------------------------------------------------------------------
    def _redraw(self):
        tl, layer, point = self._timeline, self.state.selected_layer, self.point_select.value
        with pn.io.hold():
            self.header.object = self._guard("the QAT header", self._header, lambda: "")
            if point is None:
                text = f"no quantization point of {layer} was recorded in the timeline"
                self.qparams.object = message_figure(f"{layer}: QAT timeline", text)
                self.heatmap.object = message_figure(
                    f"{layer}: histogram over training", text
                )
            else:
                events = layer_events(tl, layer)
                self.qparams.object = self._guard(
                    "the QAT qparams chart",
                    lambda: qparams_figure(tl, point, events),
                    lambda: message_figure(
                        f"{point} over training", "could not draw this chart"
                    ),
                )
                self.heatmap.object = self._guard(
                    "the QAT histogram heat map",
                    lambda: heatmap_figure(tl, point, events),
                    lambda: message_figure(
                        f"{point}: histogram over training", "could not draw this chart"
                    ),
                )
            self.scalars.object = self._guard(
                "the logged scalars",
                lambda: scalars_figure(tl, layer_events(tl)),
                lambda: message_figure("logged scalars", "could not draw this chart"),
            )

    def _header(self) -> str:
        tl, layer = self._timeline, self.state.selected_layer
        meta, steps = tl.meta, tl.arrays["steps"]
        found = (
            self._diagnosis
            if self._diagnosis is not None
            else pd.DataFrame(columns=FINDING_COLUMNS)
        )
        mine = int((found["layer"] == layer).sum())
        return f"**{md(layer)}** " + md(
            f"over {meta.get('steps', '?')} training steps: {len(steps)} snapshots (every "
            f"{meta.get('snapshot_stride', '?')} steps), {len(tl.arrays.get('hist_steps', []))} histograms, "
            f"events for this layer: {len(layer_events(tl, layer))} · findings: {len(found)}, {mine} for this layer"
        )

    def __panel__(self):
        return self._layout

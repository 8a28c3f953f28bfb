"""The Outliers tab without a browser, on the real MiniLM demo: the heat map's numbers are the
per-channel abs-max of every linear layer's input over the calibration batches, recorded here
with plain forward hooks; clicks select layers and the selected layer is outlined; the report
has the same section."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qviz
from qviz.analysis.outliers import COLUMNS
from qviz.demo import minilm
from qviz.io.results_file import save_results
from qviz.report import build_report
from qviz.ui.app import build_dashboard
from qviz.ui.outlier_view import OutlierView
from qviz.ui.state import DashboardState
from qviz.ui.views import select

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def demo():
    """A live MiniLM session (two calibration batches) with the model and batches it was given."""
    model, calib, evals = minilm.minilm_session_inputs(n_calib=2, n_eval=1)
    session = qviz.Session(model, calib, eval_data=evals, flow="pt2e", progress=False).run()
    return session, model, calib


@pytest.fixture(scope="module")
def recorded(demo):
    """Per-channel abs-max of each nn.Linear's input over the calibration batches, from hooks
    that clone what they see, on the float model itself."""
    _, model, calib = demo
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(
        args[0].detach().clone().abs().reshape(-1, args[0].shape[-1]).amax(0)))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for batch in calib:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.stack(values).amax(0).double().numpy() for name, values in seen.items()}


def _view(session) -> OutlierView:
    view = OutlierView(state=DashboardState(session))
    view.show()
    return view


def test_the_heat_map_is_the_abs_max_of_every_linear_input_channel(demo, recorded):
    session, _, _ = demo
    view = _view(session)
    view.value = "absmax"
    matrix = view.matrix
    assert list(matrix.index) == list(session.to_dataframe().index) == list(recorded)  # execution order
    for layer, mine in recorded.items():
        row = matrix.loc[layer].to_numpy()
        np.testing.assert_allclose(row[: mine.size], mine, rtol=1e-6)
        assert np.isnan(row[mine.size:]).all()  # a 384-wide input padded to 1536
    fig = view.pane.object
    assert [(len(t.y), len(t.x)) for t in fig.data] == [(30, 384), (6, 1536)]
    for trace in fig.data:  # the hover's numbers are the recorded ones, the colour their log10
        mine = np.stack([recorded[layer] for layer in trace.y])
        np.testing.assert_allclose(np.asarray(trace.customdata, dtype=float), mine, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(trace.z, dtype=float), np.log10(mine), rtol=1e-6)
    view.value = "ratio_to_median"
    for layer, mine in recorded.items():
        np.testing.assert_allclose(view.matrix.loc[layer].to_numpy()[: mine.size], mine / np.median(mine), rtol=1e-6)
    assert "median" in view.pane.object.layout.coloraxis.colorbar.title.text


def test_clicking_a_row_selects_its_layer_and_the_selection_is_outlined(demo):
    session, _, _ = demo
    view = _view(session)
    state = view.state
    assert _outlined(view) == state.selected_layer == "encoder.layer.0.attention.self.query"
    view.pane.click_data = {"points": [{"x": 700, "y": "encoder.layer.4.output.dense", "curveNumber": 1}]}
    assert state.selected_layer == "encoder.layer.4.output.dense"
    assert _outlined(view) == "encoder.layer.4.output.dense"
    select(state, "encoder.layer.2.attention.self.value")  # selected elsewhere (the layer table)
    assert _outlined(view) == "encoder.layer.2.attention.self.value"
    table = view.table.value
    view.table.selection = [5]  # a row of the top-outlier table selects its layer too
    assert state.selected_layer == table["layer"].iloc[5] and _outlined(view) == table["layer"].iloc[5]


def _outlined(view) -> str:
    """The one layer the figure outlines (a "selected" shape) and writes in bold, checked to agree."""
    fig = view.pane.object
    shapes = [s for s in fig.layout.shapes if s.name == "selected"]
    assert len(shapes) == 1
    axis = fig.layout["yaxis" + shapes[0].yref[1:]]
    outlined = axis.tickvals[round((shapes[0].y0 + shapes[0].y1) / 2)]
    bold = [v for v, text in zip(axis.tickvals, axis.ticktext, strict=True) if text.startswith("<b>")]
    assert bold == [outlined]
    others = [a for a in fig.layout if a.startswith("yaxis") and fig.layout[a] is not axis and fig.layout[a].ticktext]
    assert not any(t.startswith("<b>") for a in others for t in fig.layout[a].ticktext)
    return outlined


def test_the_table_lists_each_layers_top_channels(demo):
    session, _, _ = demo
    view = _view(session)
    view.top = 2
    table = view.table.value
    assert list(table.columns) == COLUMNS and len(table) == 2 * 36
    assert (table.groupby("layer").size() == 2).all()
    assert table.ratio_to_median.is_monotonic_decreasing


def test_the_tab_measures_when_first_opened(demo):
    session, _, _ = demo
    dashboard = build_dashboard(session)
    tabs = dashboard.sections()[-1]
    assert "Outliers" in tabs._names
    assert dashboard.outliers.matrix is None and not dashboard.outliers.shown  # page load does not wait
    tabs.active = tabs._names.index("Outliers")
    assert dashboard.outliers.shown and dashboard.outliers.matrix.shape == (36, 1536)


def test_a_loaded_session_shows_the_saved_heat_map(demo, recorded, tmp_path):
    session, _, _ = demo
    session.outliers()
    session.save(tmp_path / "minilm.qviz")
    view = _view(qviz.load(tmp_path / "minilm.qviz"))
    view.value = "absmax"
    assert view.matrix.shape == (36, 1536) and view.state.message == ""
    for layer, absmax in recorded.items():
        np.testing.assert_allclose(view.matrix.loc[layer].to_numpy()[: absmax.size], absmax, rtol=1e-6)


def test_a_loaded_session_explains_why_there_is_no_heat_map(demo, tmp_path):
    session, _, _ = demo
    save_results(session.results, tmp_path / "minilm.qviz")  # the results alone: no outlier statistics
    view = _view(qviz.load(tmp_path / "minilm.qviz"))
    assert view.matrix is None and view.chart.objects == [view.placeholder]
    assert "No activation-outlier statistics" in view.placeholder.object
    assert "live session" in view.placeholder.object
    assert not view.table.visible and view.table.value is None and view.state.message == ""


def test_the_report_has_the_outlier_section(demo, recorded, tmp_path):
    session, _, _ = demo
    html = build_report(session)
    section = html[html.index('<section id="outliers">'):]
    section = section[: section.index("</section>")]
    assert 'id="qviz-outliers"' in section and 'id="outlier-table"' in section
    top = session.outliers(top=1).iloc[0]
    assert f"<td>{top.layer}</td>" in section and repr(float(top.absmax)) in section
    assert '<a href="#outliers">' in html
    session.save(tmp_path / "minilm.qviz")  # with the statistics outliers() measured
    loaded = build_report(qviz.load(tmp_path / "minilm.qviz"))
    assert loaded[loaded.index('<section id="outliers">'):].split("</section>")[0] == section
    save_results(session.results, tmp_path / "bare.qviz")  # the results alone
    bare = build_report(qviz.load(tmp_path / "bare.qviz"))
    assert "not measured: this session file holds no activation-outlier statistics" in bare

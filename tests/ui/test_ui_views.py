"""Browserless tests of the UI: each view built on the demo session, checked through its widgets,
figures and the Bokeh/Plotly models Panel sends to the browser (as Panel's own pane tests do)."""

from __future__ import annotations

import html
import math
import runpy
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("panel")

import panel as pn  # noqa: E402
from bokeh.document import Document  # noqa: E402
from pyviz_comms import Comm  # noqa: E402

import qviz  # noqa: E402
from qviz.charts.layers import MAX_BARS, MAX_GRID_LINES, display_bins, grid_levels, quant_range  # noqa: E402
from qviz.charts.layout import sqnr_color  # noqa: E402
from qviz.cli import build_parser, main  # noqa: E402
from qviz.demo import session_factory  # noqa: E402
from qviz.errors import ConfigError, SessionFileError  # noqa: E402
from qviz.session import Session  # noqa: E402
from qviz.ui.app import Dashboard, build_app, build_dashboard  # noqa: E402
from qviz.ui.markup import md  # noqa: E402
from qviz.ui.serve import (  # noqa: E402
    Visitors,
    app_for,
    exposure_warning,
    serve,
    websocket_origins,
)
from qviz.ui.state import DashboardState  # noqa: E402
from qviz.ui.views import (  # noqa: E402
    ConfigEditor,
    DepthChart,
    LayerTable,
    LayerView,
    MessageView,
    SummaryView,
    column_widths,
    sqnr_cell_style,
)
from tests.hostile import FILE_TEXT, NAMES, NAMES_B, hostile_file, hostile_session  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def session(demo_sessions):
    return demo_sessions()


@pytest.fixture(scope="module")
def session_file(session, tmp_path_factory):
    path = tmp_path_factory.mktemp("ui") / "demo.qviz"
    session.save(path)
    return path


@pytest.fixture
def state(session):
    return DashboardState(session)


def _model(viewable):
    """The Bokeh model Panel would send for ``viewable`` (a Viewer renders through pn.panel)."""
    return pn.panel(viewable).get_root(Document(), comm=Comm())


def _activation(session, layer):
    pts = session.points()
    hits = pts.index[(pts["layer"] == layer) & pts["role"].isin(["output", "dynamic"])]
    return session.record(hits[0])


# -- state ---------------------------------------------------------------------------------------
def test_state_imports_without_panel():
    code = "import sys, qviz.ui.state; assert 'panel' not in sys.modules, 'state imported panel'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_state_reads_the_session(session, state):
    frame = session.to_dataframe()
    assert state.layers == list(frame.index)
    assert state.param.selected_layer.objects == list(frame.index)
    assert state.selected_layer == frame.index[0]
    assert state.version == 1 and state.message == ""
    pd.testing.assert_frame_equal(state.table, frame)
    for layer in frame.index:
        assert state.activation_point(layer) == _activation(session, layer).name
        assert state.weight_point(layer) == f"{layer}.weight"
    assert state.activation_point("no_such_layer") is None
    assert state.can_apply == bool(getattr(session, "can_apply", False))


def test_state_refuses_unknown_layers(state):
    with pytest.raises(ValueError):
        state.selected_layer = "no_such_layer"


# -- model-level figures -------------------------------------------------------------------------
def test_summary_numbers_equal_the_session(session, state):
    view = SummaryView(state=state)
    s = session.summary()
    assert view.sqnr.value == pytest.approx(s["output_sqnr"])
    assert view.top1.value == pytest.approx(100 * s["top1_agreement"])
    assert view.size.value == pytest.approx(100 * s["weight_bytes"] / s["float_weight_bytes"])
    model = _model(view)
    texts = [m.text for m in model.select({"type": pn.models.markup.HTML})]  # Number renders as HTML
    assert any(f"{s['output_sqnr']:.2f} dB" in t for t in texts)
    expected = sqnr_color(s["output_sqnr"])
    assert any(expected in t for t in texts)  # coloured by the 20/30 dB thresholds


# -- layer table ---------------------------------------------------------------------------------
def test_sqnr_cell_colours_follow_thresholds():
    assert "#f8d7da" in sqnr_cell_style(19.99)
    assert "#fff3cd" in sqnr_cell_style(20.0) and "#fff3cd" in sqnr_cell_style(29.9)
    assert "#d1e7dd" in sqnr_cell_style(30.0) and "#d1e7dd" in sqnr_cell_style(55)
    assert sqnr_cell_style(math.nan) == "" and sqnr_cell_style(None) == ""


def test_table_value_equals_dataframe_and_is_colour_coded(session, state):
    view = LayerTable(state=state)
    frame = session.to_dataframe()
    pd.testing.assert_frame_equal(view.widget.value, frame)
    model = _model(view)
    assert view.widget.header_filters and view.widget.sortable
    assert all(c.get("headerFilter") for c in model.configuration["columns"] if c["field"] in frame.columns)
    styles = model.cell_styles["data"]
    for i, layer in enumerate(frame.index):
        cells = [style for cell in styles[i].values() for style in cell]
        want = sqnr_cell_style(frame.loc[layer, "output_sqnr"]).split(": ")
        assert tuple(want) in cells, layer
        finite = sum(math.isfinite(frame.loc[layer, c]) for c in ("output_sqnr", "local_sqnr", "weight_sqnr"))
        assert len(styles[i]) == finite


def test_table_column_widths_fit_titles_and_formatted_values(state):
    view = LayerTable(state=state)
    widths = view.widget.widths
    frame = state.table
    assert set(widths) == {"layer", *frame.columns}  # every column, the index included
    assert widths == column_widths(frame)
    # a value longer than anything in the column widens it; its title sets the floor
    longer = frame.assign(type="ConvReLUBatchNormalization2d" * 2)
    assert column_widths(longer)["type"] > widths["type"]
    assert widths["zero_point"] >= len("zero point") * 8  # short numbers, the title decides
    assert column_widths(frame.assign(mse=math.nan))["mse"] < widths["mse"]
    # the widths reach the browser on the Bokeh model's columns
    assert {c.field: c.width for c in _model(view).columns} == widths


def test_table_selection_and_state_are_linked(session, state):
    view = LayerTable(state=state)
    model = _model(view)
    layers = list(session.to_dataframe().index)
    assert view.widget.selection == [0]
    view.widget.selection = [3]  # what a click on the 4th row does
    assert state.selected_layer == layers[3]
    state.selected_layer = layers[5]  # selected elsewhere: the row follows
    assert view.widget.selection == [5]
    assert model.source.selected.indices == [5]


# -- error along depth ---------------------------------------------------------------------------
def test_depth_chart_traces_equal_session_numbers(session, state):
    view = DepthChart(state=state)
    frame = session.to_dataframe().sort_values("depth")
    fig = view.pane.object
    assert [t.name for t in fig.data] == ["local SQNR", "output SQNR"]
    for trace, column in zip(fig.data, ("local_sqnr", "output_sqnr"), strict=True):
        assert trace.mode == "lines+markers"
        assert list(trace.x) == list(frame.index)
        np.testing.assert_allclose(np.array(trace.y, dtype=float), frame[column].to_numpy())
    model = _model(view)
    assert len(model.data) == 2 and model.data[1]["x"] == list(frame.index)
    selected = [s for s in model.layout["shapes"] if s.get("name") == "selected"]
    assert [s["x0"] for s in selected] == [state.selected_layer]
    assert sorted(s["y0"] for s in model.layout["shapes"] if s.get("name") == "threshold") == [20, 30]


def test_clicking_a_depth_point_selects_its_layer(state):
    view = DepthChart(state=state)
    model = _model(view)
    view.pane.click_data = {"points": [{"curveNumber": 1, "pointIndex": 4, "pointNumber": 4, "x": "fc1", "y": 35.0}]}
    assert state.selected_layer == "fc1"
    assert [s["x0"] for s in model.layout["shapes"] if s.get("name") == "selected"] == ["fc1"]
    # without a usable x, the position along depth decides
    view.pane.click_data = {"points": [{"curveNumber": 0, "pointIndex": 2, "pointNumber": 2}]}
    assert state.selected_layer == state.table.sort_values("depth").index[2]


# -- histogram and weights -----------------------------------------------------------------------
def test_histogram_bars_range_and_grid_equal_the_point(session, state):
    view = LayerView(state=state)
    for layer in session.to_dataframe().index:
        state.selected_layer = layer
        record = _activation(session, layer)
        fig = view.histogram.object
        assert layer in fig.layout.title.text
        inside, clipped = fig.data
        assert (inside.name, clipped.name) == ("in range", "clipped")
        assert len(inside.x) + len(clipped.x) <= MAX_BARS + 2  # +2: bars split at the limits
        hist = record.stats.histogram
        assert np.sum(inside.y) + np.sum(clipped.y) == pytest.approx(hist.total)
        s = float(record.arrays["scale"][0])
        zp = float(record.arrays["zero_point"][0])
        lo, hi = (record.info["quant_min"] - zp) * s, (record.info["quant_max"] - zp) * s
        (band,) = [sh for sh in fig.layout.shapes if sh.name == "representable range"]
        assert (band.x0, band.x1) == pytest.approx((lo, hi))
        grid = np.array([sh.x0 for sh in fig.layout.shapes if sh.name == "grid"])
        levels = record.info["quant_max"] - record.info["quant_min"] + 1
        k = math.ceil(levels / MAX_GRID_LINES)
        assert len(grid) == len(range(record.info["quant_min"], record.info["quant_max"] + 1, k))
        np.testing.assert_allclose(np.diff(grid), k * s)
        assert (grid[0] - lo) == pytest.approx(0, abs=1e-12)
        assert np.all((np.asarray(clipped.x) < lo) | (np.asarray(clipped.x) > hi))
        assert np.all((np.asarray(inside.x) >= lo) & (np.asarray(inside.x) <= hi))
        # the red bars hold exactly the clipped share reported in the table
        clip_frac = session.to_dataframe().loc[layer, "clip_frac"]
        assert np.sum(clipped.y) / hist.total == pytest.approx(clip_frac, abs=1e-12)


def test_selecting_a_layer_changes_the_histogram_model(session, state):
    view = LayerView(state=state)
    model = _model(view.histogram)
    first = model.layout["title"]["text"]
    x_before = model.data_sources[0].data["x"][0].copy()
    state.selected_layer = "fc2"
    assert model.layout["title"]["text"] != first and model.layout["title"]["text"].startswith("fc2:")
    x_after = model.data_sources[0].data["x"][0]
    np.testing.assert_allclose(x_after, view.histogram.object.data[0].x)
    assert len(x_after) != len(x_before) or not np.allclose(x_after, x_before)
    assert view.card.object.startswith("**fc2**")


def test_log_toggle_switches_the_y_axis(state):
    view = LayerView(state=state)
    model = _model(view.histogram)
    assert model.layout["yaxis"]["type"] == "log"
    view.log_toggle.value = False
    assert model.layout["yaxis"]["type"] == "linear" and view.log_y is False


def test_weight_chart_shows_per_channel_scales(session, state):
    view = LayerView(state=state)
    for layer in session.to_dataframe().index:
        state.selected_layer = layer
        record = session.record(f"{layer}.weight")
        (bars,) = view.weights.object.data
        np.testing.assert_allclose(np.asarray(bars.y), record.arrays["scale"])
        assert list(bars.x) == list(range(len(record.arrays["scale"])))
        assert len(record.arrays["scale"]) > 1  # the demo's weights are per-channel
        assert layer in view.weights.object.layout.title.text


def test_display_bins_keep_every_count_and_split_at_cuts():
    rng = np.random.default_rng(0)
    import torch

    from qviz.capture.histogram import StreamingHistogram

    hist = StreamingHistogram(2048)
    hist.update(torch.from_numpy(rng.normal(size=50_000).astype(np.float32)))
    counts, edges = display_bins(hist.counts, hist.edges, max_bars=100)
    assert len(counts) <= 100 and len(edges) == len(counts) + 1
    assert counts.sum() == hist.total and np.all(np.diff(edges) > 0)
    assert set(np.round(edges / hist.width, 9)) <= set(np.round(hist.edges / hist.width, 9))  # merged, not moved
    counts, edges = display_bins(hist.counts, hist.edges, max_bars=100, cuts=(-1.2345, 2.5))
    assert -1.2345 in edges and 2.5 in edges and counts.sum() == pytest.approx(hist.total)
    below = counts[edges[1:] <= -1.2345].sum()
    assert below / hist.total == pytest.approx(hist.fraction_outside(-1.2345, np.inf), abs=1e-12)
    empty_counts, _ = display_bins(np.zeros(8, dtype=np.int64), np.arange(9.0))
    assert empty_counts.size == 0


def test_grid_keeps_at_most_64_lines_for_int8():
    from qviz.capture.stats import ActivationStats
    from qviz.results import PointRecord

    record = PointRecord("p", "l", "output", ActivationStats(bins=64),
                         {"quant_min": -128, "quant_max": 127}, {"scale": np.array([0.5]), "zero_point": np.array([3.0])})
    grid = grid_levels(record)
    assert len(grid) == 64 and grid[0] == (-128 - 3) * 0.5 and np.allclose(np.diff(grid), 4 * 0.5)
    assert quant_range(record) == ((-128 - 3) * 0.5, (127 - 3) * 0.5)


# -- errors --------------------------------------------------------------------------------------
def test_a_failing_view_shows_an_alert_and_the_app_keeps_working(session, state, monkeypatch):
    dashboard = build_dashboard(session)
    state = dashboard.state
    broken = state.activation_point("fc1")
    real = state.record

    def record(point):
        if point == broken:
            raise RuntimeError("corrupted histogram")
        return real(point)

    monkeypatch.setattr(state, "record", record)
    state.selected_layer = "fc1"
    assert state.message_kind == "danger" and "could not draw the histogram" in state.message
    assert "corrupted histogram" in dashboard.messages.alert.object
    assert dashboard.messages.__panel__().visible
    assert len(dashboard.layer.histogram.object.data) == 0  # a placeholder figure
    assert dashboard.table.widget.selection == [4]  # the rest followed the selection
    state.selected_layer = "fc2"  # still works
    assert len(dashboard.layer.histogram.object.data) == 2
    dashboard.messages.dismiss.clicks += 1
    assert state.message == "" and not dashboard.messages.__panel__().visible


def test_message_view_escapes_html(state):
    view = MessageView(state=state)
    state.notify("<script>x</script>", "warning")
    assert "<script>" not in view.alert.object and view.alert.alert_type == "warning"


def _rendered_html(app) -> list[str]:
    """The HTML of every Markdown/HTML pane of ``app`` as the browser receives it."""
    from panel.models.markup import HTML as HTMLModel

    root = app.get_root(Document(), comm=Comm())
    return [html.unescape(m.text) for m in root.select({"type": HTMLModel})]


@pytest.mark.parametrize("text", [*NAMES, *FILE_TEXT.values(), "a_b_ *c* `d` $e$ #f | g\n===", "x & y; &amp;"])
def test_md_renders_any_text_literally(text):
    rendered = pn.pane.Markdown(md(text))._transform_object(md(text))["object"]
    body = html.unescape(rendered).removeprefix("<p>").removesuffix("</p>\n")
    assert "<" not in body and html.unescape(body) == text  # no tag, no markup: the text, as entities


def test_no_pane_renders_text_from_the_data_as_html(tmp_path):
    """Every layer selected in turn, in a live session of a model with HTML for module names
    (Compare tab included) and in a file whose flow, backend, types and observers are HTML: the
    panes hold the text escaped, never a tag of it."""
    apps = [build_app(hostile_session(), compare_with=hostile_session(NAMES_B)),
            app_for(session_factory(hostile_file(tmp_path / "hostile.qviz")))]
    for app in apps:
        state = app.dashboard.state
        for layer in NAMES:
            state.selected_layer = layer
            state.notify(f"about {layer}", "info")
            rendered = _rendered_html(app)
            assert any(html.escape(layer, quote=False) in text for text in rendered)
            for text in rendered:
                assert not any(tag in text for tag in ("<script", "<img", "<details", "<a ")), text


# -- the app -------------------------------------------------------------------------------------
def test_build_app_is_a_page_titled_qviz(session):
    app = build_app(session)
    assert isinstance(app, pn.Column) and app.name == "qviz"
    assert "qviz" in app[0].object  # the header bar
    assert isinstance(app.dashboard, Dashboard)
    assert (app.dashboard.editor is not None) == bool(getattr(session, "can_apply", False))
    assert _model(app) is not None


def test_dashboard_renders_and_links_every_view(session):
    dashboard = build_dashboard(session)
    model = _model(pn.panel(dashboard))
    assert model is not None
    dashboard.table.widget.selection = [2]
    layer = session.to_dataframe().index[2]
    assert dashboard.state.selected_layer == layer
    assert dashboard.layer.histogram.object.layout.title.text.startswith(f"{layer}:")
    assert [s.x0 for s in dashboard.depth.pane.object.layout.shapes if s.name == "selected"] == [layer]


def test_loaded_session_draws_the_same(session, session_file):
    live, loaded = build_dashboard(session), build_dashboard(qviz.load(session_file))
    pd.testing.assert_frame_equal(live.table.widget.value, loaded.table.widget.value)
    for d in (live, loaded):
        d.state.selected_layer = "block_conv2"
    a, b = live.layer.histogram.object, loaded.layer.histogram.object
    assert a.layout.title.text == b.layout.title.text
    np.testing.assert_array_equal(a.data[0].y, b.data[0].y)


def test_widget_is_an_ipywidget(session):
    import ipywidgets

    from qviz.ui.widget import widget

    assert isinstance(widget(session), ipywidgets.DOMWidget)


def test_show_outside_a_notebook_serves(session, monkeypatch):
    import qviz.ui.serve
    from qviz.ui.widget import in_notebook, show

    calls = []
    monkeypatch.setattr(qviz.ui.serve, "serve", lambda factory, **kw: calls.append((factory, kw)))
    assert not in_notebook()
    show(session)
    (factory, kw), = calls
    assert factory() is session and kw["show"] is True


# -- serving helpers and the command line --------------------------------------------------------
def test_websocket_origins():
    assert websocket_origins("127.0.0.1", 5006) == ["127.0.0.1:5006", "localhost:5006"]
    assert websocket_origins("0.0.0.0", 80) == ["*:80"]
    assert websocket_origins("192.168.1.5", 81) == ["192.168.1.5:81"]


def test_session_factory_loads_a_file_once_for_every_visitor(session, session_file, tmp_path):
    factory = session_factory(session_file)
    a, b = factory(), factory()
    assert a is b and not a.can_apply and not a.is_live  # shared: results only, nothing applies
    pd.testing.assert_frame_equal(a.to_dataframe(), session.to_dataframe())
    demo = session_factory(demo=True)
    assert demo.__name__ == "<lambda>"  # the demo: one fresh live session per call (not called here)
    with pytest.raises(SessionFileError, match="no such file"):
        session_factory(tmp_path / "missing.qviz")
    with pytest.raises(ConfigError):
        session_factory(session_file, demo=True)
    with pytest.raises(ConfigError):
        session_factory()


def test_an_address_other_machines_reach_is_warned_about(session, capsys):
    for address in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(address, 5006) is None
    for address, where in (("0.0.0.0", "every network interface"), ("192.168.1.5", "192.168.1.5")):
        text = exposure_warning(address, 5006)
        assert text.startswith("qviz: WARNING") and where in text and "anyone who can reach" in text
        assert "run models" in text and "README" in text
    server = serve(lambda: session, address="0.0.0.0", threaded=True, show=False, verbose=False)
    try:
        assert exposure_warning("0.0.0.0", server.port) in capsys.readouterr().err
    finally:
        server.stop()


def test_visitor_limit_must_be_a_positive_count():
    assert Visitors(3).admit()  # outside a served session nothing is counted
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="max_sessions"):
            Visitors(bad)


def test_app_for_turns_a_failure_into_an_alert(tmp_path):
    def factory():
        return qviz.load(tmp_path / "missing.qviz")

    page = app_for(factory)
    assert isinstance(page, pn.pane.Alert) and "no such file" in page.object


def test_cli_serve_arguments(session_file, tmp_path, capsys):
    args = build_parser().parse_args(["serve", str(session_file), "--port", "0", "--address", "0.0.0.0", "--no-show"])
    assert (args.path, args.port, args.address, args.no_show, args.demo) == (str(session_file), 0, "0.0.0.0", True, None)
    assert build_parser().parse_args(["serve", "--demo"]).demo == "digits"
    assert build_parser().parse_args(["serve", "--demo", "minilm"]).demo == "minilm"
    assert args.max_sessions == 8 and build_parser().parse_args(["serve", "--demo", "--max-sessions", "2"]).max_sessions == 2
    assert main(["serve"]) == 2 and "--demo" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.qviz"), "--no-show"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_panel_serve_script_builds_the_app(session, session_file, monkeypatch):
    script = str(ROOT / "app" / "qviz_app.py")
    monkeypatch.setattr(sys, "argv", ["qviz_app.py", str(session_file)])
    page = runpy.run_path(script)["app"]  # servable() is a no-op outside a server
    assert page.dashboard.state.table.equals(session.to_dataframe()) and page.dashboard.compare is None
    monkeypatch.setattr(sys, "argv", ["qviz_app.py", str(session_file), str(session_file)])
    assert runpy.run_path(script)["app"].dashboard.compare is not None  # the second file: Compare tab


# -- the config editor (against a stand-in for the coming Session.apply) ---------------------------
@dataclass(frozen=True)
class _Config:
    dtype: str = "int8"
    weight: str = "per_channel"
    activation: str = "histogram"
    percentile: float = 99.99
    reduce_range: bool = True


class _Plan(dict):
    def to_code(self, flow: str = "fx") -> str:
        return f"# {flow}\n" + "\n".join(f"{layer} = {config!r}" for layer, config in self.items())

    def code_for(self, meta: dict) -> str:
        return self.to_code(meta.get("flow", "fx"))


_PENALTY = {"int8": 0.0, "int4": 12.0, "fp16": -40.0, "float": -math.inf}


class _LiveSession(Session):
    """A loaded session that pretends to re-convert: the interface views expect of Session.apply."""

    can_apply = True

    def _start(self):
        self._base = self.results.table.copy()
        self.plan = _Plan({layer: _Config() for layer in self._base.index})
        self.applied = []
        return self

    def apply(self, changes):
        self.applied.append(changes)
        if isinstance(changes, _Plan):
            plan = _Plan(changes)
        else:
            plan = _Plan(self.plan)
            for layer, fields in changes.items():
                new = replace(plan[layer], **fields)
                if new.dtype == "int4" and new.weight == "per_tensor":
                    raise ConfigError("int4 needs per-channel weights: choose weight=per_channel")
                plan[layer] = new
        self.plan = plan
        table = self._base.copy()
        for layer, config in plan.items():
            table.loc[layer, "output_sqnr"] = self._base.loc[layer, "output_sqnr"] - _PENALTY[config.dtype]
            table.loc[layer, "dtype"] = config.dtype
        self.results.table = table
        self.results.summary = {**self.results.summary, "output_sqnr": float(table["output_sqnr"].iloc[-1])}


@pytest.fixture
def live(session_file):
    return _LiveSession.from_results(qviz.load(session_file).results)._start()


def test_editor_is_hidden_without_apply(session_file):
    loaded = qviz.load(session_file)  # results only: nothing to re-convert
    state = DashboardState(loaded)
    assert not state.can_apply
    assert not ConfigEditor(state=state).__panel__().visible
    assert build_dashboard(loaded).editor is None
    assert not state.apply({"fc1": {"dtype": "int4"}}) and state.message_kind == "warning"


def test_editor_applies_shows_before_after_and_undoes(live):
    dashboard = build_dashboard(live)
    state, editor = dashboard.state, dashboard.editor
    assert editor is not None and editor.__panel__().visible
    state.selected_layer = "fc1"
    assert (editor.dtype, editor.activation, editor.reduce_range) == ("int8", "histogram", True)
    before = state.table.loc["fc1", "output_sqnr"]
    version = state.version
    assert editor.undo_button.disabled and not editor.compare_box.visible

    editor.dtype = "int4"
    editor.apply_button.clicks += 1
    assert live.applied[-1] == {"fc1": {"dtype": "int4"}}
    assert state.version == version + 1 and state.message_kind == "success"
    assert dashboard.table.widget.value.loc["fc1", "dtype"] == "int4"
    assert dashboard.table.widget.value.loc["fc1", "output_sqnr"] == pytest.approx(before - 12)
    frame = editor.compare.value
    assert editor.compare_box.visible  # hidden (no empty table) until the first change
    assert frame.loc["fc1: output SQNR", "before"] == f"{before:.2f} dB"
    assert frame.loc["fc1: output SQNR", "after"] == f"{before - 12:.2f} dB"
    assert tuple(frame.loc["fc1: dtype"]) == ("int8", "int4")  # the choice that changed, first
    assert list(frame.index).index("fc1: dtype") == 0
    assert "int4" in editor.code_text and editor.code_text == live.plan.to_code()
    assert html.escape(editor.code_text) in editor.code.object  # shown as selectable text
    assert dashboard.summary.sqnr.value == pytest.approx(live.summary()["output_sqnr"])
    assert state.selected_layer == "fc1" and editor.dtype == "int4"
    assert not editor.undo_button.disabled

    editor.undo_button.clicks += 1
    assert isinstance(live.applied[-1], _Plan) and live.applied[-1]["fc1"].dtype == "int8"
    assert dashboard.table.widget.value.loc["fc1", "output_sqnr"] == pytest.approx(before)
    assert editor.dtype == "int8" and editor.undo_button.disabled


def test_editor_shows_apply_errors_and_changes_nothing(live):
    dashboard = build_dashboard(live)
    state, editor = dashboard.state, dashboard.editor
    state.selected_layer = "fc2"
    version, table = state.version, state.table.copy()
    editor.param.update(dtype="int4", weight="per_tensor")
    assert not editor.apply()
    assert state.message_kind == "danger" and "choose weight=per_channel" in state.message
    assert editor.messages.__panel__().visible  # under Apply, where the user looks
    assert not dashboard.messages.__panel__().visible  # and only there: one message, one place
    assert state.version == version and not state.busy
    pd.testing.assert_frame_equal(dashboard.table.widget.value, table)
    assert not state.can_undo


def test_editor_with_nothing_changed_says_so(live):
    dashboard = build_dashboard(live)
    assert not dashboard.editor.apply()
    assert live.applied == [] and "nothing to apply" in dashboard.state.message


def test_editor_drives_the_real_session_apply(demo_sessions):
    live = demo_sessions()  # its own: apply changes the session
    if not (hasattr(live, "apply") and getattr(live, "can_apply", False)):
        pytest.skip("this Session cannot apply plans")
    dashboard = build_dashboard(live)
    state, editor = dashboard.state, dashboard.editor
    state.selected_layer = "fc1"
    assert editor.widgets["percentile"].disabled == (editor.activation != "percentile")
    original = live.plan["fc1"].dtype
    editor.dtype = "int4"
    assert editor.apply(), state.message
    assert live.plan["fc1"].dtype == "int4"
    pd.testing.assert_frame_equal(dashboard.table.widget.value, live.to_dataframe())
    assert editor.code_text == live.plan.to_code(flow="fx")
    record = live.record(state.activation_point("fc1"))
    grid = [s for s in dashboard.layer.histogram.object.layout.shapes if s.name == "grid"]
    assert len(grid) == record.info["quant_max"] - record.info["quant_min"] + 1  # 16 levels at 4 bits
    assert editor.compare.value.loc["fc1: output SQNR", "after"] == f"{live.to_dataframe().loc['fc1', 'output_sqnr']:.2f} dB"
    top1 = live.summary()["top1_agreement"]
    assert editor.compare.value.loc["model: top-1 agreement", "after"] == f"{100 * top1:.3g} %"
    assert editor.compare.value.loc["model: weight size", "after"] == f"{live.summary()['weight_bytes']:,} B"
    assert editor.undo()
    assert live.plan["fc1"].dtype == original
    pd.testing.assert_frame_equal(dashboard.table.widget.value, live.to_dataframe())


def test_editor_offers_every_option_for_fx(session):
    editor = ConfigEditor(state=DashboardState(session))
    assert not editor.flow_note.visible
    assert not any(editor.widgets[f].disabled for f in ("dtype", "weight", "activation", "reduce_range"))

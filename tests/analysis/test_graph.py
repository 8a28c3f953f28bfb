"""The graph view's data and its view without a browser: the graph of real sessions (FX, PT2E,
a plain traced model) against the models' forwards, figures against ``to_dataframe()``, the
grouping depths, a 200-layer model's layout time, and the clicks and highlight of GraphView."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qviz import QvizError, Session
from qviz.analysis.graph import FIGURES, trace_graph
from qviz.errors import ModelError

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


class Block(nn.Module):
    """A ResNet basic block without BN: relu(conv2(relu(conv1(x))) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class ResCatNet(nn.Module):
    """A stem, two residual blocks, two branches concatenated, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(Block(8), Block(8))
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stage(F.relu(self.stem(x)))
        return self.head(torch.cat([self.branch_a(x), self.branch_b(x)], 1).mean((2, 3)))


#: ResCatNet's forward, edge by edge (relu, mean and the block's plumbing dropped).
EDGES = {
    ("(input x)", "stem"), ("stem", "stage.0.conv1"), ("stem", "stage.0.add#0"),
    ("stage.0.conv1", "stage.0.conv2"), ("stage.0.conv2", "stage.0.add#0"),
    ("stage.0.add#0", "stage.1.conv1"), ("stage.0.add#0", "stage.1.add#0"),
    ("stage.1.conv1", "stage.1.conv2"), ("stage.1.conv2", "stage.1.add#0"),
    ("stage.1.add#0", "branch_a"), ("stage.1.add#0", "branch_b"),
    ("branch_a", "cat#0"), ("branch_b", "cat#0"), ("cat#0", "head"), ("head", "(output)"),
}
LAYERS = ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2", "branch_a", "branch_b", "head"]


class DeepResNet(nn.Module):
    """100 residual blocks: 200 conv layers and 100 adds."""

    def __init__(self, blocks: int = 100):
        super().__init__()
        self.layers = nn.Sequential(*[Block(2) for _ in range(blocks)])

    def forward(self, x):
        return self.layers(x)


def _model() -> ResCatNet:
    torch.manual_seed(0)
    return ResCatNet().eval()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)]


def edges(graph) -> set[tuple[str, str]]:
    return set(zip(graph.edges["source"], graph.edges["target"], strict=True))


@pytest.fixture(scope="module")
def fx_session():
    """An FX session of ResCatNet with a sensitivity sweep."""
    session = Session(_model(), _data(), progress=False).run()
    session.sensitivity()
    return session


@pytest.fixture(scope="module")
def state(fx_session):
    from qviz.ui.state import DashboardState

    return DashboardState(fx_session)


def test_fx_graph_has_the_adds_and_the_cat_of_the_forward(state):
    graph = state.graph()
    assert graph.source == "the session's FX graph" and graph.missing == ()
    assert edges(graph) == EDGES
    kinds = graph.nodes["kind"]
    assert sorted(kinds.index[kinds == "layer"]) == sorted(LAYERS)
    assert list(kinds.index[kinds == "add"]) == ["stage.0.add#0", "stage.1.add#0"]
    assert list(kinds.index[kinds == "cat"]) == ["cat#0"]
    assert sorted(graph.inputs_of("stage.0.add#0")) == ["stage.0.conv2", "stem"]  # the residual
    assert sorted(graph.inputs_of("cat#0")) == ["branch_a", "branch_b"]


def test_a_plain_traced_model_and_a_pt2e_exported_graph_give_the_same_graph():
    model = _model()
    traced = trace_graph(model, LAYERS)
    assert traced.source == "torch.fx.symbolic_trace of the float model"
    assert edges(traced) == EDGES
    exported = trace_graph(Session(_model(), _data(), flow="pt2e", progress=False).run().float_model(), LAYERS)
    assert exported.source == "the session's exported graph (torch.export)"
    assert edges(exported) == EDGES and exported.missing == ()


def test_node_figures_are_the_tables_and_a_group_shows_its_worst(state, fx_session):
    table = fx_session.to_dataframe()
    sweep = fx_session.results.sensitivity
    graph = state.graph()
    for layer in LAYERS:
        for figure in ("output_sqnr", "local_sqnr", "weight_sqnr", "clip_frac"):
            assert graph.nodes.at[layer, figure] == pytest.approx(float(table.at[layer, figure]), nan_ok=True)
        assert graph.nodes.at[layer, "sensitivity"] == pytest.approx(float(sweep.at[layer, "sensitivity"]))
        assert graph.nodes.at[layer, "dtype"] == str(table.at[layer, "dtype"])
    assert graph.nodes.loc[["stage.0.add#0", "cat#0", "(output)"], "output_sqnr"].isna().all()
    block = state.graph(2).nodes.loc["stage.0"]
    members = ["stage.0.conv1", "stage.0.conv2"]
    assert block["output_sqnr"] == pytest.approx(table.loc[members, "output_sqnr"].astype(float).min())
    assert block["clip_frac"] == pytest.approx(table.loc[members, "clip_frac"].astype(float).max())
    assert block["sensitivity"] == pytest.approx(sweep.loc[members, "sensitivity"].max())


def test_grouping_depth_collapses_module_prefixes(state):
    full = state.graph()
    assert full.max_depth == 3 and full.collapse(3).nodes.index.equals(full.nodes.index)
    two = state.graph(2)
    assert two.nodes.at["stage.0", "kind"] == "group"
    assert set(two.nodes.at["stage.0", "members"]) == {"stage.0.conv1", "stage.0.conv2"}
    assert "stage.0.add#0" not in two.nodes.index  # the block's own add is inside the block
    assert edges(two) == {("(input x)", "stem"), ("stem", "stage.0"), ("stage.0", "stage.1"),
                          ("stage.1", "branch_a"), ("stage.1", "branch_b"), ("branch_a", "cat#0"),
                          ("branch_b", "cat#0"), ("cat#0", "head"), ("head", "(output)")}
    one = state.graph(1)
    assert set(one.nodes.at["stage", "members"]) == set(LAYERS[1:5])
    assert list(one.nodes.index) == ["(input x)", "stem", "stage", "branch_a", "branch_b", "cat#0", "head", "(output)"]
    with pytest.raises(QvizError, match="1 or more"):
        full.collapse(0)


def test_layout_levels_follow_the_edges_and_never_stack_two_nodes(state):
    graph = state.graph()
    level = graph.nodes["level"]
    for s, t, xs, ys in graph.edges[["source", "target", "xs", "ys"]].itertuples(index=False):
        assert level[t] > level[s]
        assert ys == [-float(v) for v in range(level[s], level[t] + 1)]  # one bend point per level crossed
        assert (xs[0], xs[-1]) == (graph.nodes.at[s, "x"], graph.nodes.at[t, "x"])
    assert level["head"] == level["cat#0"] + 1 == level["branch_a"] + 2
    for _, same in graph.nodes.groupby("level"):
        x = np.sort(same["x"].to_numpy())
        assert np.all(np.diff(x) >= 1 - 1e-9)


def test_a_200_layer_model_traces_and_lays_out_in_under_a_second():
    model = DeepResNet()
    rows = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    graph = trace_graph(model, rows)
    assert len(rows) == 200 and (graph.nodes["kind"] == "add").sum() == 100
    start = time.perf_counter()
    laid = graph.layout()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"layout took {elapsed:.2f} s"
    assert laid.nodes["level"].max() == 301  # input, 100 x (conv1, conv2, add), output
    assert ("layers.41.add#0", "layers.42.add#0") in edges(graph)
    assert graph.default_depth() == 2 and len(graph.collapse(2).nodes) == 102


def test_a_module_called_twice_is_one_node_and_still_lays_out():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    graph = trace_graph(Twice(), ["a", "b"]).layout()
    assert edges(graph) == {("(input x)", "a"), ("a", "b"), ("b", "a"), ("a", "(output)")}
    assert graph.nodes.at["b", "level"] == graph.nodes.at["a", "level"] + 1  # b -> a, against the order, drawn straight


def test_the_users_model_is_left_unchanged():
    model = _model().train()
    before = copy.deepcopy(model.state_dict())
    trace_graph(model, LAYERS)
    assert type(model) is ResCatNet and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_untraceable_model_or_a_loaded_session_says_why(state, fx_session):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="torch.fx could not trace it .*flow='pt2e'"):
        trace_graph(Branchy(), ["fc"])
    from qviz.ui.graph_view import GraphView
    from qviz.ui.state import DashboardState

    loaded = DashboardState(Session.from_results(fx_session.results))
    with pytest.raises(QvizError, match="loaded from a file"):
        loaded.graph()
    view = GraphView(state=loaded)
    view.show()
    assert view.chart.objects == [view.placeholder] and "loaded from a file" in view.placeholder.object


# -- the view, without a browser --------------------------------------------------------------------
def _click(view, name):
    view.pane.click_data = {"points": [{"customdata": name}]}


def test_clicking_a_node_selects_its_layer_and_the_selection_is_ringed(state):
    from qviz.ui.graph_view import GraphView

    view = GraphView(state=state)
    assert view.pane.object is None and view.figure.options == []  # nothing drawn before the tab opens
    view.show()
    assert view.depth.value == 0  # every layer: 13 nodes fit
    assert set(view.figure.options.values()) == set(FIGURES)  # sensitivity too: the session has a sweep
    _click(view, "branch_b")
    assert state.selected_layer == "branch_b"
    ring = next(t for t in view.pane.object.data if t.name == "selected")
    node = view._graph.nodes.loc["branch_b"]
    assert (ring.x[0], ring.y[0], ring.customdata[0]) == (node["x"], node["y"], "branch_b")
    _click(view, "cat#0")  # not a layer: the selection stays
    assert state.selected_layer == "branch_b"
    figure = view.pane.object
    state.selected_layer = "stage.1.conv1"  # selected elsewhere: the ring moves, the figure stays
    assert view.pane.object is figure
    ring = next(t for t in figure.data if t.name == "selected")
    node = view._graph.nodes.loc["stage.1.conv1"]
    assert (ring.x, ring.y, ring.customdata) == ((node["x"],), (node["y"],), ("stage.1.conv1",))


def test_a_group_is_ringed_for_its_members_and_a_click_selects_its_worst(state, fx_session):
    from qviz.ui.graph_view import GraphView

    view = GraphView(state=state)
    view.show()
    view.depth.value = 2
    view.figure.value = "local_sqnr"
    table = fx_session.to_dataframe()
    worst = table.loc[["stage.1.conv1", "stage.1.conv2"], "local_sqnr"].astype(float).idxmin()
    _click(view, "stage.1")
    assert state.selected_layer == worst
    assert next(t for t in view.pane.object.data if t.name == "selected").customdata == ("stage.1",)


def test_the_figure_colours_by_the_chosen_figure_with_distinct_adds_and_cats(state):
    from qviz.charts.graph import graph_figure

    graph = state.graph()
    fig = graph_figure(graph, "clip_frac", "stem")
    traces = {t.name: t for t in fig.data}
    layers = traces["layers"]
    assert layers.marker.colorbar.title.text == "clipped fraction"
    assert layers.marker.colorscale[0][1] == "rgb(0,104,55)"  # green for a low clipped fraction
    expected = [graph.nodes.at[n, "clip_frac"] for n in layers.customdata]
    assert list(layers.marker.color) == pytest.approx(expected)
    assert traces["add"].marker.symbol == "diamond" and traces["cat"].marker.symbol == "hexagon"
    assert set(traces["add"].customdata) == {"stage.0.add#0", "stage.1.add#0"}
    edge_points = sum(len(xs) + 1 for xs in graph.edges["xs"])
    assert len(traces["edges"].x) == edge_points  # every edge drawn, each ended by a gap


def test_the_dashboard_draws_the_graph_when_its_tab_is_first_opened(fx_session):
    from qviz.ui.app import Dashboard

    dashboard = Dashboard(fx_session)
    tabs = dashboard.sections()[-1]
    assert dashboard.graph.pane.object is None
    tabs.active = tabs._names.index("Graph")
    assert {t.name for t in dashboard.graph.pane.object.data} >= {"layers", "add", "cat", "selected"}


def test_a_flat_model_too_large_to_label_still_opens_on_every_layer():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(130)])
    graph = trace_graph(model, [str(i) for i in range(130)])
    assert graph.max_depth == 1 and graph.default_depth() is None

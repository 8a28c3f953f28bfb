"""The Groups tab and the report's weight-group section without a browser: the heat map's numbers
are torchao's own scales (quantize_ on a copy of the float layer, here) and group SQNRs, it follows
the layer selection, the group-size what-if and its Apply re-convert the layer, the editor offers
the group sizes that fit, and the tab exists only where there are Linear layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qviz
from qviz.errors import ConfigError
from qviz.plan import LayerConfig, Plan
from qviz.report import build_report
from qviz.ui.app import build_dashboard
from qviz.ui.group_view import GroupView
from qviz.ui.state import DashboardState
from qviz.ui.views import ConfigEditor, select

ao = pytest.importorskip("torchao.quantization", reason="torchao is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[0].weight[5, 100] = 3.0  # the worst group: output channel 5, inputs 96..127
    return model.eval()


@pytest.fixture()
def session():
    g = torch.Generator().manual_seed(1)
    plan = Plan("x86", {"0": LayerConfig(dtype="int4"), "2": LayerConfig(dtype="int4", group_size=8)})
    return qviz.Session(_model(), [torch.randn(4, 128, generator=g)], flow="torchao", scheme="int4_weight_only",
                        plan=plan, progress=False).run()


def _torchao_scales(layer: nn.Linear, group_size: int) -> np.ndarray:
    holder = nn.Sequential(copy.deepcopy(layer))
    ao.quantize_(holder, ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(group_size)))
    return holder[0].weight.scale.reshape(layer.out_features, -1).numpy()


def _view(session) -> GroupView:
    view = GroupView(state=DashboardState(session))
    view.show()
    return view


def test_the_heat_map_shows_torchaos_scales_and_follows_the_selection(session):
    view = _view(session)
    trace = view.pane.object.data[0]
    assert view.pane.object.layout.title.text.startswith("0: int4 weight groups of 32 (torchao's own scales)")
    custom = np.asarray(trace.customdata)
    scales = _torchao_scales(_model()[0], 32)
    assert np.array_equal(custom[..., 3], scales.T)  # (group, output channel) -> torchao's (channel, group)
    assert np.array_equal(np.asarray(trace.z), custom[..., 2])  # coloured by SQNR
    worst = next(s for s in view.pane.object.layout.shapes if s.name == "worst")
    assert (worst.x0 + 0.5, worst.y0 + 0.5) == (5, 3)
    assert "output channel 5, group 3" in view.summary.object
    view.value = "scale"
    assert np.array_equal(np.asarray(view.pane.object.data[0].z), scales.T)
    select(view.state, "2")
    assert view.layer_picker.value == "2" and np.asarray(view.pane.object.data[0].z).shape == (3, 8)
    assert np.array_equal(np.asarray(view.pane.object.data[0].z), _torchao_scales(_model()[2], 8).T)


def test_the_group_size_what_if_and_its_apply(session):
    view = _view(session)
    view.group_size = 64
    assert "what-if from the float weight" in view.pane.object.layout.title.text
    assert np.array_equal(np.asarray(view.pane.object.data[0].customdata)[..., 3], _torchao_scales(_model()[0], 64).T)
    before = session.to_dataframe().loc["0", "weight_sqnr"]
    assert not view.apply_button.disabled
    assert view.apply()
    assert session.plan["0"].group_size == 64 and session.to_dataframe().loc["0", "weight_sqnr"] != before
    assert "torchao's own scales" in view.pane.object.layout.title.text and view.apply_button.disabled
    assert view.state.message_source == "groups" and view.messages.shown


def test_the_editor_offers_the_group_sizes_that_fit(session):
    state = DashboardState(session)
    editor = ConfigEditor(state=state)
    widget = editor.widgets["group_size"]
    assert widget.visible and widget.options == {"session's": 0, "32": 32, "64": 64, "128": 128}
    assert editor.group_size == 0 and editor.changes() == {}  # 0 stands for None, the session's
    select(state, "2")  # 24 inputs: none of 32/64/128 fit, nor the session's 32; its own 8 does
    assert widget.options == {"8": 8} and editor.group_size == 8
    select(state, "0")
    editor.group_size = 128
    assert editor.changes() == {"group_size": 128}
    assert editor.apply() and session.plan["0"].group_size == 128


def test_the_tab_exists_only_with_linear_layers_and_the_report_has_the_section(session):
    names = lambda dashboard: list(dashboard.sections()[2]._names)  # noqa: E731
    assert "Groups" in names(build_dashboard(session))
    g = torch.Generator().manual_seed(1)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    fx = qviz.Session(convs, [torch.randn(2, 3, 8, 8, generator=g)], flow="fx", progress=False).run()
    assert "Groups" not in names(build_dashboard(fx))
    with pytest.raises(ConfigError, match="'0' is Conv2d: weight groups are for Linear layers"):
        fx.weight_groups("0")
    html = build_report(session)
    assert '<section id="groups">' in html and 'id="group-table"' in html and "qviz-groups" in html

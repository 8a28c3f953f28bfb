"""FX on model code nobody here wrote: functional layers, layer-scale parameters, chunk/getitem,
a reused ReLU, integer masks, odd module names, models FX cannot trace.

Per-layer figures are checked against plain torch: prepare_fx / convert_fx run here by the test,
with every graph node's output recorded (cloned) by a torch.fx.Interpreter.
"""

from __future__ import annotations

import copy
import importlib
import math
import operator
import sys
import types
import unittest
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qviz
from qviz.errors import ModelError
from tests.helpers import assert_unchanged, model_snapshot
from tests.real_models import ChunkNet, ReusedReLU

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


# -- models of the patterns -------------------------------------------------------------------------

class TimmLinear(nn.Linear):
    """timm's Linear: an nn.Linear subclass whose forward calls F.linear (FX traces into it)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class TwoLinears(nn.Module):
    """One module running F.linear twice, with two weights of its own and a ReLU between."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.w2 = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1)), self.w2)


class FunctionalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.block = TwoLinears()
        self.head = TimmLinear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.fc(x)))


class FunctionalFirst(nn.Module):
    """Nothing quantized feeds the functional op: the model input goes straight into it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4) * 0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(F.linear(x, self.weight)))


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block: depthwise conv, channels-last MLP, layer-scale parameter gamma."""

    def __init__(self, c=8):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stages = nn.Sequential(nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock()))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardized in forward, then F.conv2d."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x) * mask


def _batches(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# -- plain torch figures ----------------------------------------------------------------------------

class _Recorder(torch.fx.Interpreter):
    """Runs a GraphModule node by node, keeping a clone of every tensor a node produced."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()
        return out


def _sqnr(x, y):
    x, y = x.double(), (y.dequantize() if y.is_quantized else y).double()
    return (20 * torch.log10(x.norm() / (x - y).norm())).item()


def _through_observers(gm, node):
    while isinstance(node, torch.fx.Node) and node.op == "call_module" and "activation_post_process" in node.target:
        node = node.args[0]
    return node


def _const(gm, a):
    if isinstance(a, torch.fx.Node):
        return operator.attrgetter(_through_observers(gm, a).target)(gm)
    return a


def plain_torch_figures(model, calib, mapping):
    """{op node name: (weight_sqnr, local_sqnr, output_sqnr)} of every F.linear / F.conv*d,
    from plain prepare_fx / convert_fx, figures on calib[0]."""
    observed = prepare_fx(copy.deepcopy(model).eval(), mapping, (calib[0],))
    with torch.no_grad():
        for x in calib:
            observed(x)
        quantized = convert_fx(copy.deepcopy(observed))
        fl, q = _Recorder(observed), _Recorder(quantized)
        fl.run(calib[0])
        q.run(calib[0])
    qnodes = {n.name: n for n in quantized.graph.nodes}
    figures = {}
    for node in observed.graph.nodes:
        if not (node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d)):
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and (users[0].target in (F.relu, torch.relu) or (
            users[0].op == "call_module" and isinstance(observed.get_submodule(users[0].target), nn.ReLU))) else None
        end = relu.name if relu is not None else node.name
        qnode = qnodes[node.name]
        quantized_out = q.values[end] if end in q.values and end != node.name else q.values[node.name]
        weight = _const(observed, node.args[1])
        if qnode.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):  # left float
            figures[node.name] = (math.nan, math.inf, _sqnr(fl.values[end], quantized_out))
            continue
        packed = _const(quantized, qnode.args[1])
        qweight = (torch.ops.quantized.linear_unpack(packed)[0] if node.target is F.linear
                   else packed.unpack()[0])
        x_in = q.values[qnode.args[0].name]
        x_in = x_in.dequantize() if x_in.is_quantized else x_in
        rest = [_const(observed, a) for a in node.args[1:]]
        shadow = node.target(x_in, *rest, **{k: _const(observed, v) for k, v in node.kwargs.items()})
        shadow = F.relu(shadow) if relu is not None else shadow  # FX fused it: quantized::*_relu
        figures[node.name] = (_sqnr(weight, qweight), _sqnr(shadow, quantized_out),
                              _sqnr(fl.values[end], quantized_out))
    return figures


def _functional_rows(table):
    return [n for n in table.index if table.loc[n, "type"].startswith("F.")]


def assert_matches_plain_torch(session, model, calib, mapping):
    table = session.to_dataframe()
    plain = plain_torch_figures(model, calib, mapping)
    rows = _functional_rows(table)
    assert len(rows) == len(plain), (rows, list(plain))
    for row, (w, loc, out) in zip(rows, plain.values(), strict=True):
        got = table.loc[row, ["weight_sqnr", "local_sqnr", "output_sqnr"]].to_numpy(dtype=float)
        for g, e in zip(got, (w, loc, out), strict=True):
            assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, abs=1e-3), (row, got, (w, loc, out))


# -- functional layers ------------------------------------------------------------------------------

def test_functional_ops_are_rows_named_from_the_float_model_with_plain_torch_figures():
    torch.manual_seed(0)
    model, calib = FunctionalHead().eval(), _batches((16, 4))
    before = model_snapshot(model)
    session = qviz.Session(model, calib, progress=False).run()
    table = session.to_dataframe()
    assert list(table.index) == ["fc", "block.linear#0", "block.linear#1", "head"]
    assert list(table.type) == ["Linear", "F.linear+relu", "F.linear", "F.linear"]
    assert table.quantized.all() and (table.weight_qscheme == "per_channel_affine").all()
    points = session.points()
    weights = points[points.role == "weight"]
    assert set(weights.layer) >= {"block.linear#0", "block.linear#1", "head"}
    assert set(points.layer) <= set(table.index) | {"x"}  # no row that does not exist
    assert_matches_plain_torch(session, model, calib, get_default_qconfig_mapping("x86"))
    assert_unchanged(model, before)


def _plain_output(model, calib, mapping):
    observed = prepare_fx(copy.deepcopy(model).eval(), mapping, (calib[0],))
    with torch.no_grad():
        for x in calib:
            observed(x)
        return convert_fx(observed)(calib[0])


@pytest.mark.parametrize("changes, mapping_fix", [
    ({"head": {"dtype": "float"}},
     lambda m: m.set_module_name("head", None)),
    ({"block.linear#1": {"dtype": "float"}},
     lambda m: m.set_module_name_object_type_order("block", F.linear, 1, None)),
])
def test_functional_row_to_float_and_back_leaves_neighbours_as_plain_torch_does(changes, mapping_fix):
    torch.manual_seed(0)
    model, calib = FunctionalHead().eval(), _batches((16, 4))
    before = model_snapshot(model)
    session = qviz.Session(model, calib, progress=False).run()
    start = session.to_dataframe()
    session.apply(changes)
    row = next(iter(changes))
    table = session.to_dataframe()
    assert table.loc[row, "dtype"] == "float"
    others = [n for n in table.index if n != row]
    assert (table.loc[others, "dtype"] == "quint8").all()
    assert (table.loc[others, "weight_sqnr"] == start.loc[others, "weight_sqnr"]).all()
    expected = _plain_output(model, calib, mapping_fix(get_default_qconfig_mapping("x86")))
    assert torch.equal(session.quantized_model()(calib[0]), expected)
    assert_matches_plain_torch(session, model, calib, mapping_fix(get_default_qconfig_mapping("x86")))
    session.apply({row: {"dtype": "int8"}})
    back = session.to_dataframe()
    assert (back.dtype == "quint8").all()
    cols = ["weight_sqnr", "local_sqnr", "output_sqnr"]
    assert (back[cols] - start[cols]).abs().max().max() < 1e-9
    assert_unchanged(model, before)


def test_neighbour_of_a_functional_first_layer_keeps_its_quantization():
    torch.manual_seed(0)
    model, calib = FunctionalFirst().eval(), _batches((16, 4))
    session = qviz.Session(model, calib, progress=False).run()
    assert list(session.to_dataframe().index) == ["linear#0", "fc"]
    session.apply({"fc": {"dtype": "float"}})
    table = session.to_dataframe()
    assert table.loc["linear#0", "dtype"] == "quint8"
    assert math.isfinite(table.loc["linear#0", "output_sqnr"])
    mapping = get_default_qconfig_mapping("x86").set_module_name("fc", None)
    expected = _plain_output(model, calib, mapping)
    out = session.quantized_model()(calib[0])
    assert torch.equal(out, expected)
    assert session.summary()["output_sqnr"] == pytest.approx(_sqnr(model(calib[0]), out), abs=1e-6)
    assert_matches_plain_torch(session, model, calib, mapping)


def test_a_plan_given_up_front_addresses_functional_rows_exactly():
    torch.manual_seed(0)
    model, calib = FunctionalHead().eval(), _batches((16, 4))
    live = qviz.Session(model, calib, progress=False).run().apply({"block.linear#0": {"dtype": "float"}})
    scratch = qviz.Session(model, calib, plan=live.plan, progress=False).run()
    assert list(scratch.to_dataframe().dtype) == list(live.to_dataframe().dtype)
    assert torch.equal(scratch.quantized_model()(calib[0]), live.quantized_model()(calib[0]))


@pytest.mark.parametrize("changes", [{"block.linear#0": {"dtype": "float"}},
                                     {"block.linear#1": {"weight": "per_tensor"}, "head": {"dtype": "float"}}])
def test_to_code_addresses_functional_rows_as_plain_torch_runs_them(changes):
    """The exported code, run by plain torch (prepare_fx, calibrate, convert_fx), computes what
    the session's quantized model computes: a "#" row is that one call, not a module name."""
    torch.manual_seed(0)
    model, calib = FunctionalHead().eval(), _batches((16, 4))
    session = qviz.Session(model, calib, progress=False).run().apply(changes)
    code = session.plan.to_code()
    assert "set_module_name_object_type_order(\"block\", torch.nn.functional.linear" in code
    namespace: dict = {}
    exec(compile(code, "plan.py", "exec"), namespace)
    plain = _plain_output(model, calib, namespace["build_qconfig_mapping"]())
    with torch.no_grad():
        assert torch.equal(plain, session.quantized_model()(calib[0]))


def _torch_test_models():
    """PyTorch's own quantization test models (torch.testing._internal), importable without
    expecttest (a test-only dependency of torch's that this venv lacks)."""
    sys.modules.setdefault("expecttest", types.SimpleNamespace(TestCase=unittest.TestCase))
    return importlib.import_module("torch.testing._internal.common_quantization")


FUNCTIONAL_MODELS = [
    "FunctionalLinear", "FunctionalConv2d", "FunctionalConvReluModel", "FunctionalConvReluConvModel",
    "FunctionalLinearAddModel", "FunctionalLinearReluLinearModel", "FunctionalLinearReluModel",
    "SingleLayerFunctionalConvModel", "SingleLayerFunctionalLinearModel",
    "TwoLayerFunctionalConvModel", "TwoLayerFunctionalLinearModel",
]
MODULE_MODELS = ["LinearModelWithSubmodule", "ConvBnReLUModel", "TwoLayerConvModel",
                 "LinearReluAddModel"]  # its forward assigns a new self.relu


@pytest.mark.slow
@pytest.mark.parametrize("name", FUNCTIONAL_MODELS + MODULE_MODELS)
def test_torch_quantization_test_models(name):
    cq = _torch_test_models()
    torch.manual_seed(0)
    model = getattr(cq, name)().eval()
    example = model.get_example_inputs()[0]
    calib = [torch.randn(8, *example.shape[1:]) for _ in range(2)]
    before = model_snapshot(model)
    session = qviz.Session(model, calib, progress=False).run()
    table = session.to_dataframe()
    assert len(table) >= 1 and table.quantized.all()
    for col in ("weight_sqnr", "local_sqnr", "output_sqnr"):
        assert table[col].map(math.isfinite).all(), (col, table[col])
    for row in table.index:  # named from the float model: the owning module, or '<owner>.<op>#<i>'
        owner = row.rpartition(".")[0] if "#" in row else row
        model.get_submodule(owner)
    if name in FUNCTIONAL_MODELS:
        assert _functional_rows(table)
        assert_matches_plain_torch(session, model, calib, get_default_qconfig_mapping("x86"))
        row = _functional_rows(table)[0]
        session.apply({row: {"dtype": "float"}})
        assert session.to_dataframe().loc[row, "dtype"] == "float"
        session.undo()
        assert (session.to_dataframe()[["weight_sqnr", "output_sqnr"]] == table[["weight_sqnr", "output_sqnr"]]).all().all()
    assert_unchanged(model, before)


# -- graphs re-conversion must handle ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("make, shape, changes", [
    (ConvNeXt, (4, 3, 8, 8), ({"stages.0.0.fc2": {"dtype": "float"}}, {"stem": {"dtype": "float"}})),
    (ChunkNet, (4, 3, 8, 8), ({"conv": {"dtype": "float"}}, {"conv2": {"weight": "per_tensor"}})),
    (ReusedReLU, (4, 3, 8, 8), ({"conv2": {"dtype": "float"}}, {"fc": {"activation": "minmax"}})),
    (FunctionalHead, (16, 4), ({"head": {"dtype": "float"}}, {"block.linear#0": {"weight": "per_tensor"}})),
    (StdConvNet, (4, 3, 8, 8), ({"conv": {"dtype": "float"}}, {"fc": {"dtype": "float"}})),
])
def test_patterns_run_apply_twice_and_undo(make, shape, changes):
    torch.manual_seed(0)
    model, calib = make().eval(), _batches(shape)
    before = model_snapshot(model)
    session = qviz.Session(model, calib, progress=False).run()
    start = session.to_dataframe()
    assert start.quantized.all()
    assert start[["weight_sqnr", "local_sqnr", "output_sqnr"]].map(math.isfinite).all().all()
    assert all(type(model.get_submodule(n.rpartition(".")[0] if "#" in n else n)) for n in start.index)
    for change in changes:
        session.apply(change)
        out = session.quantized_model()(calib[0])
        assert session.summary()["output_sqnr"] == pytest.approx(_sqnr(model(calib[0]), out), abs=1e-6)
        layer, fields = next(iter(change.items()))
        if fields.get("dtype") == "float":
            row = session.to_dataframe().loc[layer]
            assert row["dtype"] == "float" and row["local_sqnr"] == math.inf
    session.undo()
    session.undo()
    cols = ["dtype", "weight_sqnr", "local_sqnr", "output_sqnr"]
    assert session.to_dataframe()[cols].equals(start[cols])
    assert_unchanged(model, before)


@pytest.mark.slow
def test_points_new_at_reconversion_are_calibrated_and_said_so():
    """A first layer float from the start: making it int8 makes FX observe the model input and
    the conv's output, which calibration never saw."""
    torch.manual_seed(0)
    model, calib = ChunkNet().eval(), _batches((4, 3, 8, 8))
    default = qviz.Session(model, calib, progress=False).run()
    plan = default.plan.with_changes({"conv": {"dtype": "float"}})
    session = qviz.Session(model, calib, plan=plan, progress=False).run()
    with pytest.warns(UserWarning, match="calibration did not see") as caught:
        session.apply({"conv": {"dtype": "int8"}})
    text = " ".join(str(w.message) for w in caught if "calibration" in str(w.message))
    assert "the model input `x`" in text
    assert "getitem_" not in text and "activation_post_process" not in text
    cols = ["dtype", "weight_sqnr", "local_sqnr", "output_sqnr", "scale"]
    got, expected = session.to_dataframe()[cols], default.to_dataframe()[cols]
    assert (got.dtype == expected.dtype).all()
    assert (got.drop(columns="dtype") - expected.drop(columns="dtype")).abs().max().max() < 1e-6
    with warnings.catch_warnings():  # a second re-conversion reuses what that pass recorded
        warnings.simplefilter("error", UserWarning)
        session.apply({"conv": {"dtype": "float"}}).apply({"conv": {"dtype": "int8"}})


# -- errors that say what to do ---------------------------------------------------------------------

def test_integer_mask_at_an_observer_names_the_op_the_line_and_the_mapping_fix():
    model = Masked().eval()
    x, mask = torch.randn(4, 4), torch.randint(0, 2, (4, 4))
    with pytest.raises(ModelError) as err:
        qviz.Session(model, [(x, mask)], progress=False).run()
    text = str(err.value)
    assert "int64" in text and "`mask`" in text and "operator.mul" in text
    assert "test_fx_real_models.py" in text and "return self.fc(x) * mask" in text
    assert "qconfig_mapping.set_object_type(operator.mul, None)" in text
    mapping = get_default_qconfig_mapping("x86").set_object_type(operator.mul, None)
    session = qviz.Session(model, [(x, mask)], qconfig_mapping=mapping, progress=False).run()  # the advice works
    assert math.isfinite(session.to_dataframe().loc["fc", "output_sqnr"])


def test_user_code_in_a_folder_named_qviz_keeps_its_line(tmp_path, monkeypatch):
    folder = tmp_path / "work" / "qviz"
    folder.mkdir(parents=True)
    (folder / "usermodel_fx.py").write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x\n"
        "        return -x\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("usermodel_fx")
    with pytest.raises(ModelError) as err:
        qviz.Session(module.Branchy(), [torch.randn(2, 3)], progress=False).run()
    assert "usermodel_fx.py:4" in str(err.value) and "if x.sum() > 0:" in str(err.value)


def test_a_quote_in_a_module_name_is_a_clear_error():
    model = nn.Sequential()
    model.add_module('fc"1', nn.Linear(4, 4))
    with pytest.raises(ModelError, match="quote") as err:
        qviz.Session(model, [torch.randn(2, 4)], progress=False).run()
    assert "fc\"1" in str(err.value) and "flow='eager'" in str(err.value)


@pytest.mark.slow
def test_hugging_face_bert_under_fx_points_to_the_flows_that_take_it():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37)
    model = transformers.BertModel(config).eval()
    with pytest.raises(ModelError) as err:
        qviz.Session(model, [torch.randint(0, 99, (2, 8))], progress=False).run()
    text = str(err.value)
    assert "flow='pt2e'" in text and "'torchao'" in text and "'dynamic'" in text


def test_empty_qconfig_mapping_still_runs():
    """A mapping that quantizes nothing leaves functional rows float, not missing."""
    torch.manual_seed(0)
    model, calib = FunctionalHead().eval(), _batches((16, 4))
    session = qviz.Session(model, calib, qconfig_mapping=QConfigMapping(), progress=False)
    with pytest.warns(UserWarning, match="stayed float"):
        session.run()
    table = session.to_dataframe()
    assert set(table.index) == {"fc", "block.linear#0", "block.linear#1", "head"}
    assert (table.dtype == "float").all()

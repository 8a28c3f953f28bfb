"""The eager and dynamic flows on model code written the way real projects write it.

Eager: a model the user fused already (``fuse_modules``, the PyTorch tutorial way, and
``fuse_modules_qat``), a timm-style ``BatchNormAct2d``, ``out += identity`` on quantized tensors.
Dynamic: plans honoured by the first conversion, apply()/undo per layer, nothing to quantize,
no warnings about layers that were never candidates, LSTM and GRU language models.
Per-layer figures are checked against plain torch with forward hooks that clone what they keep.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

import qviz
from qviz.flows.base import quantized_engine
from qviz.flows.torch_ao.eager import unsupported_op_advice
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)
COLUMNS = ["weight_sqnr", "local_sqnr", "output_sqnr"]


def _sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return 20 * math.log10(float(x.norm()) / float((x - y).norm()))


def _deq(t):
    t = t[0] if isinstance(t, tuple) else t
    return t.dequantize() if t.is_quantized else t


def _outputs(model: nn.Module, names: list[str], args: tuple) -> tuple[dict, dict]:
    """(layer -> input, layer -> output), dequantized and cloned, of one run of ``model``."""
    ins, outs = {}, {}

    def hook(name):
        def record(module, inputs, output):
            ins[name] = _deq(inputs[0]).clone()
            outs[name] = _deq(output).clone()
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def _plain_figures(float_model: nn.Module, quantized: nn.Module, names: list[str], batch) -> dict:
    """output_sqnr and local_sqnr per layer, computed by hand on one batch."""
    _, ref = _outputs(float_model, names, (batch,))
    ins, out = _outputs(quantized, names, (batch,))
    figures = {}
    for n in names:
        with torch.no_grad():
            shadow = _deq(float_model.get_submodule(n)(ins[n]))
        figures[n] = {"output_sqnr": _sqnr(ref[n], out[n]), "local_sqnr": _sqnr(shadow, out[n])}
    return figures


# -- eager: a model the user fused already ---------------------------------------------------
class TutorialNet(nn.Module):
    """QuantStub/DeQuantStub and fuse_model(), as the PyTorch static-quantization tutorial has."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3), nn.ReLU()
        self.fc, self.relu3, self.head = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.conv2(x)).mean((2, 3))
        return self.dequant(self.head(self.relu3(self.fc(x))))

    GROUPS = [["conv1", "bn1", "relu1"], ["conv2", "relu2"], ["fc", "relu3"]]

    def fuse_model(self, qat: bool = False):
        (tq.fuse_modules_qat if qat else tq.fuse_modules)(self, self.GROUPS, inplace=True)
        return self


def _tutorial_net(qat: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = TutorialNet()
    with torch.no_grad():  # a BN that is not the identity, so folding it matters
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
        model.bn1.running_mean.uniform_(-0.1, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.train().fuse_model(qat=True).eval() if qat else model.eval().fuse_model()


CALIB = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
EVAL = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(10))]
LAYERS = ["conv1", "conv2", "fc", "head"]


def _torch_eager(model: nn.Module) -> nn.Module:
    """The tutorial's own steps on an already-fused model: qconfig, prepare, calibrate, convert."""
    prepared = copy.deepcopy(model)
    prepared.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(prepared, inplace=True)
    with torch.no_grad():
        for x in CALIB:
            prepared(x)
    return tq.convert(prepared)


@pytest.fixture(scope="module")
def fused_session():
    model = _tutorial_net()
    before = model_snapshot(model)
    session = qviz.Session(model, CALIB, eval_data=EVAL, flow="eager", progress=False).run()
    assert_unchanged(model, before)
    return model, session


def test_user_fused_model_rows_are_its_fused_modules(fused_session):
    _, s = fused_session
    df = s.to_dataframe()
    assert list(df.index) == LAYERS and s.plan.groups == ()
    assert list(df.type) == ["ConvReLU2d", "ConvReLU2d", "LinearReLU", "Linear"]
    assert df.quantized.all() and (df.dtype == "quint8").all()
    assert df[COLUMNS].apply(lambda c: c.map(math.isfinite)).all().all()


def test_user_fused_model_figures_match_plain_torch(fused_session):
    model, s = fused_session
    df = s.to_dataframe()
    with quantized_engine("x86"):
        quantized = _torch_eager(model)
        plain = _plain_figures(model, quantized, LAYERS, EVAL[0])
        s_out = s.quantized_model()(EVAL[0])
        assert torch.equal(s_out, quantized(EVAL[0]))  # the very model torch builds
    for n in LAYERS:
        float_weight = model.get_submodule(n)[0].weight if n != "head" else model.head.weight
        qweight = quantized.get_submodule(n).weight().dequantize()
        assert df.loc[n, "weight_sqnr"] == pytest.approx(_sqnr(float_weight.detach(), qweight), abs=1e-4), n
        for col in ("output_sqnr", "local_sqnr"):
            assert df.loc[n, col] == pytest.approx(plain[n][col], abs=1e-3), (n, col)


@pytest.mark.slow
def test_user_fused_model_apply_float_int4_back_and_undo(fused_session):
    model, _ = fused_session
    s = qviz.Session(model, CALIB, eval_data=EVAL, flow="eager", progress=False).run()
    start = s.to_dataframe()[COLUMNS]
    s.apply({"conv2": {"dtype": "float"}})
    df = s.to_dataframe()
    assert df.loc["conv2", "dtype"] == "float" and df.loc["conv2", "type"] == "ConvReLU2d"
    assert math.isnan(df.loc["conv2", "weight_sqnr"]) and df.loc["conv2", "local_sqnr"] == math.inf
    assert df.loc["conv1", "output_sqnr"] == start.loc["conv1", "output_sqnr"]  # upstream untouched
    s.apply({"conv2": {"dtype": "int4"}})
    df = s.to_dataframe()
    assert bool(df.loc["conv2", "simulated"]) and 15 < df.loc["conv2", "weight_sqnr"] < 35
    s.apply({"conv2": {"dtype": "int8"}})
    assert s.to_dataframe()[COLUMNS].equals(start)
    s.undo()
    assert s.plan["conv2"].dtype == "int4"
    s.undo()
    s.undo()
    assert s.to_dataframe()[COLUMNS].equals(start) and s.plan["conv2"].dtype == "int8"
    # apply() agrees with a session built from the plan with a full calibration pass
    s.apply({"fc": {"dtype": "float"}, "conv2": {"weight": "per_tensor"}})
    scratch = qviz.Session(model, CALIB, eval_data=EVAL, flow="eager", plan=s.plan, progress=False).run()
    a, b = s.to_dataframe()[COLUMNS], scratch.to_dataframe()[COLUMNS]
    assert ((a - b).abs().fillna(0) < 0.1).all().all() or a.equals(b)


def test_qat_fused_model_has_its_bn_folded_and_matches_plain_torch():
    """fuse_modules_qat gives ConvBnReLU2d, which eager convert leaves float (torch itself then
    fails on the quantized input): qviz folds the BN as fuse_modules does in eval mode."""
    model = _tutorial_net(qat=True)
    assert type(model.conv1).__name__ == "ConvBnReLU2d"
    with quantized_engine("x86"), pytest.raises(RuntimeError, match="quint8"):
        _torch_eager(model)(EVAL[0])
    before = model_snapshot(model)
    s = qviz.Session(model, CALIB, eval_data=EVAL, flow="eager", progress=False).run()
    assert_unchanged(model, before)
    df = s.to_dataframe()
    assert list(df.index) == LAYERS and df.loc["conv1", "type"] == "ConvReLU2d" and df.quantized.all()
    eval_fused = _tutorial_net(qat=False)  # the same weights fused in eval mode
    with quantized_engine("x86"):
        plain = _plain_figures(eval_fused, _torch_eager(eval_fused), LAYERS, EVAL[0])
    for n in LAYERS:
        assert df.loc[n, "output_sqnr"] == pytest.approx(plain[n]["output_sqnr"], abs=1e-3), n


@pytest.mark.slow
def test_fx_takes_the_user_fused_model(fused_session):
    model, eager = fused_session
    s = qviz.Session(model, CALIB, eval_data=EVAL, flow="fx", progress=False).run()
    df = s.to_dataframe()
    assert list(df.index) == LAYERS and df.quantized.all()
    assert list(df.type) == ["ConvReLU2d", "ConvReLU2d", "LinearReLU", "Linear"]
    for n in LAYERS:  # same observers, same data: the same figures as eager
        assert df.loc[n, "output_sqnr"] == pytest.approx(eager.to_dataframe().loc[n, "output_sqnr"], abs=1e-3)


# -- timm-style BatchNormAct2d -----------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation in one BatchNorm2d subclass (F.batch_norm, then the act)."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.dequant(self.fc(self.bn(self.conv(self.quant(x))).mean((2, 3))))


def test_batchnormact_row_shows_its_class():
    torch.manual_seed(0)
    s = qviz.Session(NormActNet().eval(), CALIB, flow="fx", progress=False).run()
    df = s.to_dataframe()
    assert df.loc["bn", "type"] == "BatchNormAct2d" and df.loc["bn", "dtype"] == "float"
    assert (df.type != "Module").all()


# -- eager: ops the backend cannot run on quantized tensors ------------------------------------
class Residual(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.skip_add = FloatFunctional() if functional else None

    def forward(self, x):
        out = self.conv(x)
        if self.skip_add is None:
            out += x
        else:
            out = self.skip_add.add(out, x)
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3), Residual(functional), nn.Linear(8, 4)

    def forward(self, x):
        return self.dequant(self.fc(self.block(self.stem(self.quant(x))).mean((2, 3))))


def _torch_failure(model: nn.Module) -> BaseException:
    with quantized_engine("x86"):
        try:
            _torch_eager(model.eval())(EVAL[0])
        except NotImplementedError as exc:
            return exc
    raise AssertionError("the quantized model ran")


def test_advice_for_arithmetic_on_quantized_tensors():
    exc = _torch_failure(ResNetLike())
    assert "aten::add.out" in str(exc)
    advice = unsupported_op_advice(exc, "block")
    assert "aten::add.out in 'block'" in advice and "FloatFunctional" in advice
    assert "skip_add.add(out, identity)" in advice and "DeQuantStub" in advice and "flow='fx'" in advice
    # the advice works: FloatFunctional runs in eager mode
    s = qviz.Session(ResNetLike(functional=True).eval(), CALIB, flow="eager", progress=False).run()
    assert list(s.to_dataframe().index) == ["stem", "block.conv", "fc"]


def test_advice_for_a_module_eager_does_not_convert():
    torch.manual_seed(0)
    exc = _torch_failure(NormActNet())
    advice = unsupported_op_advice(exc, "bn")
    assert "aten::native_batch_norm in 'bn'" in advice and "FloatFunctional" not in advice
    assert "DeQuantStub" in advice and "flow='fx'" in advice
    assert unsupported_op_advice(ValueError("shapes do not match")) is None


def test_session_names_the_op_and_the_fix():
    with pytest.raises(qviz.ModelError, match="(?s)aten::add.*block.*FloatFunctional"):
        qviz.Session(ResNetLike().eval(), CALIB, flow="eager", progress=False).run()


# -- dynamic ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LanguageModel(nn.Module):
    """Token ids in, logits out: embedding, a two-layer RNN, a projection and the head."""

    def __init__(self, rnn: type = nn.LSTM, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = rnn(dim, 32, num_layers=2, batch_first=True)
        self.proj, self.head = nn.Linear(32, 32), nn.Linear(32, vocab)

    def forward(self, ids):
        y, _ = self.rnn(self.embed(ids))
        return self.head(torch.relu(self.proj(y)))


TOKENS = [torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(i)) for i in range(2)]
MLP_DATA = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _plain_dynamic(model: nn.Module, spec) -> nn.Module:
    with quantized_engine("x86"):
        return tq.quantize_dynamic(copy.deepcopy(model), spec)


def _spec_from_code(code: str) -> dict:
    """Run Plan.to_code("dynamic")'s module and take its qconfig_spec."""
    namespace: dict = {}
    exec(code, namespace)
    return namespace["qconfig_spec"]


def test_dynamic_first_conversion_follows_the_plan():
    plan = qviz.Plan("x86", {"fc1": {"dtype": "fp16"}, "fc2": {"weight": "per_tensor"}, "fc3": {"dtype": "float"}})
    model = _mlp()
    s = qviz.Session(model, MLP_DATA, flow="dynamic", plan=plan, progress=False).run()
    df = s.to_dataframe()
    assert list(df.dtype) == ["float16 (dynamic)", "qint8 (dynamic)", "float"]
    assert s.plan == plan and s.quantized_model().fc1._packed_params.dtype == torch.float16
    code = s.plan.code_for(s.results.meta)
    spec = _spec_from_code(code)  # the code runs without qviz
    with quantized_engine("x86"):
        assert torch.equal(_plain_dynamic(model, spec)(MLP_DATA[0]), s.quantized_model()(MLP_DATA[0]))
    # weight_sqnr: fp16 far above int8, both as plain torch computes them
    plain = _plain_dynamic(model, spec)
    for n in ("fc1", "fc2"):
        want = _sqnr(model.get_submodule(n).weight.detach(), _deq(plain.get_submodule(n).weight()).float())
        assert df.loc[n, "weight_sqnr"] == pytest.approx(want, abs=1e-4)
    assert df.loc["fc1", "weight_sqnr"] > df.loc["fc2", "weight_sqnr"] + 20


def test_dynamic_plan_refuses_what_torch_cannot_run():
    plan = qviz.Plan("x86", {"fc1": {"dtype": "int4"}, "fc2": {}, "fc3": {}})
    with pytest.raises(qviz.ConfigError, match="'fc1'.*int4"):
        qviz.Session(_mlp(), MLP_DATA, flow="dynamic", plan=plan, progress=False).run()


def test_dynamic_default_plan_is_what_ran():
    s = qviz.Session(_mlp(), MLP_DATA, flow="dynamic", dynamic_dtype="int8", progress=False).run()
    assert {(c.dtype, c.weight) for c in s.plan.values()} == {("int8", "per_tensor")}
    assert s.to_dataframe().weight_qscheme.str.startswith("per_tensor").all()


def test_dynamic_apply_rebuilds_one_layer_and_undo_restores():
    model = _mlp()
    s = qviz.Session(model, MLP_DATA, flow="dynamic", progress=False).run()
    start = s.to_dataframe()[COLUMNS]
    measured, compare = [], s._comparator.compare

    def spy(quantized, measure=None, **kwargs):
        measured.append(list(measure))
        return compare(quantized, measure, **kwargs)

    s._comparator.compare = spy
    s.apply({"fc2": {"dtype": "fp16"}})
    assert measured == [["fc2", "fc3"]]  # the changed layer and those after it
    df = s.to_dataframe()
    assert df.loc["fc2", "dtype"] == "float16 (dynamic)" and df.loc["fc2", "weight_sqnr"] > 60
    assert df.loc["fc1", COLUMNS].equals(start.loc["fc1"])  # upstream not re-measured, same figures
    assert df.loc["fc3", "output_sqnr"] > start.loc["fc3", "output_sqnr"]
    s.apply({"fc1": {"dtype": "float"}})
    df = s.to_dataframe()
    assert df.loc["fc1", "dtype"] == "float" and df.loc["fc1", "local_sqnr"] == math.inf
    assert type(s.quantized_model().fc1) is nn.Linear
    # the live model is the plan's: torch builds the same from to_code()
    spec = _spec_from_code(s.plan.to_code("dynamic"))
    with quantized_engine("x86"):
        assert torch.equal(_plain_dynamic(model, spec)(MLP_DATA[0]), s.quantized_model()(MLP_DATA[0]))
    scratch = qviz.Session(model, MLP_DATA, flow="dynamic", plan=s.plan, progress=False).run()
    assert ((s.to_dataframe()[COLUMNS] - scratch.to_dataframe()[COLUMNS]).abs().fillna(0) < 1e-6).all().all()
    s.undo()
    assert s.plan["fc1"].dtype == "int8" and s.plan["fc2"].dtype == "fp16"
    s.undo()
    assert s.to_dataframe()[COLUMNS].equals(start)
    with pytest.raises(qviz.ConfigError, match="int4"):
        s.apply({"fc3": {"dtype": "int4"}})
    assert s.to_dataframe()[COLUMNS].equals(start)  # a refused change leaves the session as it was


def test_dynamic_search_climbs_int8_fp16_float():
    s = qviz.Session(_mlp(), MLP_DATA, flow="dynamic", progress=False).run()
    found = s.search(target_sqnr=55)
    assert {c.dtype for c in found.plan.values()} <= {"int8", "fp16", "float"}
    assert found.candidates.output_sqnr.max() >= 55 and s.plan["fc1"].dtype == "int8"


def test_dynamic_with_nothing_to_quantize_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(qviz.ModelError, match=r"quantized nothing.*Linear/LSTM/GRU.*Conv2d x1.*flow='fx'"):
        qviz.Session(model, [torch.randn(2, 3, 8, 8)], flow="dynamic", progress=False).run()


def test_dynamic_does_not_warn_about_layers_it_never_quantizes():
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = qviz.Session(ConvHead().eval(), [torch.randn(2, 3, 8, 8)], flow="dynamic", progress=False).run()
    assert not [w for w in caught if "stayed float" in str(w.message)]
    assert list(s.to_dataframe().index) == ["fc"]
    # a candidate the plan leaves float is still a row, and named in the warning
    plan = qviz.Plan("x86", {"fc": {"dtype": "float"}})
    with pytest.warns(UserWarning, match="stayed float.*: fc "):
        s = qviz.Session(ConvHead().eval(), [torch.randn(2, 3, 8, 8)], flow="dynamic", plan=plan, progress=False).run()
    assert s.to_dataframe().loc["fc", "dtype"] == "float"


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_language_models_under_dynamic(rnn, dtype, tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(rnn).eval()
    before = model_snapshot(model)
    s = qviz.Session(model, TOKENS, eval_data=TOKENS[:1], flow="dynamic", dynamic_dtype=dtype, progress=False).run()
    df = s.to_dataframe()
    wdtype = {"int8": "qint8", "fp16": "float16"}[dtype]
    torch_dtype = {"int8": torch.qint8, "fp16": torch.float16}[dtype]
    assert list(df.index) == ["rnn", "proj", "head"] and (df.dtype == f"{wdtype} (dynamic)").all()
    assert df.type.tolist() == [rnn.__name__, "Linear", "Linear"]
    assert df[COLUMNS].apply(lambda c: c.map(math.isfinite)).all().all()
    floor = 30 if dtype == "int8" else 60
    assert df.weight_sqnr.gt(floor).all() and df.output_sqnr.gt(floor - 10).all()
    # per-layer figures as plain torch gives them
    with quantized_engine("x86"):
        plain_q = tq.quantize_dynamic(copy.deepcopy(model), {nn.Linear, rnn}, dtype=torch_dtype)
        plain = _plain_figures(model, plain_q, ["rnn", "proj", "head"], TOKENS[0])
        assert torch.equal(plain_q(TOKENS[0]), s.quantized_model()(TOKENS[0]))
    for n in ("rnn", "proj", "head"):
        for col in ("output_sqnr", "local_sqnr"):
            assert df.loc[n, col] == pytest.approx(plain[n][col], abs=1e-3), (n, col)
    rnn_weights = plain_q.rnn.get_weight()
    want = _sqnr(torch.cat([model.rnn.get_parameter(k).detach().reshape(-1) for k in rnn_weights]),
                 torch.cat([_deq(w).float().reshape(-1) for w in rnn_weights.values()]))
    assert df.loc["rnn", "weight_sqnr"] == pytest.approx(want, abs=1e-4)
    # two one-layer changes, then undo
    other = "fp16" if dtype == "int8" else "int8"
    s.apply({"rnn": {"dtype": other}})
    assert s.to_dataframe().loc["rnn", "dtype"].startswith({"int8": "qint8", "fp16": "float16"}[other])
    s.apply({"head": {"dtype": "float"}})
    df2 = s.to_dataframe()
    assert df2.loc["head", "dtype"] == "float" and df2.loc["head", "local_sqnr"] == math.inf
    code = s.plan.to_code("dynamic")
    assert '"rnn": ' + ("float16_dynamic_qconfig" if other == "fp16" else "default_dynamic_qconfig") in code
    spec = _spec_from_code(code)  # no global entry that would reach the embedding
    with quantized_engine("x86"):
        assert torch.equal(_plain_dynamic(model, spec)(TOKENS[0]), s.quantized_model()(TOKENS[0]))
    s.undo()
    s.undo()
    assert s.to_dataframe()[COLUMNS].equals(df[COLUMNS])
    s.save(tmp_path / "lm.qviz")
    assert qviz.load(tmp_path / "lm.qviz").to_dataframe()[COLUMNS].equals(df[COLUMNS])
    assert s.report(tmp_path / "lm.html").stat().st_size > 0
    assert_unchanged(model, before)

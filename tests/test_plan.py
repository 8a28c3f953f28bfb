"""Tests for qviz.plan and the torch.ao flows' qconfigs and code: validation, plan edits, JSON,
backend support (qviz.flows.torch_ao.qconfigs) and the generated code (qviz.flows.torch_ao.codegen).

The generated code is exec()'d and must build observers identical to to_qconfig()'s and
quantized models whose outputs match qviz's own mapping bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.intrinsic import ConvReLU2d, LinearReLU
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qviz.errors import ConfigError, QvizError
from qviz.flows.torch_ao.qconfigs import check_plan, qconfig_mapping, supported, to_qconfig
from qviz.options import ACTIVATIONS, DTYPES, FORMAT_DTYPES, WEIGHT_SCHEMES
from qviz.plan import (
    BACKENDS,
    FORMAT_NAME,
    LayerConfig,
    Plan,
    UnknownLayerError,
    default_layer_config,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: intra-op threads only add overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine():
    """Set torch's quantized engine for one test and restore it afterwards."""
    before = torch.backends.quantized.engine

    def use(backend):
        torch.backends.quantized.engine = backend

    yield use
    torch.backends.quantized.engine = before


_OBS_ATTRS = (
    "dtype", "qscheme", "quant_min", "quant_max", "reduce_range", "is_dynamic", "ch_axis",
    "bins", "averaging_constant", "eps", "scale", "zero_point",
)  # fmt: skip


def _fingerprint(qconfig):
    """What makes two qconfigs build the same observers: classes and their settings."""
    if qconfig is None:
        return None
    out = []
    for ctor in (qconfig.activation, qconfig.weight):
        obs = ctor()
        attrs = {"class": type(obs)}
        for name in _OBS_ATTRS:
            if hasattr(obs, name):
                value = getattr(obs, name)
                attrs[name] = value.tolist() if isinstance(value, torch.Tensor) else value
        out.append(attrs)
    return out


def _layer_qconfig(mapping, name):
    return mapping.module_name_qconfigs.get(name, mapping.global_qconfig)


def _exec(code: str) -> dict:
    """Run generated code in a fresh namespace; it must not import qviz."""
    assert not re.search(r"^\s*(import|from)\s+qviz", code, re.MULTILINE)
    namespace: dict = {}
    exec(compile(code, "<plan code>", "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------- LayerConfig


def test_layer_config_defaults_and_round_trip():
    c = LayerConfig()
    assert (c.dtype, c.weight, c.weight_symmetric, c.activation) == (
        "int8", "per_channel", True, "histogram"
    )  # fmt: skip
    assert (c.percentile, c.activation_symmetric, c.reduce_range) == (99.99, False, False)
    assert not c.simulated and LayerConfig(dtype="int4").simulated
    d = LayerConfig(dtype="int4", activation="percentile", percentile=99).to_dict()
    assert d["percentile"] == 99.0 and isinstance(d["percentile"], float)
    assert LayerConfig.from_dict(json.loads(json.dumps(d))) == LayerConfig.from_dict(d)
    assert LayerConfig.from_dict({"dtype": "fp16"}) == LayerConfig(dtype="fp16")
    assert hash(LayerConfig(percentile=100)) == hash(LayerConfig(percentile=100.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dtype = "int4"


@pytest.mark.parametrize(
    "field, bad, valid",
    [
        ("dtype", "int16", DTYPES),
        ("dtype", None, DTYPES),
        ("weight", "per-channel", WEIGHT_SCHEMES),
        ("activation", "max", ACTIVATIONS),
    ],
)
def test_layer_config_choice_errors_name_value_and_choices(field, bad, valid):
    with pytest.raises(ConfigError) as info:
        LayerConfig(**{field: bad})
    message = str(info.value)
    assert repr(bad) in message and field in message
    assert all(repr(v) in message for v in valid)


def test_layer_config_suggests_close_choice():
    with pytest.raises(ConfigError, match="did you mean 'per_channel'"):
        LayerConfig(weight="per-channel")


@pytest.mark.parametrize("field", ["weight_symmetric", "activation_symmetric", "reduce_range"])
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_layer_config_bools_must_be_bools(field, bad):
    with pytest.raises(ConfigError, match=f"{field} must be True or False, not {bad!r}"):
        LayerConfig(**{field: bad})


@pytest.mark.parametrize("bad", [50, 49.9, 100.01, float("nan"), float("inf"), True, "99", None])
def test_layer_config_percentile_range(bad):
    with pytest.raises(ConfigError, match=r"percentile must be a number in \(50, 100\]"):
        LayerConfig(percentile=bad)
    assert LayerConfig(percentile=100).percentile == 100.0
    assert LayerConfig(percentile=50.001).percentile == 50.001


def test_symmetric_activations_with_reduce_range_refused_for_int8_only():
    with pytest.raises(ConfigError, match="reduce_range=False"):
        LayerConfig(activation_symmetric=True, reduce_range=True)
    # int4 ignores reduce_range (4-bit products cannot overflow), so the pair is harmless
    c = LayerConfig(dtype="int4", activation_symmetric=True, reduce_range=True)
    with pytest.raises(ConfigError, match="reduce_range"):
        c.replace(dtype="int8")


def test_replace_and_from_dict_refuse_unknown_fields():
    c = LayerConfig()
    assert c.replace(dtype="int4", weight="per_tensor") == LayerConfig(
        dtype="int4", weight="per_tensor"
    )
    assert c.dtype == "int8"  # unchanged
    with pytest.raises(ConfigError) as info:
        c.replace(dtyp="int4")
    assert "'dtyp'" in str(info.value) and "'reduce_range'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        LayerConfig.from_dict({"dtype": "int8", "bits": 4, "mode": "x"})
    assert "'bits', 'mode'" in str(info.value) and "'dtype'" in str(info.value)
    with pytest.raises(ConfigError, match="dict of fields"):
        LayerConfig.from_dict(["int8"])
    with pytest.raises(ConfigError, match="'int3'"):
        c.replace(dtype="int3")


# --------------------------------------------------------------------------- qconfigs


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_layer_config_matches_torch_default_qconfig(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onednn warns on CPUs without VNNI
        torch_default = tq.get_default_qconfig(backend)
    ours = to_qconfig(default_layer_config(backend), backend)
    assert _fingerprint(ours) == _fingerprint(torch_default)


def test_unknown_backend_and_flow():
    for call in (
        lambda: default_layer_config("tensorrt"),
        lambda: to_qconfig(LayerConfig(), "tensorrt"),
        lambda: supported(LayerConfig(), "tensorrt", nn.Linear),
        lambda: Plan("tensorrt", {}),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert "'tensorrt'" in str(info.value)
        assert all(repr(b) in str(info.value) for b in BACKENDS)
    with pytest.raises(ConfigError, match="'static', .*'dynamic'"):
        to_qconfig(LayerConfig(), "x86", flow="qat")


def test_to_qconfig_static_observers():
    qc = to_qconfig(
        LayerConfig(weight="per_tensor", weight_symmetric=False, activation="moving_average"),
        "x86",
    )
    act, w = qc.activation(), qc.weight()
    assert type(act) is tq.MovingAverageMinMaxObserver and type(w) is tq.MinMaxObserver
    assert (act.dtype, act.qscheme, act.quant_min, act.quant_max) == (
        torch.quint8, torch.per_tensor_affine, 0, 255
    )  # fmt: skip
    assert (w.dtype, w.qscheme) == (torch.qint8, torch.per_tensor_affine)

    qc = to_qconfig(LayerConfig(activation="minmax", activation_symmetric=True), "qnnpack")
    act, w = qc.activation(), qc.weight()
    assert type(act) is tq.MinMaxObserver and act.qscheme == torch.per_tensor_symmetric
    assert type(w) is tq.PerChannelMinMaxObserver and w.qscheme == torch.per_channel_symmetric

    # percentile: a MinMaxObserver whose range qviz overwrites
    qc = to_qconfig(LayerConfig(activation="percentile", reduce_range=True), "x86")
    assert type(qc.activation()) is tq.MinMaxObserver
    assert (qc.activation().quant_min, qc.activation().quant_max) == (0, 127)

    assert to_qconfig(LayerConfig(dtype="float"), "x86") is None
    assert to_qconfig(LayerConfig(dtype="fp16"), "x86") is tq.float16_static_qconfig


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("weight", WEIGHT_SCHEMES)
def test_to_qconfig_int4_is_int8_on_the_4_bit_range(activation, weight):
    config = LayerConfig(dtype="int4", weight=weight, activation=activation, reduce_range=True)
    qc = to_qconfig(config, "x86")
    act, w = qc.activation(), qc.weight()
    assert (act.dtype, act.quant_min, act.quant_max) == (torch.quint8, 0, 15)
    assert (w.dtype, w.quant_min, w.quant_max) == (torch.qint8, -8, 7)


def test_to_qconfig_dynamic():
    dyn = dict(flow="dynamic")
    assert to_qconfig(LayerConfig(), "x86", **dyn) is tq.per_channel_dynamic_qconfig
    assert to_qconfig(LayerConfig(weight="per_tensor"), "x86", **dyn) is tq.default_dynamic_qconfig
    assert to_qconfig(LayerConfig(dtype="fp16"), "x86", **dyn) is tq.float16_dynamic_qconfig
    assert to_qconfig(LayerConfig(dtype="float"), "x86", **dyn) is None
    with pytest.raises(ConfigError, match="int8 and fp16 only"):
        to_qconfig(LayerConfig(dtype="int4"), "x86", **dyn)


# --------------------------------------------------------------------------- backend support


def test_supported_matrix():
    ok = [
        (LayerConfig(), "x86", nn.Conv2d),
        (LayerConfig(weight_symmetric=False), "qnnpack", nn.Conv3d),
        (LayerConfig(weight="per_tensor"), "qnnpack", nn.ConvTranspose2d),
        (LayerConfig(weight="per_tensor"), "x86", nn.ConvTranspose3d),
        (LayerConfig(dtype="int4"), "onednn", nn.Linear),
        (LayerConfig(dtype="float"), "onednn", nn.Embedding),  # float runs anywhere
        (LayerConfig(), "x86", ConvReLU2d(nn.Conv2d(1, 1, 1), nn.ReLU())),  # fused instance
        (LayerConfig(), "x86", LinearReLU),  # fused class
    ]
    for config, backend, layer in ok:
        assert supported(config, backend, layer) is None
    refused = [
        (LayerConfig(dtype="fp16"), "x86", nn.Linear, "flow 'dynamic'"),
        (LayerConfig(weight_symmetric=False), "onednn", nn.Linear, "weight_symmetric=True"),
        (LayerConfig(), "qnnpack", nn.ConvTranspose1d, "weight='per_tensor'"),
        (LayerConfig(weight="per_tensor"), "onednn", nn.ConvTranspose2d, "wrong results"),
        (LayerConfig(weight="per_tensor"), "qnnpack", nn.ConvTranspose3d, "wrong results"),
        (LayerConfig(), "x86", nn.Embedding, "Conv1d/Conv2d"),
        (LayerConfig(), "x86", nn.LSTM, "Linear"),
    ]
    for config, backend, layer, hint in refused:
        with pytest.raises(ConfigError, match=hint):
            supported(config, backend, layer)
    with pytest.raises(ConfigError, match="Module class or instance"):
        supported(LayerConfig(), "x86", "Conv2d")


def test_supported_dynamic():
    dyn = dict(flow="dynamic")
    for layer in (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell):
        assert supported(LayerConfig(dtype="fp16"), "fbgemm", layer, **dyn) is None
        assert supported(LayerConfig(), "qnnpack", layer, **dyn) is None
    with pytest.raises(ConfigError, match="'x86' and 'fbgemm' only"):
        supported(LayerConfig(dtype="fp16"), "qnnpack", nn.Linear, **dyn)
    with pytest.raises(ConfigError, match="not Conv2d"):
        supported(LayerConfig(), "x86", nn.Conv2d, **dyn)
    with pytest.raises(ConfigError, match="int8 and fp16 only"):
        supported(LayerConfig(dtype="int4"), "x86", nn.Linear, **dyn)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def _configs(backend, dtype):
    """Each weight scheme x symmetry and each activation observer at least once, paired
    (differently for int4) on top of the backend default, to keep conversions few."""
    base = default_layer_config(backend)
    if dtype in ("fp16", "float"):
        return [base.replace(dtype=dtype)]
    weights = [(w, s) for w in WEIGHT_SCHEMES for s in (True, False)]
    shift = 1 if dtype == "int4" else 0
    return [
        base.replace(
            dtype=dtype,
            weight=weight,
            weight_symmetric=sym,
            activation=ACTIVATIONS[(i + shift) % len(ACTIVATIONS)],
            activation_symmetric=i % 2 == 1 and not base.reduce_range,
        )
        for i, (weight, sym) in enumerate(weights)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_every_config_converts_and_runs_in_fx(backend, dtype, engine):
    """prepare_fx/convert_fx with each config on a conv+linear model, or a clear refusal."""
    engine(backend)
    torch.manual_seed(0)
    model, x = _Tiny().eval(), torch.randn(16, 3, 8, 8)
    ref = model(x)
    for config in _configs(backend, dtype):
        try:
            supported(config, backend, nn.Conv2d)
            supported(config, backend, nn.Linear)
        except ConfigError as exc:
            assert (dtype == "fp16" and "flow 'dynamic'" in str(exc)) or (
                dtype in FORMAT_DTYPES and "flow 'torchao' only" in str(exc))  # torchao's number formats
            continue
        mapping = tq.QConfigMapping().set_global(to_qconfig(config, backend))
        prepared = prepare_fx(copy.deepcopy(model), mapping, (x,))
        prepared(x)
        quantized = convert_fx(prepared)
        seen = {}
        quantized.conv.register_forward_hook(lambda m, i, o, seen=seen: seen.setdefault("c", o))
        y = quantized(x)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        if dtype == "float":
            assert type(quantized.fc) is nn.Linear and torch.equal(y, ref)
            continue
        assert "quantized" in type(quantized.conv).__module__, config
        assert "quantized" in type(quantized.fc).__module__, config
        assert err < (0.05 if dtype == "int8" else 0.5), (config, err)
        if dtype == "int4":  # calibrated to 4 bits (+1 for rounding, see the test below)
            assert seen["c"].int_repr().max() <= 16


class _Stubbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def test_int4_simulation_limits_of_the_int8_kernels(engine):
    """Pins torch 2.13 behaviour that qviz's flows must correct for a faithful int4:
    eager convert clamps weights to the observer's -8..7, FX lowering does not (symmetric
    weights reach +8), and neither clamps outputs to 0..15 beyond the calibrated range."""
    engine("x86")
    torch.manual_seed(0)
    model, cal = _Stubbed().eval(), torch.randn(16, 3, 8, 8)
    qconfig = to_qconfig(LayerConfig(dtype="int4"), "x86")
    eager = copy.deepcopy(model)
    eager.qconfig = qconfig
    eager = tq.prepare(eager)
    eager(cal)
    eager = tq.convert(eager)
    w = eager.conv.weight().int_repr()
    assert (w.min(), w.max()) == (-8, 7)
    fx = _calibrated_fx(model, tq.QConfigMapping().set_global(qconfig), [cal])
    assert fx.conv.weight().int_repr().max() == 8
    seen = []
    fx.conv.register_forward_hook(lambda m, i, o: seen.append(o.int_repr().max().item()))
    fx(3 * cal)  # beyond the calibrated range
    assert seen[0] > 15


@pytest.mark.parametrize("dtype", ["int8", "fp16"])
@pytest.mark.parametrize("weight", WEIGHT_SCHEMES)
def test_dynamic_configs_convert(dtype, weight, engine):
    engine("x86")
    config = LayerConfig(dtype=dtype, weight=weight)
    model = nn.Sequential(nn.Linear(6, 4)).eval()
    q = tq.quantize_dynamic(model, {"": to_qconfig(config, "x86", flow="dynamic")})
    assert type(q[0]) is torch.ao.nn.quantized.dynamic.Linear
    assert q(torch.randn(2, 6)).shape == (2, 4)


# --------------------------------------------------------------------------- Plan

_NAMES = ["conv1", "bn1", "relu1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
_GROUPS = [("conv1", "bn1", "relu1")]


def _plan(backend="x86"):
    return Plan.default(_NAMES, backend, groups=_GROUPS)


def test_plan_default_and_read_access():
    plan = _plan()
    assert list(plan) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    assert len(plan) == 4 and plan.groups == (("conv1", "bn1", "relu1"),)
    assert all(plan[n] == default_layer_config("x86") for n in plan)
    assert "fc" in plan and "bn1" in plan and "nope" not in plan and 3 not in plan
    assert plan["relu1"] is plan["conv1"]  # a group member reads as its group
    assert plan.resolve("bn1") == "conv1" and plan.get("nope") is None
    assert dict(plan.items())["fc"] == plan["fc"]
    with pytest.raises(TypeError):
        plan.layers["fc"] = LayerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.backend = "qnnpack"
    assert hash(plan) == hash(_plan()) and plan == _plan() and plan != _plan("qnnpack")
    assert len({plan, _plan()}) == 1
    for twin in (copy.deepcopy(plan), pickle.loads(pickle.dumps(plan))):
        assert twin == plan and twin["bn1"] == plan["conv1"] and list(twin) == list(plan)


def test_unknown_layer_suggests_close_names():
    plan = _plan()
    with pytest.raises(UnknownLayerError) as info:
        plan["layer1.0.conv3"]
    assert "'layer1.0.conv3'" in str(info.value)
    assert "did you mean 'layer1.0.conv2', 'layer1.0.conv1'?" in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError, match="did you mean 'fc'"):
        plan.with_changes({"fc1": {"dtype": "float"}})
    with pytest.raises(ConfigError, match="the plan's layers are 'conv1'"):
        plan.with_changes({"zzzzzzz": {"dtype": "float"}})


def test_with_changes():
    plan = _plan()
    new = plan.with_changes(
        {
            "layer1.0.conv1": {"weight": "per_tensor"},
            "fc": LayerConfig(dtype="float"),
            "relu1": {"dtype": "int4"},  # a group member changes its group's key
        }
    )
    assert new["layer1.0.conv1"] == default_layer_config("x86").replace(weight="per_tensor")
    assert new["fc"] == LayerConfig(dtype="float")
    assert new["conv1"].dtype == "int4" and new["conv1"].reduce_range  # other fields kept
    assert list(new) == list(plan) and "bn1" not in new.layers
    assert plan == _plan()  # the original is untouched
    assert new.diff(plan) == ["conv1", "layer1.0.conv1", "fc"]
    assert plan.diff(plan) == []
    # entries apply in order, dict changes compose
    both = plan.with_changes({"conv1": {"dtype": "int4"}, "bn1": {"weight": "per_tensor"}})
    assert (both["conv1"].dtype, both["conv1"].weight) == ("int4", "per_tensor")


def test_with_changes_errors_name_the_layer():
    plan = _plan()
    with pytest.raises(ConfigError, match="layer 'fc': weight 'channel'"):
        plan.with_changes({"fc": {"weight": "channel"}})
    with pytest.raises(ConfigError, match="layer 'fc': unknown layer config field"):
        plan.with_changes({"fc": {"bits": 4}})
    with pytest.raises(ConfigError, match="layer 'fc': a change must be"):
        plan.with_changes({"fc": "int4"})
    with pytest.raises(ConfigError, match="changes must map"):
        plan.with_changes([("fc", LayerConfig())])


def test_plan_validation():
    with pytest.raises(ConfigError, match="'bn1'.* must not have a config of their own"):
        Plan("x86", {"conv1": LayerConfig(), "bn1": LayerConfig()}, (("conv1", "bn1"),))
    with pytest.raises(ConfigError, match="starts with 'bn1'"):
        Plan.default(["conv1", "fc"], "x86", groups=[("bn1", "relu1")])
    with pytest.raises(ConfigError, match="more than one fused group"):
        Plan.default(["a", "c"], "x86", groups=[("a", "b"), ("c", "b")])
    with pytest.raises(ConfigError, match="sequence of name tuples"):
        Plan.default(["a"], "x86", groups="ab")
    with pytest.raises(ConfigError, match="tuple of at least 2 layer names, not 'a'"):
        Plan.default(["a"], "x86", groups=("a", "b"))
    with pytest.raises(ConfigError, match="at least 2"):
        Plan.default(["a"], "x86", groups=[("a",)])
    with pytest.raises(ConfigError, match="list of names, not the string 'fc'"):
        Plan.default("fc", "x86")
    with pytest.raises(ConfigError, match="layer names are strings, not 3"):
        _plan()[3]
    with pytest.raises(ConfigError, match="layer 'fc': dtype 'int2'"):
        Plan("x86", {"fc": {"dtype": "int2"}})
    with pytest.raises(ConfigError, match="layer 'fc': expected a LayerConfig"):
        Plan("x86", {"fc": "int8"})
    assert Plan("x86", {"fc": {"dtype": "int4"}})["fc"] == LayerConfig(dtype="int4")


def test_plan_check_lists_every_unsupported_layer():
    plan = _plan("onednn").with_changes(
        {"fc": {"weight_symmetric": False}, "layer1.0.conv1": {"dtype": "fp16"}}
    )
    types = {"conv1": nn.Conv2d, "layer1.0.conv1": nn.Conv2d, "fc": nn.Linear}
    with pytest.raises(ConfigError) as info:
        check_plan(plan, types)
    message = str(info.value)
    assert message.startswith("2 layer(s)") and "layer 'fc'" in message
    assert "layer 'layer1.0.conv1'" in message and "layer 'conv1'" not in message
    check_plan(_plan("onednn"), types)


# --------------------------------------------------------------------------- JSON


def test_json_round_trip():
    plan = _plan().with_changes(
        {"fc": {"activation": "percentile", "percentile": 99.9}, "bn1": {"dtype": "int4"}}
    )
    text = plan.to_json()
    doc = json.loads(text)
    assert (doc["format"], doc["version"], doc["backend"]) == (FORMAT_NAME, 1, "x86")
    back = Plan.from_json(text)
    assert back == plan and back.groups == plan.groups and list(back) == list(plan)
    assert Plan.from_json(text, layer_names=_NAMES) == plan  # members may be listed
    assert Plan.from_json(text, layer_names=list(plan)) == plan  # or not


def test_from_json_of_another_model_names_missing_and_extra_layers():
    text = _plan().to_json()
    with pytest.raises(ConfigError) as info:
        Plan.from_json(text, layer_names=["conv1", "layer1.0.conv1", "layer2.0.conv1", "head"])
    message = str(info.value)
    assert "another model" in message
    assert "'layer2.0.conv1', 'head'" in message  # missing from the plan
    assert "'layer1.0.conv2', 'fc'" in message  # extra in the plan


@pytest.mark.parametrize(
    "text, hint",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", '"format": "qviz-plan"'),
        ('{"format": "qviz-session", "version": 1}', '"format": "qviz-plan"'),
        ('{"format": "qviz-plan", "version": 2, "backend": "x86", "layers": {}}', "upgrade"),
        ('{"format": "qviz-plan", "version": "1", "backend": "x86", "layers": {}}', "version"),
        ('{"format": "qviz-plan", "version": 1, "backend": "x86"}', "malformed"),
        ('{"format": "qviz-plan", "version": 1, "backend": "x86", "layers": {}, "x": 1}', "'x'"),
        ('{"format": "qviz-plan", "version": 1, "backend": "x86", "layers": [], "groups": []}',
         "malformed"),
        ('{"format": "qviz-plan", "version": 1, "backend": "x86", "layers": {}, "groups": "a"}',
         "groups"),
        ('{"format": "qviz-plan", "version": 1, "backend": "tpu", "layers": {}}', "'tpu'"),
        ('{"format": "qviz-plan", "version": 1, "backend": "x86", "layers": {"fc": {"b": 1}}}',
         "layer 'fc': unknown layer config field"),
    ],
)  # fmt: skip
def test_from_json_refuses_malformed_documents(text, hint):
    with pytest.raises(ConfigError, match=hint.replace("(", r"\(")) as info:
        Plan.from_json(text)
    assert isinstance(info.value, QvizError)


# --------------------------------------------------------------------------- generated code


class _Net(nn.Module):
    """Conv-bn-relu group, a residual add (an op outside the plan), convs and linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 10)
        self.fc3 = nn.Linear(10, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x
        x = torch.flatten(self.conv3(x), 1)
        return self.fc3(self.fc2(torch.relu(self.fc1(x))))


_NET_NAMES = ["conv1", "bn1", "relu1", "conv2", "conv3", "fc1", "fc2", "fc3"]


def _net_plan(backend):
    changes = {
        "conv2": {"dtype": "int4", "weight_symmetric": False},
        "conv3": {"weight": "per_tensor", "activation": "moving_average"},
        "fc1": {"activation": "percentile"},
        "fc2": {"dtype": "float"},
        "fc3": {"activation": "minmax", "reduce_range": False, "activation_symmetric": True},
    }
    return Plan.default(_NET_NAMES, backend, [("conv1", "bn1", "relu1")]).with_changes(changes)


def _calibrated_fx(model, mapping, batches):
    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (batches[0],))
    for b in batches:
        prepared(b)
    return convert_fx(prepared)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_fx_code_builds_the_same_quantized_model(backend, engine):
    engine(backend)
    plan = _net_plan(backend)
    code = plan.to_code("fx")
    assert 'set_module_name("fc2", None)' in code
    assert "MinMaxObserver" in code and "Percentile activations: 'fc1'" in code
    generated = _exec(code)["build_qconfig_mapping"]()
    ours = qconfig_mapping(plan)
    assert isinstance(generated, tq.QConfigMapping)
    assert _fingerprint(generated.global_qconfig) == _fingerprint(ours.global_qconfig)
    for name in plan:
        expected = _fingerprint(to_qconfig(plan[name], backend))
        assert _fingerprint(_layer_qconfig(generated, name)) == expected, name
        assert _fingerprint(_layer_qconfig(ours, name)) == expected, name

    torch.manual_seed(0)
    model = _Net().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    a = _calibrated_fx(model, generated, batches)
    b = _calibrated_fx(model, ours, batches)
    x = torch.randn(5, 3, 8, 8)
    assert "quantized" in type(a.conv2).__module__ and type(a.fc2) is nn.Linear
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert ((ya - model(x)).abs().max() / model(x).abs().max()) < 0.5


def test_fx_code_pins_percentile_qparams(engine):
    engine("x86")
    plan = _net_plan("x86")
    code = plan.to_code("fx", fixed_qparams={"fc1": (0.0625, 3)})
    assert "FixedQParamsObserver.with_args" in code and "Percentile activations" not in code
    mapping = _exec(code)["build_qconfig_mapping"]()
    act = mapping.module_name_qconfigs["fc1"].activation()
    assert type(act) is tq.FixedQParamsObserver
    assert (act.dtype, act.quant_min, act.quant_max) == (torch.quint8, 0, 127)  # reduce_range
    # only the activation is pinned: the weight observer is what to_qconfig builds
    want = _fingerprint(to_qconfig(plan["fc1"], "x86"))[1]
    assert _fingerprint(mapping.module_name_qconfigs["fc1"])[1] == want
    torch.manual_seed(0)
    q = _calibrated_fx(_Net(), mapping, [torch.randn(4, 3, 8, 8)])
    assert (q.fc1.scale, q.fc1.zero_point) == (0.0625, 3)


def test_fixed_qparams_errors():
    plan = _net_plan("x86")
    with pytest.raises(ConfigError, match="did you mean 'fc3', 'fc2', 'fc1'"):
        plan.to_code("fx", fixed_qparams={"fc0": (0.1, 0)})
    with pytest.raises(ConfigError, match="only int8/int4 layers with activation 'percentile'"):
        plan.to_code("fx", fixed_qparams={"fc3": (0.1, 0)})
    for bad in [(0.1, 128), (0.0, 0), (float("nan"), 0), (0.1, 1.5), (0.1,), "x"]:
        with pytest.raises(ConfigError, match=r"zero_point in \[0, 127\]"):
            plan.to_code("eager", fixed_qparams={"fc1": bad})
    with pytest.raises(ConfigError, match="fx' and 'eager' only"):
        plan.to_code("dynamic", fixed_qparams={"fc1": (0.1, 0)})
    with pytest.raises(ConfigError, match="'fx', 'eager', 'dynamic'"):
        plan.to_code("onnx")


class _EagerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 10)
        self.dequant = tq.DeQuantStub()
        self.fc2 = nn.Linear(10, 10)

    def forward(self, x):
        x = self.conv2(self.relu1(self.bn1(self.conv1(self.quant(x)))))
        return self.fc2(self.dequant(self.fc1(torch.flatten(x, 1))))


def _eager(model, apply, batches):
    model = tq.fuse_modules(copy.deepcopy(model).eval(), [["conv1", "bn1", "relu1"]])
    prepared = tq.prepare(apply(model))
    for b in batches:
        prepared(b)
    return tq.convert(prepared)


def test_eager_code_builds_the_same_quantized_model(engine):
    engine("x86")
    plan = Plan.default(
        ["conv1", "bn1", "relu1", "conv2", "fc1", "fc2"], "x86", [("conv1", "bn1", "relu1")]
    ).with_changes(
        {"conv2": {"dtype": "int4"}, "fc1": {"activation": "minmax"}, "fc2": {"dtype": "float"}}
    )
    apply = _exec(plan.to_code("eager"))["apply_qconfigs"]
    mapping = qconfig_mapping(plan)

    def ours(model):
        model.qconfig = mapping.global_qconfig
        for name, qconfig in mapping.module_name_qconfigs.items():
            model.get_submodule(name).qconfig = qconfig
        return model

    torch.manual_seed(0)
    model = _EagerNet().eval()
    applied = apply(tq.fuse_modules(copy.deepcopy(model), [["conv1", "bn1", "relu1"]]))
    for name in plan:  # every planned layer gets its own qconfig
        qconfig = applied.get_submodule(name).qconfig
        assert _fingerprint(qconfig) == _fingerprint(to_qconfig(plan[name], "x86")), name
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    a, b = _eager(model, apply, batches), _eager(model, ours, batches)
    x = torch.randn(5, 3, 8, 8)
    assert type(a.fc2) is nn.Linear and "quantized" in type(a.conv2).__module__
    assert torch.equal(a(x), b(x))


class _RNNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.lstm(self.fc1(x))
        return self.fc3(self.fc2(y))


def test_dynamic_code_builds_the_same_quantized_model(engine):
    engine("x86")
    plan = Plan.default(["fc1", "lstm", "fc2", "fc3"], "x86").with_changes(
        {"lstm": {"weight": "per_tensor"}, "fc2": {"dtype": "fp16"}, "fc3": {"dtype": "float"}}
    )
    spec = _exec(plan.to_code("dynamic"))["qconfig_spec"]
    mapping = qconfig_mapping(plan, flow="dynamic")
    assert list(spec) == list(plan)  # every layer by name, no global that could reach others
    for name in plan:
        assert _fingerprint(spec[name]) == _fingerprint(
            to_qconfig(plan[name], "x86", flow="dynamic")
        ), name
    ours = {"": mapping.global_qconfig, **mapping.module_name_qconfigs}
    torch.manual_seed(0)
    model = _RNNNet().eval()
    a = tq.quantize_dynamic(copy.deepcopy(model), qconfig_spec=spec)
    b = tq.quantize_dynamic(copy.deepcopy(model), qconfig_spec=ours)
    assert type(a.lstm) is torch.ao.nn.quantized.dynamic.LSTM and type(a.fc3) is nn.Linear
    x = torch.randn(3, 2, 6)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ConfigError, match="layer 'fc1': dtype 'int4'"):
        plan.with_changes({"fc1": {"dtype": "int4"}}).to_code("dynamic")


def test_code_global_is_the_majority_and_names_are_quoted():
    odd = 'block"1\\conv'
    plan = Plan.default(["a", "b", "c", odd], "qnnpack").with_changes(
        {"a": {"dtype": "float"}, "b": {"dtype": "float"}, "c": {"dtype": "float"}}
    )
    code = plan.to_code("fx")
    assert "set_global(None)" in code and code.count("set_module_name(") == 1
    mapping = _exec(code)["build_qconfig_mapping"]()
    assert mapping.global_qconfig is None
    assert _fingerprint(mapping.module_name_qconfigs[odd]) == _fingerprint(
        to_qconfig(default_layer_config("qnnpack"), "qnnpack")
    )
    # ties go to the backend default; an empty plan is just the default
    tie = Plan.default(["a", "b"], "x86").with_changes({"a": {"dtype": "int4"}})
    assert _fingerprint(qconfig_mapping(tie).global_qconfig) == _fingerprint(
        to_qconfig(default_layer_config("x86"), "x86")
    )
    empty = _exec(Plan("x86", {}).to_code("eager"))
    assert callable(empty["apply_qconfigs"])


# --------------------------------------------------------------------------- code through the registry


def _toy_flow(name: str, plan_code=None) -> type:
    """A registered flow doing nothing but (optionally) writing code; ``plan_code(cls, plan, ...)``."""
    from qviz.flows.base import Flow

    body = {method: lambda *a, **k: None for method in Flow.__abstractmethods__}
    body["name"] = name
    if plan_code is not None:
        body["plan_code"] = classmethod(plan_code)
    return type(f"{name.title()}Flow", (Flow,), body)


def test_to_code_and_code_for_go_to_the_flows_plan_code():
    from qviz.flows.registry import register_flow, unregister_flow

    plan = Plan.default(["fc"], "x86")
    register_flow(_toy_flow("toywriter", lambda cls, plan, level=1: f"# {len(plan)} layer(s), level {level}"))
    register_flow(_toy_flow("toysilent"))
    try:
        assert plan.to_code("toywriter") == "# 1 layer(s), level 1"
        assert plan.to_code("toywriter", level=3) == "# 1 layer(s), level 3"
        # a session's meta: its own entries stay out, the flow's options go to its code
        meta = {"flow": "toywriter", "backend": "x86", "torch": "2.13", "qviz": "0", "level": 2}
        assert plan.code_for(meta) == "# 1 layer(s), level 2"
        with pytest.raises(ConfigError, match="'depth' do not apply to flow 'toywriter'; its code takes 'level'"):
            plan.to_code("toywriter", depth=2)
        with pytest.raises(ConfigError, match="'depth' do not apply"):  # nothing in a meta is ignored
            plan.code_for({**meta, "depth": 2})
        with pytest.raises(ConfigError, match="flow 'toysilent' cannot write a plan as code"):
            plan.to_code("toysilent")
        with pytest.raises(ConfigError, match="'scheme' do not apply to flow 'fx'; its code takes 'fixed_qparams'"):
            plan.to_code("fx", scheme="int8_dynamic")
    finally:
        unregister_flow("toywriter")
        unregister_flow("toysilent")
    assert plan.code_for({}) == plan.to_code("fx")  # no flow named: the default's code

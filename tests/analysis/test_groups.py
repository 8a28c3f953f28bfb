"""Weight groups: per-group int4 scales and error (qviz.analysis.groups, Session.weight_groups), the
per-layer group_size what-if through apply(), its plan JSON and code; checked against torchao's
own tensors, built here by quantize_ on copies of the float layers, and brute-force group SQNRs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qviz
from qviz.errors import ConfigError, QvizError
from qviz.plan import LayerConfig, Plan
from tests.helpers import assert_unchanged, model_snapshot
from tests.real_models import llama

ao = pytest.importorskip("torchao.quantization", reason="torchao is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def _hand_model() -> nn.Module:
    """Two linears; one planted large weight in row 3, group 1 of the first (inputs 32..63)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[0].weight[3, 40] = 2.0
    return model.eval()


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 128, generator=g) for _ in range(n)]


def _torchao_weight(layer: nn.Linear, group_size: int, symmetric: bool = True, dynamic: bool = False):
    """torchao's own int4 weight of a copy of ``layer``, made by quantize_ without qviz."""
    mapping = ao.MappingType.SYMMETRIC if symmetric else ao.MappingType.ASYMMETRIC
    config = (ao.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=ao.PerGroup(group_size),
                                                       weight_mapping_type=mapping) if dynamic else
              ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(group_size), mapping_type=mapping))
    holder = nn.Sequential(copy.deepcopy(layer))
    ao.quantize_(holder, config)
    return holder[0].weight


def _brute_force_sqnr(float_weight: torch.Tensor, dequantized: torch.Tensor, group_size: int) -> np.ndarray:
    """Each (output channel, group)'s SQNR in dB, one group at a time."""
    w, q = float_weight.detach().double().numpy(), dequantized.detach().double().numpy()
    out = np.empty((w.shape[0], w.shape[1] // group_size))
    for c in range(w.shape[0]):
        for g in range(out.shape[1]):
            x, y = w[c, g * group_size:(g + 1) * group_size], q[c, g * group_size:(g + 1) * group_size]
            out[c, g] = 20 * math.log10(np.linalg.norm(x) / np.linalg.norm(x - y))
    return out


def _assert_matches_torchao(frame, weight, float_weight) -> None:
    group_size = weight.block_size[1]
    shape = (weight.shape[0], weight.shape[1] // group_size)
    assert frame.attrs["group_size"] == group_size and len(frame) == shape[0] * shape[1]
    assert np.array_equal(frame["scale"].to_numpy().reshape(shape), weight.scale.reshape(shape).numpy())
    assert np.array_equal(frame["zero_point"].to_numpy().reshape(shape), weight.zero_point.reshape(shape).numpy())
    np.testing.assert_allclose(frame["sqnr"].to_numpy().reshape(shape),
                               _brute_force_sqnr(float_weight, weight.dequantize(), group_size), rtol=1e-9)


@pytest.mark.parametrize(("scheme", "symmetric"), [("int4_weight_only", True), ("int4_weight_only", False),
                                                   ("int8_dynamic", True)])
def test_hand_model_groups_are_torchaos_own(scheme, symmetric):
    model = _hand_model()
    before = model_snapshot(model)
    layers = {"0": LayerConfig(dtype="int4", weight_symmetric=symmetric),
              "2": LayerConfig(dtype="int4", weight_symmetric=symmetric, group_size=8)}
    s = qviz.Session(model, _data(2, 1), flow="torchao", scheme=scheme, group_size=32, progress=False,
                     plan=Plan("x86", layers)).run()
    frame = s.weight_groups("0")
    assert frame.attrs["source"] == "torchao" and frame.attrs["symmetric"] is symmetric
    _assert_matches_torchao(frame, _torchao_weight(model[0], 32, symmetric, scheme == "int8_dynamic"), model[0].weight)
    assert (frame["zero_point"] == 0).all() == symmetric
    worst = frame.loc[frame["sqnr"].idxmin()]  # the planted weight spoils its own group most
    assert (worst["output_channel"], worst["group"], worst["first_input"]) == (3, 1, 32)
    _assert_matches_torchao(s.weight_groups("2"), _torchao_weight(model[2], 8, symmetric, scheme == "int8_dynamic"),
                            model[2].weight)
    assert_unchanged(model, before)


def test_tiny_llama_groups_are_torchaos_own_and_the_what_if_matches_torchao_at_other_sizes():
    model, calib, evals = llama()
    s = qviz.Session(model, calib, eval_data=evals, flow="torchao", scheme="int4_weight_only", group_size=32,
                     progress=False).run()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        _assert_matches_torchao(s.weight_groups(name), _torchao_weight(layer, 32), layer.weight)
        what_if = s.weight_groups(name, group_size=16)  # not the converted size: computed from the float weight
        assert what_if.attrs["source"] == "what-if"
        _assert_matches_torchao(what_if, _torchao_weight(layer, 16), layer.weight)


def test_what_if_on_another_flow_matches_torchao():
    model = _hand_model()
    s = qviz.Session(model, _data(2, 1), flow="dynamic", progress=False).run()
    default = s.weight_groups("0")
    assert (default.attrs["source"], default.attrs["group_size"]) == ("what-if", 32)
    _assert_matches_torchao(default, _torchao_weight(model[0], 32), model[0].weight)
    _assert_matches_torchao(s.weight_groups("0", 64), _torchao_weight(model[0], 64), model[0].weight)
    # 24 inputs: 32 does not divide them, so the default is the largest usual size that does
    assert s.weight_groups("2").attrs["group_size"] == 8


def test_apply_group_size_reconverts_the_layer_as_a_fresh_session_would():
    model = _hand_model()
    before = model_snapshot(model)
    calib, evals = _data(2, 1), _data(1, 2)
    options = dict(flow="torchao", scheme="int4_weight_only", progress=False, eval_data=evals)
    plan = Plan("x86", {"0": LayerConfig(dtype="int4"), "2": LayerConfig(dtype="int4", group_size=8)})
    s = qviz.Session(model, calib, group_size=32, plan=plan, **options).run()
    at_32 = s.to_dataframe().loc["0"]
    s.apply({"0": {"group_size": 64}})
    assert s.plan["0"].group_size == 64 and s.plan["2"].group_size == 8
    fresh = qviz.Session(model, calib, group_size=32, plan=s.plan, **options).run()
    row, want = s.to_dataframe().loc["0"], fresh.to_dataframe().loc["0"]
    for column in ("weight_sqnr", "local_sqnr", "output_sqnr"):
        assert row[column] == pytest.approx(want[column], rel=1e-6)
    assert row["weight_sqnr"] != pytest.approx(at_32["weight_sqnr"], rel=1e-4)  # the error really changed
    frame = s.weight_groups("0")
    assert frame.attrs == {"layer": "0", "group_size": 64, "source": "torchao", "symmetric": True}
    _assert_matches_torchao(frame, _torchao_weight(model[0], 64), model[0].weight)
    # the session-wide group_size=64 quantizes this layer the same way (24-input layer 2 left float)
    wide = s.plan.with_changes({"0": {"group_size": None}, "2": {"dtype": "float"}})
    all_64 = qviz.Session(model, calib, group_size=64, plan=wide, **options).run()
    assert all_64.to_dataframe().loc["0", "weight_sqnr"] == pytest.approx(row["weight_sqnr"], rel=1e-9)
    s.undo()
    assert s.to_dataframe().loc["0", "weight_sqnr"] == pytest.approx(at_32["weight_sqnr"], rel=1e-9)
    assert_unchanged(model, before)


def test_plan_json_and_code_carry_the_layer_group_size():
    model = _hand_model()
    s = qviz.Session(model, _data(2, 1), flow="torchao", scheme="int8_dynamic", group_size=32, progress=False).run()
    s.apply({"0": {"dtype": "int4", "group_size": 64}})
    loaded = Plan.from_json(s.plan.to_json(), list(s.plan))
    assert loaded == s.plan and loaded["0"].group_size == 64
    assert "group_size 64" in loaded["0"].describe()
    code = s.plan.code_for(s.results.meta)
    assert "PerGroup(64)" in code
    namespace: dict = {}
    exec(compile(code, "<plan>", "exec"), namespace)  # noqa: S102 - our own generated code
    copy_ = copy.deepcopy(model)
    namespace["quantize_"](copy_, namespace["build_config"](), filter_fn=None)
    assert torch.equal(copy_[0].weight.dequantize(), s.quantized_model()[0].weight.dequantize())
    assert copy_[0].weight.block_size == (1, 64)


def test_bad_group_sizes_get_clear_errors(tmp_path):
    for bad in (0, -32, True, "32", 32.0):
        with pytest.raises(ConfigError, match="group_size must be a positive int"):
            LayerConfig(dtype="int4", group_size=bad)
    config = LayerConfig(dtype="int4", group_size=np.int64(64))  # a numpy integer is kept as an int
    assert type(config.group_size) is int and '"group_size": 64' in Plan("x86", {"fc": config}).to_json()
    model = _hand_model()
    plan = Plan("x86", {"0": LayerConfig(dtype="int4"), "2": LayerConfig(dtype="int4", group_size=8)})
    s = qviz.Session(model, _data(2, 1), flow="torchao", scheme="int4_weight_only", plan=plan, progress=False).run()
    with pytest.raises(ConfigError, match=r"'0': group_size 48 does not divide its in_features \(128\); use one of 128, 64"):
        s.apply({"0": {"group_size": 48}})
    assert s.plan == plan  # refused: nothing changed
    with pytest.raises(ConfigError, match=r"group_size 48 does not fit layer '0'.*in_features \(128\)"):
        s.weight_groups("0", 48)
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        s.weight_groups("nope")
    assert s.choices("0", "group_size", (None, 32, 48, 64, 128)) == (None, 32, 64, 128)
    assert s.choices("2", "group_size", (None, 8, 32, 64)) == (8,)  # None: the flow's 32, which does not fit
    fx = qviz.Session(model, _data(2, 1), flow="fx", progress=False).run()
    with pytest.raises(ConfigError, match="group_size 64 applies to flow 'torchao' only"):
        fx.apply({"0": {"dtype": "int4", "group_size": 64}})
    s.save(tmp_path / "s.qviz")
    with pytest.raises(QvizError, match="holds no weights"):
        qviz.load(tmp_path / "s.qviz").weight_groups("0")

"""torchao number formats per layer (float8, MX, NVFP4): torchao's own values, independent references,
sizes in bits per weight, live apply, code, refusals, and a search whose ladder mixes them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qviz
from qviz.analysis.metrics import sqnr
from qviz.analysis.search import weight_bytes
from qviz.errors import ConfigError
from qviz.flows.torchao import formats
from qviz.options import DTYPES, FORMAT_DTYPES
from qviz.plan import LayerConfig
from tests.helpers import assert_unchanged, model_snapshot

ao = pytest.importorskip("torchao.quantization", reason="torchao is in the test extra: pip install -e '.[test]'")
from torchao.prototype import mx_formats  # noqa: E402
from torchao.quantization.quantize_.common import KernelPreference  # noqa: E402
from torchao.quantization.quantize_.workflows.float8.float8_tensor import (  # noqa: E402
    Float8Tensor,
    QuantizeTensorToFloat8Kwargs,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

LAYERS = ["0", "2", "4"]
# the formats' storage, written out: elements plus one 8-bit scale per block, nvfp4 also a float32 per tensor
BITS_PER_WEIGHT = {"float8_e4m3fn": 8, "float8_e5m2": 8, "mxfp8": 8 + 8 / 32, "mxfp4": 4 + 8 / 32,
                   "nvfp4": 4 + 8 / 16}


def _mlp() -> nn.Module:
    """Linear layers with Gaussian weights, as trained LLM weights are (not nn.Linear's uniform init)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        for i in LAYERS:
            model.get_submodule(i).weight.normal_(0, 0.05)
    return model


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 64, generator=g) for _ in range(n)]


def _session(model=None, **kw) -> qviz.Session:
    return qviz.Session(model or _mlp(), _tokens(2, 1), eval_data=_tokens(1, 2), flow="torchao",
                        progress=False, **kw).run()


@pytest.fixture(scope="module")
def dynamic():
    return _session()


# -- independent references: numpy and torch's own float8 casts, no torchao -----------------------
_FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def _fp4(v: np.ndarray) -> np.ndarray:
    """Round to the nearest float4 e2m1 value, ties to the even code (saturating at 6)."""
    a = np.minimum(np.abs(v), 6)
    lo = np.clip(np.searchsorted(_FP4, a, side="right") - 1, 0, 6)
    below, above = a - _FP4[lo], _FP4[lo + 1] - a
    up = (above < below) | ((above == below) & (lo % 2 == 1))
    return np.sign(v) * _FP4[lo + up]


def _fp8(v: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(v).float().to(dtype).double().numpy()


def _reference(w: torch.Tensor, dtype: str, per_row: bool = True) -> np.ndarray:
    """``w`` quantized and dequantized by the format's definition (torchao's scale rules: float8
    amax/max per row or tensor; MX scales 2^ceil(log2(amax / max)); NVFP4 e4m3 block scales
    under a float32 tensor scale amax / (448 * 6))."""
    x = w.detach().double().numpy()
    if dtype.startswith("float8"):
        fp8 = getattr(torch, dtype)
        amax = np.abs(x).max(1, keepdims=True) if per_row else np.abs(x).max()
        scale = amax.astype(np.float32) / torch.finfo(fp8).max
        return _fp8(x / scale, fp8) * scale
    block = 16 if dtype == "nvfp4" else 32
    b = x.reshape(x.shape[0], -1, block)
    amax = np.abs(b).max(-1, keepdims=True)
    if dtype == "nvfp4":  # in float32, x times the scales' reciprocal, as torchao's kernels compute it
        b, amax = b.astype(np.float32), amax.astype(np.float32)
        tensor_scale = np.float32(np.abs(x).max()) / np.float32(448 * 6)
        block_scale = _fp8(np.clip(amax / 6 / tensor_scale, 2**-9, 448), torch.float8_e4m3fn).astype(np.float32)
        q = _fp4(b * ((1 / tensor_scale) / block_scale))
        scale = tensor_scale * block_scale
    else:
        top = 6 if dtype == "mxfp4" else 448
        scale = 2.0 ** np.ceil(np.log2(amax / top))
        q = _fp4(b / scale) if dtype == "mxfp4" else _fp8(np.clip(b / scale, -448, 448), torch.float8_e4m3fn)
    return (q * scale).reshape(x.shape)


# -- values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
def test_weights_and_sqnr_match_an_independent_reference(scheme, dynamic):
    """Every format, real (weight-only float8/nvfp4 through quantize_) or simulated: the session's
    quantized weights equal the format's definition computed in numpy, and so does weight_sqnr."""
    s = dynamic if scheme == "int8_dynamic" else _session(scheme=scheme)
    model = _mlp()
    for dtype in FORMAT_DTYPES:
        if scheme != "int8_dynamic" and not formats.FORMATS[dtype].weight_only:
            continue
        s.apply({n: {"dtype": dtype} for n in LAYERS})
        df = s.to_dataframe()
        for n in LAYERS:
            w = model.get_submodule(n).weight
            ref = _reference(w, dtype)
            got = s.quantized_model().get_submodule(n).weight.dequantize().double().numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12, err_msg=f"{dtype} {n}")
            assert df.loc[n, "weight_sqnr"] == pytest.approx(sqnr(w.double(), torch.from_numpy(ref)), abs=1e-6)
        simulated = scheme == "int8_dynamic"
        mode = "dynamic, simulated" if simulated else "weight-only"
        assert list(df.loc[LAYERS, "dtype"]) == [f"{dtype} ({mode})"] * 3
        assert list(df.loc[LAYERS, "simulated"]) == [simulated] * 3
        block = formats.FORMATS[dtype].block
        assert set(df.loc[LAYERS, "weight_qscheme"]) == {f"per_group({block})_symmetric" if block
                                                         else "per_channel_symmetric"}


def test_simulation_equals_torchao_own_quantize_dequantize():
    """The CPU stand-in against torchao itself, where torchao runs on CPU: MX against torchao's
    emulated MX gemm (bf16, bit for bit), NVFP4 and float8 weights against the weight-only configs'
    quantize_ (bit for bit), float8 dynamic outputs against torchao's Float8Tensor gemm (torch
    _scaled_mm on CPU; float tolerance, 1e-5 of the output's scale: the gemm's accumulation order)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    nn.init.normal_(linear.weight, 0, 0.05)
    x = torch.randn(6, 64)
    for dtype in ("mxfp8", "mxfp4"):
        element = formats.FORMATS[dtype].element
        bf16, xb = copy.deepcopy(linear).to(torch.bfloat16), x.to(torch.bfloat16)
        emulated = copy.deepcopy(bf16)
        ao.quantize_(emulated, mx_formats.MXDynamicActivationMXWeightConfig(
            activation_dtype=element, weight_dtype=element, kernel_preference=KernelPreference.EMULATED))
        config = LayerConfig(dtype=dtype)
        sim = formats.SimulatedLinear(bf16, formats.torchao_config(ao, config, True), config)
        assert torch.equal(sim.weight.dequantize(), emulated.weight.dequantize()), dtype
        with torch.no_grad():
            assert torch.equal(sim(xb), emulated(xb)), dtype
    for dtype, weight_only in (("nvfp4", mx_formats.NVFP4WeightOnlyConfig()),
                               ("float8_e4m3fn", ao.Float8WeightOnlyConfig(set_inductor_config=False)),
                               ("float8_e5m2", ao.Float8WeightOnlyConfig(torch.float8_e5m2, set_inductor_config=False))):
        real = copy.deepcopy(linear)
        ao.quantize_(real, weight_only)
        config = LayerConfig(dtype=dtype)
        sim = formats.SimulatedLinear(linear, formats.torchao_config(ao, config, True), config)
        assert torch.equal(sim.weight.dequantize(), real.weight.dequantize()), dtype
    for dtype in ("float8_e4m3fn", "float8_e5m2"):
        for weight, g in (("per_channel", ao.PerRow()), ("per_tensor", ao.PerTensor())):
            fp8 = getattr(torch, dtype)
            kernel = Float8Tensor.from_hp(linear.weight.detach(), float8_dtype=fp8, granularity=g,
                                          mm_config=ao.Float8MMConfig(), act_quant_kwargs=QuantizeTensorToFloat8Kwargs(fp8, g))
            config = LayerConfig(dtype=dtype, weight=weight)
            sim = formats.SimulatedLinear(linear, formats.torchao_config(ao, config, True), config)
            with torch.no_grad():
                y, want = sim(x), F.linear(x, kernel, linear.bias)
            assert (y - want).abs().max() <= 1e-5 * want.abs().max(), (dtype, weight)
            assert not torch.equal(y, F.linear(x, sim.weight.dequantize(), linear.bias))  # inputs quantized too


def test_nvfp4_dynamic_quantizes_inputs_as_defined(dynamic):
    """NVFP4's dynamic gemm needs sm100 even in torchao's code: the simulated layer's output equals
    F.linear of the numpy references of input (its own tensor scale per batch) and weight."""
    model = _mlp()
    dynamic.apply({"0": {"dtype": "nvfp4"}})
    x = _tokens(1, 5)[0]
    with torch.no_grad():
        got = dynamic.quantized_model().get_submodule("0")(x)
    xq = torch.from_numpy(_reference(x.reshape(-1, 64), "nvfp4")).float()
    wq = torch.from_numpy(_reference(model[0].weight, "nvfp4")).float()
    want = F.linear(xq, wq, model[0].bias).reshape(2, 8, 128)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_each_format_sqnr_finite_and_ordered_on_hf_llama():
    """On a tiny Hugging Face Llama (Gaussian weights): every layer's SQNR is finite, and the formats
    rank as their precision says: e4m3 > e5m2 (3 vs 2 mantissa bits) > nvfp4 > mxfp4 (blocks of
    16 with e4m3 scales vs 32 with powers of two), mxfp8 > e5m2; the model's output follows."""
    from tests.real_models import llama

    model, calib, evals = llama()
    before = model_snapshot(model)
    s = qviz.Session(model, calib, eval_data=evals, flow="torchao", progress=False).run()
    layers = [n for n in s.plan if n != "lm_head" and s.plan[n].dtype != "float"]  # 99 outputs: not /16
    assert len(layers) == 14
    weight, output = {}, {}
    for dtype in FORMAT_DTYPES:
        s.apply({n: {"dtype": dtype} for n in layers})
        df = s.to_dataframe().loc[layers]
        assert np.isfinite(df[["weight_sqnr", "local_sqnr", "output_sqnr"]].to_numpy()).all(), dtype
        weight[dtype], output[dtype] = df.weight_sqnr.to_numpy(), s.summary()["output_sqnr"]
    for better, worse in (("float8_e4m3fn", "float8_e5m2"), ("float8_e5m2", "nvfp4"), ("nvfp4", "mxfp4"),
                          ("mxfp8", "float8_e5m2"), ("float8_e4m3fn", "mxfp4")):
        assert (weight[better] > weight[worse]).all(), (better, worse)
        assert output[better] > output[worse], (better, worse)
    assert_unchanged(model, before)


# -- sizes ---------------------------------------------------------------------------------------------
def test_size_is_bits_per_weight_and_matches_the_stored_tensors(dynamic):
    """weight_bytes counts each format at its bits per weight, shared scales included; for the block
    formats that is exactly the bytes of torchao's tensors (elements + scales + tensor scale)."""
    plan = {"0": "mxfp4", "2": "nvfp4", "4": "mxfp8"}
    dynamic.apply({n: {"dtype": d} for n, d in plan.items()})
    counts = dynamic.param_counts()
    want = sum(counts[n] * BITS_PER_WEIGHT[d] / 8 + (4 if d == "nvfp4" else 0) for n, d in plan.items())
    assert dynamic.summary()["weight_bytes"] == int(want)
    assert dynamic.summary()["weight_bytes"] == weight_bytes(counts, dynamic.plan)
    for n, d in plan.items():
        w = dynamic.quantized_model().get_submodule(n).weight
        stored = w.qdata.nbytes + w.scale.nbytes + (w.per_tensor_scale.nbytes if d == "nvfp4" else 0)
        assert stored == w.numel() * BITS_PER_WEIGHT[d] / 8 + (4 if d == "nvfp4" else 0), d
    assert formats.BITS == BITS_PER_WEIGHT


# -- apply, code --------------------------------------------------------------------------------------
def test_apply_equals_a_fresh_session_and_leaves_the_model_alone():
    model = _mlp()
    before = model_snapshot(model)
    live = _session(model)
    changes = {"0": {"dtype": "mxfp4"}, "2": {"dtype": "float8_e5m2", "weight": "per_tensor"}, "4": {"dtype": "nvfp4"}}
    live.apply(changes)
    fresh = _session(model, plan=live.plan)
    assert set(live.to_dataframe().type) == {"Linear"}
    columns = ["dtype", "weight_qscheme", "weight_sqnr", "local_sqnr", "output_sqnr", "simulated"]
    assert live.to_dataframe()[columns].equals(fresh.to_dataframe()[columns])
    x = _tokens(1, 7)[0]
    with torch.no_grad():
        assert torch.equal(live.quantized_model()(x), fresh.quantized_model()(x))
    assert live.summary()["weight_bytes"] == fresh.summary()["weight_bytes"]
    assert_unchanged(model, before)


def test_plan_code_is_plain_torchao():
    """Weight-only formats run on CPU: the exported code, run with torchao alone, gives the session's
    model exactly. Dynamic ones build torchao's configs and say they need a GPU."""
    model = _mlp()
    s = _session(model, scheme="int8_weight_only")
    s.apply({"0": {"dtype": "nvfp4"}, "2": {"dtype": "float8_e4m3fn"}, "4": {"dtype": "float8_e5m2", "weight": "per_tensor"}})
    namespace = {}
    exec(s.plan.code_for(s.results.meta), namespace)  # noqa: S102 - the code qviz generated
    plain = copy.deepcopy(model)
    ao.quantize_(plain, namespace["build_config"](), filter_fn=None)
    x = _tokens(1, 3)[0]
    with torch.no_grad():
        assert torch.equal(plain(x), s.quantized_model()(x))
    d = _session(model)
    d.apply({"0": {"dtype": "mxfp4"}, "2": {"dtype": "nvfp4"}, "4": {"dtype": "float8_e4m3fn"}})
    code = d.plan.code_for(d.results.meta)
    namespace = {}
    exec(code, namespace)  # noqa: S102
    configs = namespace["FQN_TO_CONFIG"]
    assert isinstance(configs["0"], mx_formats.MXDynamicActivationMXWeightConfig)
    assert configs["0"].weight_dtype == torch.float4_e2m1fn_x2
    assert isinstance(configs["2"], mx_formats.NVFP4DynamicActivationNVFP4WeightConfig)
    assert isinstance(configs["4"], ao.Float8DynamicActivationFloat8WeightConfig)
    assert code.count("qviz simulated it on CPU") == 3 and "sm100" in code and "sm89" in code
    assert code.count("and bfloat16 weights") == 2  # MX and per-row float8: torchao's quantize_ asserts it


# -- refusals and choices ------------------------------------------------------------------------------
def test_bad_requests_are_config_errors(dynamic):
    weight_only = _session(scheme="int8_weight_only")
    odd = qviz.Session(nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8)).eval(),
                       [torch.randn(4, 48)], flow="torchao", progress=False).run()
    cases = [
        (dynamic, {"0": {"dtype": "mxfp9"}}, "did you mean 'mxfp8'"),
        (dynamic, {"0": {"dtype": "mxfp4", "weight": "per_tensor"}}, "one scale per block of 32"),
        (dynamic, {"0": {"dtype": "nvfp4", "weight_symmetric": False}}, "set weight_symmetric=True"),
        (weight_only, {"0": {"dtype": "mxfp8"}}, "only as dynamic activation \\+ weight"),
        (odd, {"0": {"dtype": "mxfp4"}}, "in_features divisible by 32, not 48"),
        (odd, {"2": {"dtype": "nvfp4"}}, "divisible by 16, not 40 and 8"),
        (odd, {"2": {"dtype": "float8_e4m3fn"}}, "silently leave it float"),
    ]
    for session, change, message in cases:
        plan = session.plan
        with pytest.raises(ConfigError, match=message):
            session.apply(change)
        assert session.plan == plan
    fx = qviz.Session(nn.Sequential(nn.Linear(64, 32), nn.ReLU()).eval(), [torch.randn(4, 64)], progress=False).run()
    with pytest.raises(ConfigError, match="flow 'torchao' only"):
        fx.apply({"0": {"dtype": "nvfp4"}})
    with pytest.raises(ConfigError, match="flow 'torchao' only"):
        qviz.Session(nn.Sequential(nn.Linear(64, 32)).eval(), [torch.randn(4, 64)], flow="dynamic",
                     plan=qviz.Plan("x86", {"0": {"dtype": "float8_e5m2"}}), progress=False).run()
    with pytest.raises(ConfigError, match="run on no layer of this session .flow 'fx'.*need Session"):
        fx.search(target_sqnr=20, ladder=("mxfp4", "int8", "float"))
    with pytest.raises(ConfigError, match="'mxfp8' run on no layer of this session .flow 'torchao'.*session.choices"):
        weight_only.search(target_sqnr=20, ladder=("mxfp8", "int8", "float"))
    linear = nn.Sequential(nn.Linear(64, 32), nn.ReLU()).eval()
    pt2e = qviz.Session(linear, [torch.randn(4, 64)], flow="pt2e", progress=False).run()
    with pytest.raises(ConfigError, match="flow 'pt2e' .* takes dtype 'int8'.*dtype='mxfp4'"):
        pt2e.apply({"0": {"dtype": "mxfp4"}})
    assert not set(FORMAT_DTYPES) & set(pt2e.choices("0", "dtype", DTYPES))
    eager = qviz.Session(torch.ao.quantization.QuantWrapper(copy.deepcopy(linear)), [torch.randn(4, 64)],
                         flow="eager", progress=False).run()
    layer = next(iter(eager.plan))
    with pytest.raises(ConfigError, match="flow 'torchao' only"):
        eager.apply({layer: {"dtype": "float8_e4m3fn"}})


def test_choices_offer_formats_on_torchao_sessions_only(dynamic):
    from qviz.ui.state import DashboardState

    fx = qviz.Session(nn.Sequential(nn.Linear(64, 32), nn.ReLU()).eval(), [torch.randn(4, 64)], progress=False).run()
    assert not set(FORMAT_DTYPES) & set(fx.choices("0", "dtype", DTYPES))
    assert not set(FORMAT_DTYPES) & set(DashboardState(fx).choices("0", "dtype"))
    assert set(FORMAT_DTYPES) <= set(DashboardState(dynamic).choices("0", "dtype"))
    weight_only = _session(scheme="int8_weight_only")
    offered = DashboardState(weight_only).choices("0", "dtype")
    assert {"float8_e4m3fn", "float8_e5m2", "nvfp4"} <= set(offered) and not {"mxfp8", "mxfp4"} & set(offered)


# -- search ----------------------------------------------------------------------------------------------
def test_search_mixes_formats_within_target():
    s = _session()
    ladder = ("mxfp4", "nvfp4", "float8_e4m3fn", "int8", "float")
    result = s.search(target_sqnr=24, ladder=ladder)
    assert result.plan is not None
    used = {result.plan[n].dtype for n in LAYERS}
    assert used & set(FORMAT_DTYPES), used
    s.apply(result.plan)
    assert s.summary()["output_sqnr"] >= 24
    size = weight_bytes(s.param_counts(), result.plan)
    met = result.candidates[result.candidates.meets_target]
    assert size == met.weight_bytes.min() and size < weight_bytes(s.param_counts(), s.plan.with_changes(
        {n: {"dtype": "int8"} for n in LAYERS}))
    probed = result.candidates[result.candidates.phase == "probe"]
    assert {c.rsplit(" at ", 1)[1] for c in probed.changed} == set(ladder[:-1])
    assert np.isfinite(probed.metric.to_numpy()).all()

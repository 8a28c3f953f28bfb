"""Quantization algorithms as per-layer what-ifs: each figure checked against plain torch and
torchao's own quantized tensors; SmoothQuant's transform, GPTQ's update and the did-nothing flag."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qviz
from qviz.analysis.algorithms import (
    InputStats,
    Quantized,
    WeightFormat,
    gptq,
    layer_weight,
    smoothquant_scales,
    swapped,
    transformed,
)
from qviz.errors import ConfigError, QvizError
from tests.real_models import gpt2, llama


class Planted(nn.Module):
    """``proj`` sees inputs whose channels 3 and 40 are 30x the others (LLM outlier channels)."""

    def __init__(self, outliers=(3, 40), factor=30.0):
        super().__init__()
        torch.manual_seed(0)
        gain = torch.ones(64)
        gain[list(outliers)] = factor
        self.register_buffer("gain", gain)
        self.proj = nn.Linear(64, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x * self.gain)))


def _batches(n=4, seed=0, mix=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(2, 16, 64, generator=g)
        out.append(z @ mix if mix is not None else z)
    return out


def _inputs(model, layer, batches):
    """The layer's inputs over ``batches``, cloned by a plain forward pre-hook."""
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def _sqnr(y, yq):
    return 10 * math.log10(float(y.double().pow(2).sum() / (y.double() - yq.double()).pow(2).sum()))


def _torchao_int4(weight, bias=None, group_size=32):
    """A Linear holding ``weight`` quantized by torchao's own IntxWeightOnlyConfig (int4, per group)."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    quantize_(linear, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                           mapping_type=MappingType.ASYMMETRIC))
    return linear


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training, dict(model._forward_pre_hooks)


def test_smoothquant_transform_keeps_the_float_output_and_matches_torchao_scales():
    from torchao.prototype.smoothquant.core import SmoothQuantObserver

    model, batches = Planted(), _batches()
    x = _inputs(model, "proj", batches)
    stats = InputStats()
    stats.update(x[:50])
    stats.update(x[50:])
    weight = layer_weight(model.proj)
    observer = SmoothQuantObserver(weight.detach(), alpha=0.5)  # torchao's, fed every input
    observer(x)
    expected, _, _ = observer.calculate_qparams()
    s = smoothquant_scales(stats.absmax, weight, 0.5)
    torch.testing.assert_close(s.float(), expected, rtol=1e-5, atol=0)
    assert float(s[3] / s[0]) > 3  # the outlier channels get large scales
    unquantized = Quantized(weight, s.float(), weight * s.float())  # X/s into W*s, W*s not rounded
    copied = copy.deepcopy(model)
    with swapped(copied, "proj", transformed(copied.proj, unquantized)), torch.no_grad():
        for b in batches:
            torch.testing.assert_close(copied(b), model(b), rtol=1e-5, atol=1e-5)
    assert isinstance(copied.proj, nn.Linear)  # put back


def test_smoothquant_improves_the_planted_layer_against_independent_figures():
    from torchao.prototype.smoothquant.core import SmoothQuantObserver

    model, calib, evals = Planted(), _batches(), _batches(1, seed=9)
    before = _state(model)
    session = qviz.Session(model, calib, flow="torchao", eval_data=evals, progress=False).run()
    frame = session.algorithms(layers="proj").set_index("algorithm")
    assert list(frame.index) == ["rtn", "smoothquant", "awq", "gptq", "hqq"]
    sq, rtn = frame.loc["smoothquant"], frame.loc["rtn"]
    assert sq.gain_vs_rtn_db > 3 and not sq.did_nothing and not rtn.did_nothing

    # independent: the layer's inputs by a hook, RTN and SmoothQuant by torchao's own objects
    x = _inputs(model, "proj", calib)
    y = F.linear(x, model.proj.weight, model.proj.bias)
    with torch.no_grad():
        assert rtn.sqnr == pytest.approx(_sqnr(y, _torchao_int4(model.proj.weight, model.proj.bias)(x)), abs=1e-3)
        observer = SmoothQuantObserver(model.proj.weight.detach(), alpha=0.5)
        observer(x)
        s, _, _ = observer.calculate_qparams()
        smoothed = _torchao_int4(model.proj.weight * s, model.proj.bias)
        assert sq.sqnr == pytest.approx(_sqnr(y, smoothed(x / s)), abs=1e-2)
        assert sq.gain_vs_rtn_db == pytest.approx(sq.sqnr - rtn.sqnr)

        # the model's output with only proj changed, against torchao quantize_ on a copy
        changed = copy.deepcopy(model)
        changed.proj = _torchao_int4(model.proj.weight, model.proj.bias)
        assert rtn.model_sqnr == pytest.approx(_sqnr(model(evals[0]), changed(evals[0])), abs=1e-3)

    state, training, hooks = _state(model)
    assert training == before[1] and hooks == before[2] == {}
    for k, v in before[0].items():
        assert torch.equal(state[k], v), k


def _hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_algorithms_that_provably_equal_rtn_are_flagged():
    """Hadamard rows as inputs: every channel's abs-max and mean |x| is 1 (SmoothQuant with
    alpha=1 and AWQ get uniform scales) and X^T X = n I (GPTQ spreads no error): all equal RTN."""
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    rows = _hadamard(64)
    calib = [rows[i:i + 16] for i in range(0, 64, 16)]
    frame = qviz.Session(model, calib, flow="torchao", progress=False).run().algorithms(
        layers="0", alpha=1.0).set_index("algorithm")
    assert frame.did_nothing.to_dict() == {"rtn": False, "smoothquant": True, "awq": True, "gptq": True, "hqq": False}
    for method in ("smoothquant", "awq", "gptq"):
        assert frame.loc[method, "note"].startswith("DID NOTHING")
        assert abs(frame.loc[method, "gain_vs_rtn_db"]) < 0.05
    assert frame.loc["hqq", "gain_vs_rtn_db"] != 0

    stats = InputStats()
    for b in calib:
        stats.update(b)
    assert torch.equal(stats.hessian, 64 * torch.eye(64, dtype=torch.float64))
    weight = model[0].weight.detach()
    fmt = WeightFormat("int4", 32)
    assert torch.equal(gptq(weight, stats, fmt).weight, fmt.rtn(weight))  # bit for bit


def test_gptq_lowers_the_error_with_correlated_inputs_and_matches_a_least_squares_refit():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=g) * 0.3 + torch.eye(64)  # correlated channels
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    calib = _batches(mix=mix)
    frame = qviz.Session(model, calib, flow="torchao", progress=False).run().algorithms(
        layers=["0"], methods=("rtn", "gptq")).set_index("algorithm")
    assert frame.loc["gptq", "gain_vs_rtn_db"] > 1 and not frame.loc["gptq", "did_nothing"]



def _refit_reference(x, weight, fmt):
    """GPTQ as least squares: column i quantized (qparams taken from its group's columns as they
    stand when the group starts), then every later column refit by lstsq on the inputs
    themselves to the float output, given the columns quantized so far."""
    k = weight.shape[1]
    g = fmt.columns(k)
    target, current, quantized = x @ weight.double().T, weight.double().clone(), []
    for i in range(k):
        if i % g == 0:
            scale, zero = fmt.qparams(current[:, i:i + g].float())
        quantized.append(fmt.fake(current[:, i:i + 1].float(), scale, zero).double())
        done = torch.cat(quantized, 1)
        if i < k - 1:
            current[:, i + 1:] = torch.linalg.lstsq(x[:, i + 1:], target - x[:, :i + 1] @ done.T).solution.T
    return done


@pytest.mark.parametrize(("dtype", "group_size", "block"), [("int8", None, 128), ("int4", 4, 4), ("int4", 4, 8)])
def test_gptq_is_the_least_squares_refit_column_by_column(dtype, group_size, block):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(400, 12, generator=g) @ (torch.randn(12, 12, generator=g) * 0.5 + torch.eye(12))).double()
    weight = torch.randn(5, 12, generator=g)
    fmt = WeightFormat(dtype, group_size)
    stats = InputStats()
    stats.update(x)
    found = gptq(weight, stats, fmt, damp=0.0, block=block).weight  # blocks of 4 or 8 columns: lazy batches
    torch.testing.assert_close(found.double(), _refit_reference(x, weight, fmt), rtol=0, atol=1e-5)


def test_exact_layer_error_from_the_input_statistics():
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(300, 24, generator=g) * 3 + 1, torch.randn(7, 24, generator=g), torch.randn(7, generator=g)
    stats = InputStats()
    for part in x.split(70):
        stats.update(part.reshape(-1, 5, 24) if part.shape[0] % 5 == 0 else part)
    y = F.linear(x.double(), w.double(), b.double())
    assert stats.energy(w, b) == pytest.approx(float(y.pow(2).sum()), rel=1e-9)
    assert stats.energy(w) == pytest.approx(float((x.double() @ w.double().T).pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(stats.absmax, x.double().abs().amax(0))


@pytest.mark.filterwarnings("ignore:.*stayed float")  # GPT-2's Conv1D and embeddings: not torchao's
@pytest.mark.parametrize("build", [gpt2, llama])
def test_hugging_face_models(build):
    model, calib, evals = build()
    before = _state(model)
    session = qviz.Session(model, calib, flow="torchao", eval_data=evals, progress=False).run()
    frame = session.algorithms()
    layers = list(dict.fromkeys(frame.layer))
    assert len(frame) == 5 * len(layers) and len(layers) >= 8
    gains = frame[frame.algorithm == "gptq"].gain_vs_rtn_db
    assert (gains > 0).all()  # GPTQ never loses to RTN on its own calibration data here
    assert frame.model_sqnr.notna().all() and frame.sqnr.notna().all()
    # one layer recomputed with a plain hook and torchao's own int4 tensor (GPT-2: a Conv1D, transposed)
    name = layers[0]
    module = model.get_submodule(name)
    x = _inputs(model, name, calib)
    w = layer_weight(module)
    with torch.no_grad():
        expected = _sqnr(F.linear(x, w, module.bias), _torchao_int4(w, module.bias)(x))
    assert frame[(frame.layer == name) & (frame.algorithm == "rtn")].sqnr.item() == pytest.approx(expected, abs=1e-3)
    quick = session.algorithms(layers=name, model_sqnr=False)  # no model forwards: same layer figures
    assert quick.model_sqnr.isna().all() and list(quick.sqnr) == list(frame[frame.layer == name].sqnr)
    state, training, _ = _state(model)
    assert training == before[1] and all(torch.equal(state[k], v) for k, v in before[0].items())


def test_bad_requests_say_what_to_do():
    model, calib = Planted(), _batches(1)
    session = qviz.Session(model, calib, flow="torchao", progress=False).run()
    with pytest.raises(ConfigError, match="not linear layers.*choose among"):
        session.algorithms(layers="nope")
    with pytest.raises(ConfigError, match="group_size 48 does not divide 'proj'"):
        session.algorithms(layers="proj", group_size=48)
    with pytest.raises(ConfigError, match="must include 'rtn'"):
        session.algorithms(methods=("gptq",))
    for alpha in (2, "0.5"):
        with pytest.raises(ConfigError, match="alpha .* must lie in"):
            session.algorithms(alpha=alpha)
    with pytest.raises(ConfigError, match="dtype"):
        session.algorithms(dtype="int3")
    loaded = qviz.Session.from_results(session.results)
    with pytest.raises(QvizError, match="re-create it from the model"):
        loaded.algorithms()


def test_diagnosis_names_outlier_channels_and_its_fixes_work():
    model = Planted()
    session = qviz.Session(model, _batches(), flow="torchao", progress=False).run()  # int8 dynamic
    assert "outlier_channels" not in set(session.diagnose().cause)  # outliers() not run: no pass for it
    session.outliers()
    found = session.diagnose()
    rows = found[found.cause == "outlier_channels"]
    assert list(rows.layer) == ["proj"]
    evidence, fix = rows.evidence.item(), rows.fix.item()
    assert re.search(r"2 systematic outlier channel\(s\).*: (3|40) \(.*, (3|40) \(", evidence)
    x = _inputs(model, "proj", _batches()).abs()  # persistence, recomputed from hooked inputs
    share = (x > 6 * x.median(1, keepdim=True).values).double().mean(0)
    ratio = x.amax(0) / x.amax(0).median()
    for c in (3, 40):
        assert f"{c} ({float(ratio[c]):.3g}x the median channel, in {float(share[c]):.0%} of tokens)" in evidence
    frame = eval(re.search(r"s\.algorithms\([^)]*\)", fix).group(0), {"s": session})  # the fix, as written
    assert frame.set_index("algorithm").loc["smoothquant", "gain_vs_rtn_db"] > 3
    before = session.summary()["output_sqnr"]
    eval(re.search(r"s\.apply\(\{'proj': \{'dtype': 'float'\}\}\)", fix).group(0), {"s": session})
    assert session.summary()["output_sqnr"] > before + 3

    near = qviz.Session(Planted(factor=4.0), _batches(), flow="torchao", progress=False).run()  # 4x: below the 6x outlier line
    near.outliers()
    assert "outlier_channels" not in set(near.diagnose().cause)

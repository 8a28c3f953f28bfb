"""Diagnosis rules: each one fires on a tiny model built to trigger it, stays silent on the same
model without the planted defect (a near miss), follows its Thresholds, and its fix, applied as
written, works."""

from __future__ import annotations

import ast
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

import qviz
from qviz.analysis.diagnosis import CAUSES, Thresholds

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


class MLP(nn.Module):
    """fc1 -> relu1 -> fc2 -> relu2 -> fc3 -> relu3 (FX fuses each Linear with its ReLU).

    ``outlier``: fc1 and fc2 pass relu(x0) along in unit 0, and fc3's unit 0 turns it into
    relu(400 * x0 - 1000): zero unless x0 > 2.5, which the clamped data never reaches except for
    a planted sample (then 200). fc3 is the last layer, so the outlier costs fc3 alone.
    ``spread``: fc1's output channel 0 has 30x larger weights. ``dead``: fc2's rows 1 and 2 are
    multiplied by ``dead`` (0: dead channels; a small number: a near miss).
    """

    def __init__(self, outlier=False, spread=False, dead=None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1, self.relu1 = nn.Linear(8, 16), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(16, 16), nn.ReLU()
        self.fc3, self.relu3 = nn.Linear(16, 8), nn.ReLU()
        with torch.no_grad():
            for fc in (self.fc1, self.fc2, self.fc3):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
                fc.bias.zero_()
            if outlier:
                for fc in (self.fc1, self.fc2, self.fc3):
                    fc.weight[0], fc.weight[0, 0] = 0, 1.0
                self.fc3.weight[0, 0], self.fc3.bias[0] = 400.0, -1000.0
            if spread:
                self.fc1.weight[0] *= 30
            if dead is not None:
                self.fc2.weight[1:3] *= dead

    def forward(self, x):
        x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
        return self.relu3(self.fc3(x))


def mlp_data(n_batches=4, size=512, seed=1, plant=False) -> list[torch.Tensor]:
    """Normal inputs clamped to [-2.5, 2.5]; ``plant`` sets x0 = 3 in one sample."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(size, 8, generator=gen).clamp(-2.5, 2.5) for _ in range(n_batches)]
    if plant:
        batches[0][0, 0] = 3.0
    return batches


def session(model, calib=None, flow="fx", changes=None, **kwargs) -> qviz.Session:
    s = qviz.Session(
        model,
        calib or mlp_data(),
        eval_data=mlp_data(1, 256, seed=2),
        flow=flow,
        progress=False,
        **kwargs,
    ).run()
    return s.apply(changes) if changes else s


def causes(found) -> set[tuple[str, str]]:
    return set(zip(found["layer"], found["cause"], strict=True))


def finding(found, layer: str, cause: str):
    rows = found[(found["layer"] == layer) & (found["cause"] == cause)]
    assert len(rows) == 1, (
        f"expected one {cause} finding on {layer}, got:\n{found[['layer', 'cause']]}"
    )
    return rows.iloc[0]


def suggested_change(fix: str) -> dict:
    """The ``s.apply({...})`` a fix text suggests, as a dict (read, not executed)."""
    match = re.search(r"s\.apply\((\{.*?\}\})\)", fix)
    assert match, f"the fix names no s.apply(...): {fix}"
    return ast.literal_eval(match.group(1))


def outlier_ratio(model: MLP, calib, p: float = 99.99) -> float:
    """fc3's output range over its central [100 - p, p] percentile range, computed in float."""
    with torch.no_grad():
        h = torch.cat([model(x) for x in calib]).flatten()
    lo, hi = np.quantile(h.double().numpy(), [1 - p / 100, p / 100])
    return float(h.max() - h.min()) / (hi - lo)


# -- activation_outliers ---------------------------------------------------------------------------
def test_activation_outliers():
    model = MLP(outlier=True)
    s = session(model, mlp_data(plant=True))
    row = finding(s.diagnose(), "fc3", "activation_outliers")
    assert row["severity"] == "medium" and "[0, 200]" in row["evidence"]
    assert "percentile" in row["fix"] and "keep the layer float" in row["fix"]
    # near miss: the same model on the same data without the planted sample
    clean = session(MLP(outlier=True), mlp_data())
    assert "activation_outliers" not in set(clean.diagnose()["cause"])
    # the suggested percentile clip gives the other values their resolution back
    before = s.to_dataframe().loc["fc3", "local_sqnr"]
    s.apply(suggested_change(row["fix"]))
    assert s.plan["fc3"].activation == "percentile"
    assert s.to_dataframe().loc["fc3", "local_sqnr"] > before + 10


def test_outlier_ratio_threshold_flips():
    calib = mlp_data(plant=True)
    ratio = outlier_ratio(MLP(outlier=True), calib)
    assert ratio > Thresholds().outlier_ratio
    s = session(MLP(outlier=True), calib)
    assert ("fc3", "activation_outliers") in causes(
        s.diagnose(Thresholds(outlier_ratio=0.8 * ratio))
    )
    assert ("fc3", "activation_outliers") not in causes(
        s.diagnose(Thresholds(outlier_ratio=1.25 * ratio))
    )


# -- per_tensor_weight_spread ----------------------------------------------------------------------
def test_per_tensor_weight_spread():
    s = session(MLP(spread=True), changes={"fc1": {"weight": "per_tensor"}})
    row = finding(s.diagnose(), "fc1", "per_tensor_weight_spread")
    assert "per-tensor weights over 16 output channels" in row["evidence"]
    assert "per channel" in row["fix"]
    # near misses: the same weights per channel, and per-tensor weights without the spread
    per_channel = session(MLP(spread=True))
    assert ("fc1", "per_tensor_weight_spread") not in causes(per_channel.diagnose())
    even = session(MLP(), changes={"fc1": {"weight": "per_tensor"}})
    assert ("fc1", "per_tensor_weight_spread") not in causes(even.diagnose())
    # the fix as written: per-channel weights, the finding gone, the weights far more accurate
    before = s.to_dataframe().loc["fc1", "weight_sqnr"]
    s.apply(suggested_change(row["fix"]))
    assert ("fc1", "per_tensor_weight_spread") not in causes(s.diagnose())
    assert s.to_dataframe().loc["fc1", "weight_sqnr"] > before + 10


def test_channel_spread_threshold_flips():
    absmax = MLP(spread=True).fc1.weight.detach().abs().amax(1).numpy()
    ratio = float(absmax.max() / np.median(absmax))  # largest output channel / the median one
    s = session(MLP(spread=True), changes={"fc1": {"weight": "per_tensor"}})
    assert ("fc1", "per_tensor_weight_spread") in causes(
        s.diagnose(Thresholds(channel_spread=0.99 * ratio))
    )
    assert ("fc1", "per_tensor_weight_spread") not in causes(
        s.diagnose(Thresholds(channel_spread=1.01 * ratio))
    )


# -- heavy_clipping --------------------------------------------------------------------------------
def test_heavy_clipping():
    s = session(MLP(), changes={"fc1": {"activation": "percentile", "percentile": 95}})
    clip = s.to_dataframe().loc["fc1", "clip_frac"]
    assert 0.04 < clip < 0.06  # the top 5% of fc1's outputs lie above the 95th percentile
    row = finding(s.diagnose(), "fc1", "heavy_clipping")
    assert (
        f"{clip:.2%} of the output values" in row["evidence"]
        and "percentile(95)" in row["evidence"]
    )
    # near miss: the same clip at the 99.99th percentile
    light = session(MLP(), changes={"fc1": {"activation": "percentile", "percentile": 99.99}})
    assert light.to_dataframe().loc["fc1", "clip_frac"] < Thresholds().clip_frac
    assert ("fc1", "heavy_clipping") not in causes(light.diagnose())
    # the suggested minmax range clips (next to) nothing: only what the zero point's rounding cuts
    s.apply(suggested_change(row["fix"]))
    assert s.plan["fc1"].activation == "minmax" and s.to_dataframe().loc["fc1", "clip_frac"] < 1e-4
    assert ("fc1", "heavy_clipping") not in causes(s.diagnose())
    # thresholds around the measured share
    clipped = session(MLP(), changes={"fc1": {"activation": "percentile", "percentile": 95}})
    assert ("fc1", "heavy_clipping") in causes(clipped.diagnose(Thresholds(clip_frac=0.9 * clip)))
    assert ("fc1", "heavy_clipping") not in causes(
        clipped.diagnose(Thresholds(clip_frac=1.1 * clip))
    )


class Saturated(nn.Module):
    """One Linear whose output channel 0 is the constant ``top``, the largest output value:
    1/16 of all values sit at the max."""

    def __init__(self, top: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 16)
        with torch.no_grad():
            self.fc.weight[0], self.fc.bias[0] = 0, top

    def forward(self, x):
        return self.fc(x)


def test_values_at_the_rounded_range_end_are_not_clipped():
    """minmax with a rounded zero point can end the range a hair below the max; the values there
    round to the last level like any value and must not count as heavy clipping (regression:
    the rule told a minmax layer to switch to minmax)."""
    s = session(Saturated(5.06), changes={"fc": {"activation": "minmax"}})
    row = s.to_dataframe().loc["fc"]
    end = (s.record("activation_post_process_1").info["quant_max"] - row["zero_point"]) * row[
        "scale"
    ]
    assert 0 < 5.06 - end < row["scale"] / 2
    assert row["clip_frac"] == pytest.approx(1 / 16, rel=1e-3)  # the table counts them
    assert ("fc", "heavy_clipping") not in causes(s.diagnose())
    # the same layer clipped for real (the 90th percentile) is still caught
    cut = session(Saturated(5.06), changes={"fc": {"activation": "percentile", "percentile": 90}})
    assert ("fc", "heavy_clipping") in causes(cut.diagnose())


# -- dead_or_constant_channels ---------------------------------------------------------------------
class ConvBN(nn.Module):
    """quant -> conv-bn-relu -> 1x1 conv -> dequant, for the eager flow; BN's ``gamma`` scales
    channels 2 and 5 (0 kills them once BN is folded into the conv)."""

    def __init__(self, gamma: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.weight[[2, 5]] = gamma
        self.eval()

    def forward(self, x):
        return self.dequant(self.head(self.relu(self.bn(self.conv(self.quant(x))))))


def image_data(n_batches=2, size=16, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=gen) for _ in range(n_batches)]


def test_dead_channels_from_bn_folding_eager():
    s = qviz.Session(
        ConvBN(gamma=0.0),
        image_data(),
        eval_data=image_data(1, seed=2),
        flow="eager",
        progress=False,
    ).run()
    row = finding(s.diagnose(), "conv", "dead_or_constant_channels")
    assert row["severity"] == "low"
    assert "2 of 8 output channels (2, 5)" in row["evidence"] and "prune" in row["fix"]
    # near miss: BN scales those channels by 1e-3, small but alive
    s_small = qviz.Session(
        ConvBN(gamma=1e-3),
        image_data(),
        eval_data=image_data(1, seed=2),
        flow="eager",
        progress=False,
    ).run()
    assert ("conv", "dead_or_constant_channels") not in causes(s_small.diagnose())
    # a looser threshold counts them as dead
    row = finding(
        s_small.diagnose(Thresholds(dead_channel=1e-2)), "conv", "dead_or_constant_channels"
    )
    assert "(2, 5)" in row["evidence"]


def test_dead_channels_fx():
    s = session(MLP(dead=0.0))
    assert finding(s.diagnose(), "fc2", "dead_or_constant_channels")["evidence"].startswith(
        "2 of 16 output channels (1, 2)"
    )
    assert ("fc2", "dead_or_constant_channels") not in causes(session(MLP(dead=1e-4)).diagnose())


# -- nonfinite -------------------------------------------------------------------------------------
class LogMLP(nn.Module):
    """fc2(log(relu(fc1(x)) + eps)): with eps = 0 every zero after the ReLU becomes -inf."""

    def __init__(self, eps: float):
        super().__init__()
        torch.manual_seed(0)
        self.eps = eps
        self.fc1, self.relu, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.log(self.relu(self.fc1(x)) + self.eps))


def test_nonfinite_produced_inside_the_model():
    calib = mlp_data()
    model = LogMLP(eps=0.0)
    with torch.no_grad():
        expected = sum(int((model.relu(model.fc1(x)) == 0).sum()) for x in calib)
    assert expected > 0
    found = session(model, calib).diagnose()
    row = finding(found, "log", "nonfinite")
    assert row["severity"] == "high" and f"{expected:,} NaN/Inf values among the" in row["evidence"]
    assert "logs" in row["fix"]
    assert found.iloc[0]["cause"] == "nonfinite"  # high severity sorts first
    # near miss: log(x + 1) of the same ReLU output is finite
    assert "nonfinite" not in set(session(LogMLP(eps=1.0), calib).diagnose()["cause"])


def test_nonfinite_in_calibration_data():
    calib = mlp_data()
    calib[1][3, 2], calib[2][0, 0] = float("nan"), float("inf")
    row = finding(session(MLP(), calib).diagnose(), "x", "nonfinite")
    assert row["evidence"].startswith("2 NaN/Inf values among the 16,384 seen")
    assert "nonfinite" not in set(session(MLP(), mlp_data()).diagnose()["cause"])


# -- no_data ---------------------------------------------------------------------------------------
class Branch(nn.Module):
    """``rare`` runs only on batches of one sample; ``main`` on all others (eager flow)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.main, self.rare = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(self.quant(x))
        return self.dequant(self.rare(h) if x.shape[0] == 1 else self.main(h))


def test_no_data():
    s = session(Branch(), flow="eager")
    row = finding(s.diagnose(), "rare", "no_data")
    assert row["severity"] == "high" and "was never called" in row["evidence"]
    assert "calibration data runs this branch" in row["fix"]
    assert not {"no_data", "nonfinite"} & set(s.diagnose().query("layer != 'rare'")["cause"])
    # integrity findings stay once a sweep focuses the precision rules on sensitive layers
    s.sensitivity()
    assert ("rare", "no_data") in causes(s.diagnose())
    # near miss: one calibration batch of a single sample runs the branch
    ran = session(Branch(), mlp_data() + mlp_data(1, 1, seed=3), flow="eager")
    assert ("rare", "no_data") not in causes(ran.diagnose())


# -- sensitive -------------------------------------------------------------------------------------
def test_sensitive_layers_focus_the_diagnosis():
    s = session(MLP(outlier=True, dead=0.0), mlp_data(plant=True))
    before = s.diagnose()
    assert "sensitive" not in set(before["cause"])  # no sweep yet: every layer is checked
    assert {("fc3", "activation_outliers"), ("fc2", "dead_or_constant_channels")} <= causes(before)

    frame = s.sensitivity().to_dataframe()
    assert frame.index[0] == "fc3"
    found = s.diagnose()
    # one of three layers flagged (sensitive_fraction 0.25, at least one): its causes rise one
    # severity; the dead channels of a layer that is not sensitive drop out
    assert causes(found) == {("fc3", "sensitive"), ("fc3", "activation_outliers")}
    assert list(found["cause"]) == ["activation_outliers", "sensitive"]
    assert finding(found, "fc3", "activation_outliers")["severity"] == "high"
    row = finding(found, "fc3", "sensitive")
    assert row["evidence"].startswith(
        "rank 1 of 3 by output_sqnr: quantizing only this layer gives "
        f"{frame.loc['fc3', 'quantize_only']:.4g} dB"
    )
    assert "its output activation cost more than its weights" in row["fix"]
    assert suggested_change(row["fix"]) == {"fc3": {"dtype": "float"}}

    everything = s.diagnose(Thresholds(sensitive_fraction=1.0))
    assert {n for n, c in causes(everything) if c == "sensitive"} == set(frame.index)
    assert finding(everything, "fc2", "dead_or_constant_channels")["severity"] == "medium"

    # the suggested change leaves fc3 float: the model's error is what the sweep measured
    s.apply(suggested_change(row["fix"]))
    assert s.summary()["output_sqnr"] == pytest.approx(frame.loc["fc3", "skip_only"], abs=0.02)


def test_sensitive_near_miss_clean_data():
    """The same model without the planted sample: fc3 costs little, and whichever layer ranks
    first (one is always flagged) gets a ``sensitive`` row and no precision finding."""
    planted = session(MLP(outlier=True), mlp_data(plant=True)).sensitivity().to_dataframe()
    s = session(MLP(outlier=True), mlp_data())
    frame = s.sensitivity().to_dataframe()
    assert frame.loc["fc3", "quantize_only"] > planted.loc["fc3", "quantize_only"] + 20
    assert causes(s.diagnose()) == {(frame.index[0], "sensitive")}


def test_eval_fn_sensitivity_is_diagnosed():
    """A user metric works the same way; the evidence speaks in its units."""
    eval_x = mlp_data(1, 256, seed=2)[0]
    with torch.no_grad():
        float_out = MLP(outlier=True)(eval_x)

    s = session(MLP(outlier=True), mlp_data(plant=True))

    def closeness(model):
        with torch.no_grad():
            return -float((model(eval_x) - float_out).abs().mean())

    frame = s.sensitivity(eval_fn=closeness).to_dataframe()
    assert frame.index[0] == "fc3"
    row = finding(s.diagnose(), "fc3", "sensitive")
    assert "by closeness" in row["evidence"] and " dB" not in row["evidence"]


# -- Thresholds ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"clip_frac": 0},
        {"clip_frac": 1.5},
        {"outlier_percentile": 40},
        {"outlier_ratio": 1},
        {"sensitive_fraction": True},
        {"channel_spread": "8"},
        {"dead_channel": math.nan},
    ],
)
def test_thresholds_refuse_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(qviz.QvizError, match=f"Thresholds.{name} must be a number"):
        Thresholds(**bad)


def test_causes_are_all_tested():
    tested = {
        "sensitive",
        "activation_outliers",
        "outlier_channels",  # tests/test_algorithms.py: the fix it names runs there
        "per_tensor_weight_spread",
        "heavy_clipping",
        "dead_or_constant_channels",
        "nonfinite",
        "no_data",
    }
    assert set(CAUSES) == tested

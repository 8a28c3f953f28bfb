"""Sensitivity sweep: a planted outlier ranks first, the figures agree with Session.apply, the
session is left as it was, executors and the cache change nothing, the sweep survives save/load."""

from __future__ import annotations

import copy
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qviz
from qviz.analysis.sensitivity import COLUMNS, sweep
from qviz.demo import accuracy, calibration_batches, eval_batches, load_demo_model
from qviz.errors import ConfigError
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

CALIB = calibration_batches(2, 16)
EVAL = eval_batches(1, 32)


class HeadsMLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu -> fc3, plus a small side head ``aux`` on fc1's output.

    ``plant=True``: unit 0 of fc1 fires only when x0 > 2.5 (a few calibration samples) and the
    aux head amplifies it x50, so aux's output holds a few huge values and nothing else does.
    """

    def __init__(self, plant: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1, self.relu1 = nn.Linear(16, 32), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(32, 32), nn.ReLU()
        self.fc3, self.aux = nn.Linear(32, 10), nn.Linear(32, 10)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2, self.fc3, self.aux):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features ** 0.5)
                fc.bias.zero_()
            self.aux.weight.mul_(0.3)
            if plant:
                self.fc1.weight[0] = 0
                self.fc1.weight[0, 0], self.fc1.bias[0] = 10.0, -25.0
                self.fc2.weight[:, 0] = 0
                self.aux.weight[0], self.aux.weight[:, 0] = 0, 0
                self.aux.weight[0, 0] = 50.0

    def forward(self, x):
        h = self.relu1(self.fc1(x))
        return self.fc3(self.relu2(self.fc2(h))) + self.aux(h)


def mlp_data(n_batches: int, size: int, seed: int, plant: bool = False) -> list[torch.Tensor]:
    """Clamped normal inputs; ``plant`` sets x0 = 3 in two samples (fc1's unit 0 fires there)."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(size, 16, generator=gen).clamp(-2.5, 2.5) for _ in range(n_batches)]
    if plant:
        batches[0][:2, 0] = 3.0
    return batches


def mlp_session(model: nn.Module, plant: bool = False, changes=None, calib=None) -> qviz.Session:
    """A session on 4096 calibration samples, every layer's activation set to minmax (so outliers
    set the range) and ``changes`` applied on top."""
    s = qviz.Session(model, calib or mlp_data(4, 1024, 1, plant), eval_data=mlp_data(1, 512, 2),
                     progress=False).run()
    return s.apply({n: {"activation": "minmax", **(changes or {}).get(n, {})} for n in s.plan})


@pytest.fixture(scope="module")
def demo(demo_sessions):
    s = demo_sessions(short=True)
    return s, s.sensitivity().to_dataframe()


def test_planted_outlier_ranks_first_and_is_diagnosed():
    clean = mlp_session(HeadsMLP()).sensitivity().to_dataframe()
    s = mlp_session(HeadsMLP(plant=True), plant=True)
    planted = s.sensitivity().to_dataframe()
    assert planted.index[0] == "aux" and planted.loc["aux", "rank"] == 1
    assert clean.loc["aux", "rank"] == len(clean)  # a small head: the least sensitive without it
    assert planted.loc["aux", "quantize_only"] < clean.loc["aux", "quantize_only"] - 20
    assert planted.loc["aux", "activation_only"] < planted.loc["aux", "weight_only"] - 20
    found = s.diagnose()
    assert ("aux", "activation_outliers", "high") in set(zip(found.layer, found.cause, found.severity, strict=True))
    assert ("aux", "sensitive") in set(zip(found.layer, found.cause, strict=True))


def test_frame_contract(demo):
    s, frame = demo
    assert list(frame.columns) == list(COLUMNS) and frame.index.name == "layer"
    assert sorted(frame.index) == sorted(s.to_dataframe().index)
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    assert frame["sensitivity"].is_monotonic_decreasing
    assert frame.attrs["metric"] == "output_sqnr" and (frame["float_metric"] == math.inf).all()
    assert np.allclose(frame["sensitivity"], -frame["quantize_only"])
    values = frame[["quantize_only", "skip_only", "weight_only", "activation_only"]].to_numpy()
    assert np.isfinite(values).all() and (values > 10).all()
    # one layer's error alone is smaller than all of them together
    assert (frame["quantize_only"] > s.summary()["output_sqnr"]).all()
    pd.testing.assert_frame_equal(s.results.sensitivity, frame)


def test_figures_match_session_apply(demo_sessions, demo):
    """quantize_only / skip_only equal the output SQNR of the same plan applied for real."""
    s, frame = demo
    skip = demo_sessions(short=True).apply({"block_conv2": {"dtype": "float"}})
    assert frame.loc["block_conv2", "skip_only"] == pytest.approx(skip.summary()["output_sqnr"], abs=0.02)
    alone = demo_sessions(short=True)
    alone.apply(alone.plan.with_changes({n: {"dtype": "float"} for n in alone.plan if n != "stem_conv"}))
    assert frame.loc["stem_conv", "quantize_only"] == pytest.approx(alone.summary()["output_sqnr"], abs=0.02)


def test_sweep_leaves_the_session_unchanged():
    model = load_demo_model()
    s = qviz.Session(model, CALIB, eval_data=EVAL, progress=False).run()
    user = model_snapshot(model)
    params = {k: v.clone() for k, v in s.float_model().named_parameters()}
    modules = {n: (type(m), len(m._forward_hooks), len(m._forward_pre_hooks))
               for model_ in (s.float_model(), s.quantized_model()) for n, m in model_.named_modules()}
    plan, table, summary, points = s.plan, s.to_dataframe(), s.summary(), s.points()
    x = EVAL[0]
    with torch.no_grad():
        q_out, f_out = s.quantized_model()(x), s.float_model()(x)
    s.sensitivity()
    assert s.plan == plan and s.summary() == summary
    pd.testing.assert_frame_equal(s.to_dataframe(), table)
    pd.testing.assert_frame_equal(s.points(), points)
    assert_unchanged(model, user)
    assert modules == {n: (type(m), len(m._forward_hooks), len(m._forward_pre_hooks))
                       for model_ in (s.float_model(), s.quantized_model()) for n, m in model_.named_modules()}
    assert all(torch.equal(v, params[k]) for k, v in s.float_model().named_parameters())
    with torch.no_grad():
        assert torch.equal(s.quantized_model()(x), q_out) and torch.equal(s.float_model()(x), f_out)
    s.apply({"fc1": {"activation": "minmax"}})  # a new plan makes the stored sweep stale
    assert s.results.sensitivity is None


def _spawning_pool(max_workers):
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"))


@pytest.mark.parametrize("executor", [_spawning_pool, ThreadPoolExecutor])
def test_executor_results_equal_serial(demo, executor):
    s, frame = demo
    with executor(max_workers=2) as pool:
        spread = s.sensitivity(executor=pool).to_dataframe()
    pd.testing.assert_frame_equal(spread, frame, check_exact=True)


def test_a_forking_process_pool_is_refused_with_the_fix(demo):
    s, _ = demo
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        with pytest.raises(ConfigError, match="spawn"):
            s.sensitivity(executor=pool)


def test_variants_limit_the_work_and_keep_the_ranking(demo):
    s, frame = demo
    quick = s.sensitivity(variants=("quantize_only",)).to_dataframe()
    pd.testing.assert_series_equal(quick["quantize_only"], frame["quantize_only"], check_exact=True)
    assert list(quick.index) == list(frame.index)
    assert quick[["skip_only", "weight_only", "activation_only"]].isna().all().all()
    with pytest.raises(ConfigError, match="quantize_only included"):
        s.sensitivity(variants=("skip_only",))
    with pytest.raises(ConfigError, match="variants must name"):
        s.sensitivity(variants=("quantize_only", "everything"))
    s.sensitivity()  # leave the full sweep stored for the tests that follow


def test_cached_partial_runs_equal_full_runs(demo):
    s, frame = demo
    table = s.to_dataframe()
    full = sweep(s.float_model(), s.quantized_model(), s._eval, list(table.index), backend=s.backend,
                 progress=False, cache_bytes=0).to_dataframe()
    pd.testing.assert_frame_equal(full, frame, check_exact=False, rtol=1e-9)


def test_eval_fn_metric(demo):
    s, _ = demo
    result = s.sensitivity(eval_fn=accuracy)
    frame = result.to_dataframe()
    assert result.metric == frame.attrs["metric"] == "accuracy"
    assert (frame["float_metric"] == accuracy(s.float_model())).all()
    assert np.allclose(frame["sensitivity"], frame["float_metric"] - frame["quantize_only"])
    assert frame[["quantize_only", "skip_only", "weight_only", "activation_only"]].stack().between(0.5, 1).all()


def test_save_load_keeps_the_sweep(demo_sessions, tmp_path):
    s = demo_sessions(short=True)
    s.save(tmp_path / "before.qviz")
    frame = s.sensitivity().to_dataframe()
    s.save(tmp_path / "after.qviz")
    loaded = qviz.load(tmp_path / "after.qviz")
    pd.testing.assert_frame_equal(loaded.results.sensitivity, frame)
    assert loaded.results.sensitivity.attrs["metric"] == "output_sqnr"
    again = loaded.sensitivity()
    assert again.metric == "output_sqnr"
    pd.testing.assert_frame_equal(again.to_dataframe(), frame)
    pd.testing.assert_frame_equal(loaded.diagnose(), s.diagnose())
    with pytest.raises(qviz.QvizError, match="results only and cannot sweep"):
        loaded.sensitivity(eval_fn=accuracy)
    old = qviz.load(tmp_path / "before.qviz")
    assert old.results.sensitivity is None
    with pytest.raises(qviz.QvizError, match="results only and cannot sweep"):
        old.sensitivity()
    pd.testing.assert_frame_equal(old.diagnose(), qviz.analysis.diagnosis.diagnose(s.results))


def test_eager_flow_and_float_layers(demo_sessions):
    s = demo_sessions("eager", short=True).apply({"fc1": {"dtype": "float"}})
    frame = s.sensitivity().to_dataframe()
    assert frame.index[-1] == "fc1" and frame.loc["fc1", "quantize_only"] == math.inf
    assert frame.loc["fc1", "skip_only"] == pytest.approx(s.summary()["output_sqnr"], abs=1e-6)
    rest = frame.drop(index="fc1")[["quantize_only", "skip_only", "weight_only", "activation_only"]]
    assert np.isfinite(rest.to_numpy()).all()


def test_qat_weight_only_uses_the_fake_quant():
    qat = prepare_qat_fx(copy.deepcopy(load_demo_model()).train(), get_default_qat_qconfig_mapping("x86"),
                         (CALIB[0],))
    with torch.no_grad():
        for x in CALIB:
            qat(x)
    s = qviz.Session(qat, CALIB, eval_data=EVAL, progress=False).run()
    enabled = {n: int(m.fake_quant_enabled[0]) for n, m in s.float_model().named_modules()
               if hasattr(m, "fake_quant_enabled")}
    frame = s.sensitivity().to_dataframe()
    assert frame["weight_only"].between(25, math.inf, inclusive="neither").all()
    assert enabled == {n: int(m.fake_quant_enabled[0]) for n, m in s.float_model().named_modules()
                       if hasattr(m, "fake_quant_enabled")}

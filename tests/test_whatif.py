"""Live what-if: apply() equals a from-scratch build, touches no calibration data, fails clearly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import qviz
import qviz.session as session_module
from qviz.demo import calibration_batches, eval_batches, load_demo_model
from qviz.plan import Plan

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

CALIB = calibration_batches(2, 16)
EVAL = eval_batches(1, 32)
METRICS = ["weight_sqnr", "local_sqnr", "output_sqnr"]


def _session(flow="fx", *, plan):
    """A from-scratch build of the demo under ``plan`` (what apply() must equal)."""
    return qviz.Session(load_demo_model(), CALIB, eval_data=EVAL, flow=flow, plan=plan, progress=False).run()


@pytest.fixture(scope="module")
def base(demo_sessions):
    return demo_sessions(short=True)


def _assert_same_numbers(a: pd.DataFrame, b: pd.DataFrame, tol=0.1):
    assert list(a.index) == list(b.index)
    assert (a.dtype == b.dtype).all()
    for col in METRICS:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        same_inf = x == y  # inf == inf for float layers' local error
        with np.errstate(invalid="ignore"):
                assert ((abs(x - y) <= tol) | same_inf | (pd.isna(x) & pd.isna(y))).all(), (col, x, y)


CHANGES = {
    "observer": {"fc1": {"activation": "minmax"}},
    "moving-average": {"block_conv1": {"activation": "moving_average"}},
    "per-tensor": {"block_conv2": {"weight": "per_tensor"}},
    "affine-weights": {"stem_conv": {"weight_symmetric": False}},
    "float-middle": {"down_conv": {"dtype": "float"}},
    "float-last": {"fc2": {"dtype": "float"}},
    "percentile": {"block_conv1": {"activation": "percentile", "percentile": 99.9}},
    "several": {"fc1": {"activation": "minmax"}, "down_conv": {"dtype": "float"},
                "block_conv2": {"weight": "per_tensor"}},
}


@pytest.mark.parametrize("kind", list(CHANGES))
def test_apply_matches_a_from_scratch_build(demo_sessions, kind):
    live = demo_sessions(short=True).apply(CHANGES[kind])
    scratch = _session(plan=live.plan)
    _assert_same_numbers(live.to_dataframe(), scratch.to_dataframe())
    assert live.summary()["output_sqnr"] == pytest.approx(scratch.summary()["output_sqnr"], abs=0.1)


def test_apply_matches_from_scratch_in_eager_mode(demo_sessions):
    live = demo_sessions("eager", short=True).apply(CHANGES["per-tensor"])
    scratch = _session("eager", plan=live.plan)
    _assert_same_numbers(live.to_dataframe(), scratch.to_dataframe())


def test_eager_float_layer_gets_stubs_and_runs(demo_sessions):
    s = demo_sessions("eager", short=True).apply({"down_conv": {"dtype": "float"}})
    df = s.to_dataframe()
    assert df.loc["down_conv", "dtype"] == "float" and not df.loc["down_conv", "quantized"]
    assert df.loc["down_conv", "local_sqnr"] == float("inf")  # no error of its own
    assert df.loc["fc2", "output_sqnr"] > 20


def test_apply_changes_only_what_it_should(demo_sessions, base):
    before = base.to_dataframe()
    after = demo_sessions(short=True)
    after.apply({"block_conv2": {"weight": "per_tensor"}})
    df = after.to_dataframe()
    upstream = ["stem_conv", "block_conv1"]
    pd.testing.assert_frame_equal(df.loc[upstream, METRICS], before.loc[upstream, METRICS])
    assert df.loc["block_conv2", "weight_qscheme"] == "per_tensor_affine"
    assert df.loc["block_conv2", "weight_sqnr"] < before.loc["block_conv2", "weight_sqnr"]
    assert after.plan["block_conv2"].weight == "per_tensor"


def test_apply_runs_no_calibration_pass(demo_sessions, base, monkeypatch):
    s = demo_sessions(short=True)
    calls = []
    original = session_module.run_batch
    monkeypatch.setattr(session_module, "run_batch", lambda *a: calls.append(a[2]) or original(*a))
    s.apply({"fc1": {"activation": "minmax"}, "down_conv": {"dtype": "float"}})
    assert "calib_data" not in calls and "eval_data" in calls


def test_undo_restores_the_numbers(demo_sessions, base):
    s = demo_sessions(short=True)
    before = s.to_dataframe()
    s.apply({"fc1": {"activation": "minmax"}}).apply({"down_conv": {"dtype": "float"}})
    s.undo().undo()
    _assert_same_numbers(s.to_dataframe(), before, tol=1e-9)
    with pytest.raises(qviz.QvizError, match="nothing to undo"):
        s.undo()


def test_int4_is_marked_simulated(demo_sessions):
    s = demo_sessions(short=True).apply({"fc1": {"dtype": "int4"}})
    df = s.to_dataframe()
    assert df.loc["fc1", "simulated"] and not df.drop("fc1").simulated.any()
    assert df.loc["fc1", "weight_sqnr"] < 30  # 4-bit weights are much coarser


def test_plan_to_code_reproduces_the_session_without_qviz(demo_sessions, base):
    s = demo_sessions(short=True).apply({"block_conv2": {"weight": "per_tensor"}, "fc1": {"activation": "minmax"}})
    namespace: dict = {}
    exec(s.plan.to_code("fx"), namespace)  # noqa: S102 - the point of to_code
    mapping = namespace["build_qconfig_mapping"]()
    for member in ("block_bn2",):  # fused members must carry their group's qconfig
        mapping.set_module_name(member, mapping.module_name_qconfigs["block_conv2"])
    from copy import deepcopy

    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(deepcopy(load_demo_model()), mapping, (CALIB[0],))
    for x in CALIB:
        prepared(x)
    quantized = convert_fx(prepared)
    assert quantized.block_conv2.weight().qscheme() == torch.per_tensor_affine
    assert torch.allclose(quantized(EVAL[0]), _session(plan=s.plan).quantized_model()(EVAL[0]))


def test_search_meets_the_target_at_least_size(demo_sessions, base):
    s = demo_sessions(short=True)
    result = s.search(target_sqnr=30)
    assert result.plan is not None
    candidates = result.candidates
    meeting = candidates[candidates.meets_target]  # the plan is the smallest verified to meet it
    assert qviz.Plan.from_json(meeting.loc[meeting.weight_bytes.idxmin(), "plan"]) == result.plan
    smaller = candidates[candidates.weight_bytes < meeting.weight_bytes.min()]
    assert not smaller.empty and not smaller.meets_target.any()
    assert s.plan == base.plan  # the session is left on its plan
    check = _session(plan=result.plan)
    assert check.summary()["output_sqnr"] >= 30 - 0.1
    assert not result.pareto().empty


def test_search_keeps_the_undo_history_and_the_sweep(demo_sessions):
    s = demo_sessions(short=True).apply({"fc2": {"weight": "per_tensor"}})
    before, sweep = s.plan, s.sensitivity(progress=False).to_dataframe()
    s.search(target_sqnr=30)
    pd.testing.assert_frame_equal(s.results.sensitivity, sweep)  # the plan it measured is in force
    assert s.plan == before
    s.undo()  # back to the plan before apply(), not to a search candidate
    assert s.plan["fc2"].weight == "per_channel"
    with pytest.raises(qviz.QvizError, match="nothing to undo"):
        s.undo()


# -- bad input ----------------------------------------------------------------------------------
def test_unknown_layer_suggests_close_names(demo_sessions, base):
    with pytest.raises(qviz.ConfigError, match="block_conv2"):
        demo_sessions(short=True).apply({"block_conv_2": {"weight": "per_tensor"}})


def test_option_the_backend_does_not_support():
    s = qviz.Session(load_demo_model(), CALIB, backend="onednn", progress=False).run()
    with pytest.raises(qviz.ConfigError, match="onednn.*weight_symmetric=True"):
        s.apply({"fc1": {"weight_symmetric": False}})
    with pytest.raises(qviz.ConfigError, match="fp16"):
        s.apply({"fc1": {"dtype": "fp16"}})


def test_plan_json_from_another_model(base):
    other = Plan.default(["conv", "fc"], "x86")
    with pytest.raises(qviz.ConfigError, match="another model"):
        base.apply(other)
    with pytest.raises(qviz.ConfigError):
        Plan.from_json(other.to_json(), layer_names=list(base.plan))


def test_a_fused_member_names_its_whole_group(demo_sessions):
    s = demo_sessions(short=True).apply({"stem_bn": {"weight": "per_tensor"}})  # stem_conv, stem_bn, stem_relu
    assert s.plan["stem_conv"].weight == "per_tensor"
    assert s.to_dataframe().loc["stem_conv", "weight_qscheme"] == "per_tensor_affine"


def test_loaded_session_cannot_apply(base, tmp_path):
    base.save(tmp_path / "s.qviz")
    loaded = qviz.load(tmp_path / "s.qviz")
    assert not loaded.can_apply
    with pytest.raises(qviz.ConfigError, match="results only"):
        loaded.apply({"fc1": {"activation": "minmax"}})


def test_user_qconfig_mapping_cannot_apply():
    from torch.ao.quantization import get_default_qconfig_mapping

    s = qviz.Session(load_demo_model(), CALIB, qconfig_mapping=get_default_qconfig_mapping("x86"),
                     progress=False).run()
    with pytest.raises(qviz.ConfigError, match="plan="):
        s.apply({"fc1": {"activation": "minmax"}})


def test_failed_apply_leaves_the_session_usable(demo_sessions, base, monkeypatch):
    s = demo_sessions(short=True)
    before = s.to_dataframe()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(s._comparator, "compare", broken)
    with pytest.raises(RuntimeError):
        s.apply({"block_conv2": {"weight": "per_tensor"}})
    monkeypatch.undo()
    assert s.plan["block_conv2"].weight == "per_channel"
    pd.testing.assert_frame_equal(s.to_dataframe(), before)
    s.apply({"block_conv2": {"weight": "per_tensor"}})  # and it still works

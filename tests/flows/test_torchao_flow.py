"""flow="torchao": quantize_ per layer name, live apply(), sensitivity, report, files, QAT, no torchao."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qviz
from qviz.analysis.metrics import sqnr
from qviz.demo import calibration_batches, eval_batches, load_demo_model
from qviz.errors import ConfigError
from qviz.models import transformer_block
from qviz.options import FORMAT_DTYPES
from tests.helpers import assert_unchanged, model_snapshot

pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

CALIB = calibration_batches(2, 16)
EVAL = eval_batches(1, 32)
LINEARS = ["fc1", "fc2"]
CONVS = ["stem_conv", "block_conv1", "block_conv2", "down_conv"]
BLOCK_LINEARS = ["qkv", "proj", "fc1", "fc2"]


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, 64, generator=g) for _ in range(n)]


def _block() -> nn.Module:
    torch.manual_seed(0)
    return transformer_block().eval()


def _session(model, calib=CALIB, evals=EVAL, **kw) -> qviz.Session:
    return qviz.Session(model, calib, eval_data=evals, flow="torchao", progress=False, **kw).run()


def _independent_sqnr(w: torch.Tensor, bits: int, group: int | None) -> float:
    """Symmetric round-to-nearest per output row (per group of ``group`` inputs), in numpy."""
    w = w.detach().double().numpy()
    out, inn = w.shape
    g = w.reshape(out, -1, group or inn)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(-1, keepdims=True) / ((2 * qmax + 1) / 2)
    q = (np.clip(np.round(g / scale), -qmax - 1, qmax) * scale).reshape(out, inn)
    return 20 * math.log10(np.linalg.norm(w) / np.linalg.norm(w - q))


@pytest.fixture(scope="module")
def demo_int8():
    return _session(load_demo_model(), scheme="int8_weight_only")


@pytest.fixture(scope="module")
def block_sessions():
    calib, evals = _tokens(2, 1), _tokens(1, 2)
    return {
        s: _session(_block(), calib, evals, scheme=s)
        for s in ("int8_dynamic", "int8_weight_only", "int4_weight_only")
    }


# -- results -------------------------------------------------------------------------------
def test_demo_linears_quantized_convs_float(demo_int8):
    df = demo_int8.to_dataframe()
    assert list(df.index[df.quantized]) == LINEARS
    # torchao's configs are for Linear layers: convs stay float
    assert list(df.index[~df.quantized]) == CONVS
    assert set(df.loc[CONVS, "dtype"]) == {"float"}
    assert set(df.loc[LINEARS, "dtype"]) == {"int8 (weight-only)"}
    assert set(df.loc[LINEARS, "weight_qscheme"]) == {"per_channel_symmetric"}
    assert demo_int8.summary()["left_float"] == CONVS
    assert demo_int8.plan["fc1"].dtype == "int8" and demo_int8.plan["stem_conv"].dtype == "float"


@pytest.mark.parametrize(
    "scheme, bits", [("int8_weight_only", 8), ("int4_weight_only", 4), ("int8_dynamic", 8)]
)
def test_weight_sqnr_is_the_dequantized_subclass(scheme, bits):
    model = load_demo_model()
    s = _session(model, scheme=scheme)
    df = s.to_dataframe()
    for name in LINEARS:
        float_w = model.get_submodule(name).weight.detach()
        q = s.quantized_model().get_submodule(name).weight
        assert type(q).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
        assert df.loc[name, "weight_sqnr"] == pytest.approx(sqnr(float_w, q.dequantize()), abs=1e-6)
        expected = _independent_sqnr(float_w, bits, 32 if bits == 4 else None)
        assert df.loc[name, "weight_sqnr"] == pytest.approx(expected, abs=1e-3)
    assert (
        df.loc["fc2", "dtype"]
        == f"int{bits} ({'dynamic' if scheme == 'int8_dynamic' else 'weight-only'})"
    )


def test_output_sqnr_sensible_and_int4_worse(block_sessions):
    int8, int4 = block_sessions["int8_weight_only"], block_sessions["int4_weight_only"]
    dyn = block_sessions["int8_dynamic"]
    for s in block_sessions.values():
        df = s.to_dataframe()
        # LayerNorms are no candidates: neither quantized nor listed as left float
        assert list(df.index) == BLOCK_LINEARS and df.quantized.all()
        assert (
            df.loc[BLOCK_LINEARS, ["output_sqnr", "local_sqnr", "weight_sqnr"]].notna().all().all()
        )
    assert 35 < int8.summary()["output_sqnr"] < 70
    assert 10 < int4.summary()["output_sqnr"] < int8.summary()["output_sqnr"] - 15
    assert dyn.summary()["output_sqnr"] < int8.summary()["output_sqnr"]  # activations quantized too
    a, b = int8.to_dataframe(), int4.to_dataframe()
    assert (b.loc[BLOCK_LINEARS, "weight_sqnr"] < a.loc[BLOCK_LINEARS, "weight_sqnr"] - 15).all()
    assert b.loc["fc2", "weight_qscheme"] == "per_group(32)_symmetric"


def test_the_float_model_is_left_alone():
    model = _block()
    before = model_snapshot(model)
    _session(model, _tokens(1, 1), _tokens(1, 2))
    assert_unchanged(model, before)


# -- apply ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        {"proj": {"dtype": "float"}},
        {"fc1": {"dtype": "int4"}},
        {"qkv": {"dtype": "int4"}, "fc2": {"dtype": "float"}},
    ],
)
def test_apply_matches_building_the_plan_from_scratch(change):
    calib, evals = _tokens(2, 1), _tokens(1, 2)
    live = _session(_block(), calib, evals, scheme="int8_dynamic")
    before = live.to_dataframe()
    live.apply(change)
    target = live.plan
    scratch = _session(_block(), calib, evals, scheme="int8_dynamic", plan=target)
    a, b = live.to_dataframe(), scratch.to_dataframe()
    cols = ["output_sqnr", "local_sqnr"]
    assert np.allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), atol=0.1, equal_nan=True)
    assert (a["dtype"] == b["dtype"]).all() and (a["quantized"] == b["quantized"]).all()
    assert live.summary()["output_sqnr"] == pytest.approx(scratch.summary()["output_sqnr"], abs=0.1)
    for name, fields in change.items():
        if fields["dtype"] == "float":
            assert not a.loc[name, "quantized"] and a.loc[name, "local_sqnr"] == math.inf
        else:
            assert a.loc[name, "weight_dtype"] == "int4"
            assert a.loc[name, "weight_sqnr"] < before.loc[name, "weight_sqnr"] - 15
    live.undo()
    assert np.allclose(
        live.to_dataframe()["output_sqnr"].to_numpy(float), before["output_sqnr"].to_numpy(float)
    )


def test_apply_back_to_int8_after_a_float_plan():
    calib, evals = _tokens(1, 1), _tokens(1, 2)
    s = _session(_block(), calib, evals, plan=None, scheme="int8_weight_only")
    plan = s.plan.with_changes({"proj": {"dtype": "float"}})
    s2 = _session(_block(), calib, evals, scheme="int8_weight_only", plan=plan)
    assert not s2.to_dataframe().loc["proj", "quantized"]
    s2.apply({"proj": {"dtype": "int8"}})
    df = s2.to_dataframe()
    assert df.loc["proj", "quantized"] and df.loc["proj", "dtype"] == "int8 (weight-only)"
    assert df.loc["proj", "output_sqnr"] == pytest.approx(
        s.to_dataframe().loc["proj", "output_sqnr"], abs=0.1
    )


def test_apply_refuses_what_torchao_cannot_run(demo_int8):
    with pytest.raises(ConfigError, match="Linear layers only"):
        demo_int8.apply({"stem_conv": {"dtype": "int8"}})
    with pytest.raises(ConfigError, match="fp16"):
        demo_int8.apply({"fc1": {"dtype": "fp16"}})
    s = _session(load_demo_model(), scheme="int8_weight_only", group_size=48)
    with pytest.raises(ConfigError, match="group_size"):
        s.apply({"fc1": {"dtype": "int4"}})
    assert demo_int8.plan["stem_conv"].dtype == "float"  # nothing changed


def test_options_are_checked():
    with pytest.raises(ConfigError, match="int8_dynamic"):
        qviz.Session(load_demo_model(), CALIB, flow="torchao", scheme="int3")
    with pytest.raises(ConfigError, match="group_size"):
        qviz.Session(load_demo_model(), CALIB, flow="torchao", group_size=-1)


def test_per_channel_int4_with_group_size_none():
    s = _session(load_demo_model(), scheme="int4_weight_only", group_size=None)
    assert set(s.to_dataframe().loc[LINEARS, "weight_qscheme"]) == {"per_channel_symmetric"}


# -- sensitivity, report, files, code ------------------------------------------------------
def test_sensitivity_ranks_the_linear_layers(block_sessions):
    s = block_sessions["int4_weight_only"]
    found = s.sensitivity(progress=False).to_dataframe()
    assert list(found["rank"]) == [1, 2, 3, 4] and set(found.index) == set(BLOCK_LINEARS)
    assert found["quantize_only"].notna().all() and np.isfinite(found["quantize_only"]).all()
    # weight-only: quantizing a layer alone is quantizing its weight alone
    assert np.allclose(found["quantize_only"], found["weight_only"], atol=1e-6)
    assert found["activation_only"].isna().all()
    assert (found["skip_only"] > s.summary()["output_sqnr"]).all()


def test_search_leaves_the_layers_torchao_cannot_quantize_float():
    s = _session(load_demo_model(), scheme="int8_weight_only")
    result = s.search(target_sqnr=30)
    assert result.plan is not None
    convs = set(s.summary()["left_float"])
    assert convs and all(result.plan[n].dtype == "float" for n in convs)
    assert {result.plan[n].dtype for n in ("fc1", "fc2")} <= {"int4", "int8"}


def test_report_and_session_file_round_trip(demo_int8, tmp_path):
    demo_int8.sensitivity(progress=False)
    html = demo_int8.report(tmp_path / "r.html").read_text()
    assert "fc1" in html and "Int8WeightOnlyConfig(granularity=PerRow())" in html  # quantize_ code
    demo_int8.save(tmp_path / "s.qviz")
    loaded = qviz.load(tmp_path / "s.qviz")
    a, b = demo_int8.to_dataframe(), loaded.to_dataframe()
    assert list(a.index) == list(b.index)
    assert np.allclose(
        a["weight_sqnr"].to_numpy(float), b["weight_sqnr"].to_numpy(float), equal_nan=True
    )
    assert (a["dtype"] == b["dtype"]).all()
    assert (
        loaded.results.meta["flow"] == "torchao"
        and loaded.results.meta["scheme"] == "int8_weight_only"
    )
    assert loaded.sensitivity().to_dataframe()["rank"].tolist() == [1, 2, 3, 4, 5, 6]


def test_to_code_builds_the_same_model(block_sessions):
    s = block_sessions["int8_dynamic"]
    plan = s.plan.with_changes({"qkv": {"dtype": "int4"}, "proj": {"dtype": "float"}})
    code = plan.to_code("torchao", scheme="int8_dynamic", group_size=32)
    assert "qviz" not in code.split('"""')[2]
    namespace: dict = {}
    exec(compile(code, "<plan>", "exec"), namespace)  # noqa: S102 - our own generated code
    model = _block()
    namespace["quantize_"](model, namespace["build_config"](), filter_fn=None)
    live = _session(_block(), _tokens(1, 1), _tokens(1, 2), scheme="int8_dynamic", plan=plan)
    q = live.quantized_model()
    for name in BLOCK_LINEARS:
        w, ref = model.get_submodule(name).weight, q.get_submodule(name).weight
        assert type(w) is type(ref)
        if name != "proj":
            assert torch.equal(w.dequantize(), ref.dequantize())
    x = _tokens(1, 2)[0]
    assert torch.allclose(model(x), q(x))


# -- QAT -----------------------------------------------------------------------------------
def test_watch_records_torchao_fake_quantizers():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = _block().train()
    quantize_(
        model,
        QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32),
            step="prepare",
        ),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with qviz.watch(model, every=2, histograms_every=4) as rec:
        for x in _tokens(9, 3):
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.item())
    tl = rec.timeline()
    points = tl.points_frame()
    assert len(points) == 8
    assert set(points.loc["fc1.weight_fake_quantizer", ["layer", "role"]]) == {"fc1", "weight"}
    assert points.loc["fc1.weight_fake_quantizer", ["quant_min", "quant_max"]].tolist() == [-8, 7]
    assert points.loc["fc1.activation_fake_quantizer", "role"] == "input"
    steps, scale = tl.series("fc2.weight_fake_quantizer", "scale")
    assert steps.tolist() == [0, 2, 4, 6, 8]
    assert scale.shape == (5, 64 * 128 // 32)  # one scale per output row and group of 32
    fq = model.fc2.weight_fake_quantizer
    assert np.allclose(scale[-1], fq.scale.detach().reshape(-1).numpy())  # step 8 was the last
    assert not np.allclose(scale[0], scale[-1])  # ... and they moved
    _, zp = tl.series("fc2.weight_fake_quantizer", "zero_point")
    assert np.isfinite(zp).all()
    assert tl.scalars()["loss"].notna().sum() == 9
    # convert as torchao does; the converted weights are the fake quantizers' grid
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup

    quantize_(
        model,
        QATConfig(
            Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(32)
            ),
            step="convert",
        ),
    )
    assert type(model.fc2.weight).__name__ == "IntxUnpackedToInt8Tensor"


# -- without torchao -----------------------------------------------------------------------
def test_missing_torchao_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # "import torchao" raises ImportError
    with pytest.raises(qviz.QvizError, match=r'pip install "qviz\[torchao\]"') as info:
        qviz.Session(load_demo_model(), CALIB, flow="torchao")
    assert isinstance(info.value, ConfigError)


def test_importing_torchao_through_qviz_is_quiet():
    code = (
        "import qviz\nfrom qviz.flows.torchao.flow import load_torchao\nload_torchao()\n"
        "from qviz.demo import calibration_batches, load_demo_model\n"
        "qviz.Session(load_demo_model(), calibration_batches(1, 8), flow='torchao', progress=False)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr + out.stdout
    assert "_pytree" not in out.stderr + out.stdout


def test_dashboard_draws_int4_group_scales_as_groups(block_sessions):
    from qviz.ui.app import Dashboard

    s = block_sessions["int4_weight_only"]
    dashboard = Dashboard(s)
    dashboard.state.selected_layer = "fc2"
    fig = dashboard.layer._weight_figure()
    weight = s.quantized_model().get_submodule("fc2").weight
    out_features, in_features = weight.shape
    assert len(fig.data[0].y) == out_features * in_features // 32  # one bar per group of 32 inputs
    assert "per group" in fig.layout.title.text and dashboard.state.message == ""


def test_dashboard_editor_offers_what_torchao_runs(block_sessions):
    from qviz.ui.state import DashboardState
    from qviz.ui.views import ConfigEditor

    editor = ConfigEditor(state=DashboardState(block_sessions["int8_dynamic"]))
    assert editor.widgets["dtype"].options == ["int8", "int4", *FORMAT_DTYPES, "float"]  # the number formats too
    assert not editor.widgets["weight"].disabled
    assert all(editor.widgets[f].disabled for f in ("activation", "percentile", "reduce_range"))
    editor.activation = "percentile"  # the observer toggle must not re-enable it
    assert editor.widgets["percentile"].disabled


def test_cli_demo_runs_the_torchao_flow(capsys):
    from qviz.cli import main

    assert main(["demo", "--flow", "torchao"]) == 0
    out = capsys.readouterr().out
    assert "int8 (dynamic)" in out and "model output SQNR" in out

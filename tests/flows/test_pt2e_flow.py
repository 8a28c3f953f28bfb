"""flow="pt2e": torch.export + prepare_pt2e / convert_pt2e (torchao) behind the same Session.

The agreement test builds torchao's PT2E numeric debugger pipeline independently of qviz
(export, prepare_pt2e with X86InductorQuantizer, calibration on the same batches, convert_pt2e,
``prepare_for_propagation_comparison`` on the float export and on the converted model,
``extract_results_from_loggers``, ``compare_results``). The debugger logs every node of both
graphs on the same batch, so its SQNR at a node is the propagated error there: it corresponds to
qviz's ``output_sqnr`` taken at the layer's group output node (relu / add-relu / gelu / the
linear itself), before that output is quantized again. (At a conv node the debugger compares
the BN-folded conv with the unfolded one, which is why qviz measures at the group output.)
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

import qviz
from qviz.demo import calibration_batches, eval_batches, load_demo_model
from qviz.errors import ConfigError, ModelError, QvizError
from qviz.models import transformer_block
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)

DEMO_LAYERS = ["stem_conv", "block_conv1", "block_conv2", "down_conv", "fc1", "fc2"]
BLOCK_LAYERS = ["qkv", "proj", "fc1", "fc2"]
COLUMNS = ["weight_sqnr", "local_sqnr", "output_sqnr"]


def _demo():
    return load_demo_model(), calibration_batches(), eval_batches(n_batches=2)


def _block():
    torch.manual_seed(0)
    model = transformer_block().eval()
    return (
        model,
        [torch.randn(4, 16, 64) for _ in range(4)],
        [torch.randn(4, 16, 64) for _ in range(2)],
    )


MODELS = {"demo": (_demo, DEMO_LAYERS, "block_conv1"), "block": (_block, BLOCK_LAYERS, "fc1")}
_sessions: dict = {}


def _session(name: str):
    """(model, calib, eval, session): one run per model for the whole module."""
    if name not in _sessions:
        model, calib, ev = MODELS[name][0]()
        _sessions[name] = (
            model,
            calib,
            ev,
            qviz.Session(model, calib, flow="pt2e", eval_data=ev, progress=False).run(),
        )
    return _sessions[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_frame_has_float_layer_names_and_real_numbers(name):
    model, calib, ev = MODELS[name][0]()
    before = model_snapshot(model)
    session = qviz.Session(model, calib, flow="pt2e", eval_data=ev, progress=False).run()
    assert_unchanged(model, before)
    frame = session.to_dataframe()
    assert list(frame.index) == MODELS[name][1]
    assert frame["quantized"].all()
    for column in COLUMNS:
        assert frame[column].between(10, 100).all(), (column, frame[column])
    assert set(frame["type"]) <= {"Conv2d", "Linear"}
    assert session.summary()["output_sqnr"] > 20
    assert session.summary()["size_bytes"] < session.summary()["float_size_bytes"]
    points = session.points()
    assert {"weight", "output"} <= set(points["role"])
    assert set(points.loc[points["role"] == "weight", "layer"]) == set(MODELS[name][1])


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_float_matches_a_run_from_scratch(name):
    model, calib, ev, session = _session(name)
    layer = MODELS[name][2]
    before = session.to_dataframe()
    session.apply({layer: {"dtype": "float"}})
    try:
        after = session.to_dataframe()
        assert not after.loc[layer, "quantized"] and after.loc[layer, "dtype"] == "float"
        assert math.isinf(after.loc[layer, "local_sqnr"])
        later = after.index[list(after.index).index(layer) + 1 :]
        assert (
            after.loc[later, "output_sqnr"] - before.loc[later, "output_sqnr"]
        ).abs().max() > 0.1
        scratch = (
            qviz.Session(model, calib, flow="pt2e", eval_data=ev, progress=False, plan=session.plan)
            .run()
            .to_dataframe()
        )
        for column in ("local_sqnr", "output_sqnr"):
            for n in after.index:
                ours, theirs = after.loc[n, column], scratch.loc[n, column]
                assert ours == theirs or abs(ours - theirs) <= 0.1, (n, column, ours, theirs)
    finally:
        session.undo()
    restored = session.to_dataframe()
    assert (restored[COLUMNS] - before[COLUMNS]).abs().max().max() < 1e-6


def test_plan_code_builds_the_same_quantized_model():
    """The emitted quantizer code, run without qviz, converts to the session's model."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, calib, ev, session = _session("demo")
    session.apply({"block_conv1": {"dtype": "float"}})
    try:
        code = session.plan.code_for(session.results.meta)
        assert 'set_module_name_qconfig("block_conv1", None)' in code and "qviz" not in code.split('"""')[2]
        namespace: dict = {}
        exec(compile(code, "<plan>", "exec"), namespace)
        dynamic = ({0: torch.export.Dim.AUTO},)
        exported = torch.export.export(copy.deepcopy(model).eval(), (calib[0],), dynamic_shapes=dynamic).module()
        prepared = prepare_pt2e(exported, namespace["build_quantizer"]())
        with torch.no_grad():
            for x in calib:
                prepared(x)
            ours, theirs = session.quantized_model()(ev[0]), convert_pt2e(prepared)(ev[0])
        assert torch.allclose(ours, theirs, atol=1e-5)
    finally:
        session.undo()


def test_apply_refuses_what_the_default_quantizer_cannot_do():
    *_, session = _session("demo")
    with pytest.raises(ConfigError, match="quantizer"):
        session.apply({"fc1": {"weight": "per_tensor"}})


def test_user_quantizer_is_used_and_apply_says_why_not():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model, calib, ev = _demo()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    quantizer.set_module_name_qconfig("fc2", None)
    session = qviz.Session(
        model, calib, flow="pt2e", quantizer=quantizer, eval_data=ev, progress=False
    ).run()
    frame = session.to_dataframe()
    assert not frame.loc["fc2", "quantized"] and frame.loc["fc1", "quantized"]
    with pytest.raises(ConfigError, match="owns|own"):
        session.apply({"fc1": {"dtype": "float"}})


def test_search_climbs_from_int8_to_float():
    *_, session = _session("demo")
    start, target = session.plan, session.summary()["output_sqnr"] + 1.0
    result = session.search(target_sqnr=target)
    assert result.plan is not None and session.plan == start
    assert {c.dtype for _, c in result.plan.items()} == {"int8", "float"}  # some layers raised
    assert result.candidates.iloc[-1]["output_sqnr"] >= target


def test_sensitivity_report_and_session_file(tmp_path):
    *_, session = _session("demo")
    calls = []
    quick = session.sensitivity(variants=("quantize_only",), callback=lambda *a: calls.append(a))
    assert calls == [(i, len(DEMO_LAYERS)) for i in range(1, len(DEMO_LAYERS) + 1)]
    found = session.sensitivity().to_dataframe()
    assert set(found.index) == set(DEMO_LAYERS)
    assert (
        found["quantize_only"].between(20, 100).all() and found["skip_only"].between(20, 100).all()
    )
    quick = quick.to_dataframe()
    assert quick["skip_only"].isna().all() and list(quick.index) == list(found.index)
    assert (quick["quantize_only"] == found["quantize_only"]).all()
    path = session.report(tmp_path / "report.html")
    assert path.stat().st_size > 10_000 and "block_conv1" in path.read_text()
    session.save(tmp_path / "demo.qviz")
    loaded = qviz.load(tmp_path / "demo.qviz")
    assert loaded.to_dataframe().equals(session.to_dataframe())
    assert loaded.summary()["output_sqnr"] == session.summary()["output_sqnr"]
    assert loaded.sensitivity().to_dataframe().equals(found)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return self.fc(x)
        return -self.fc(x)


def test_a_model_export_cannot_take_gets_a_qviz_error():
    with pytest.raises(ModelError, match="torch.export could not export _DataDependent") as info:
        qviz.Session(_DataDependent(), [torch.randn(2, 4)], flow="pt2e", progress=False).run()
    assert "torch.cond" in str(info.value) and "flow='fx'" in str(info.value)


def test_without_torchao_the_error_says_what_to_install(monkeypatch):
    for key in [k for k in sys.modules if k == "torchao" or k.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, key, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(QvizError, match=r'pip install "qviz\[torchao\]"'):
        qviz.Session(load_demo_model(), calibration_batches(), flow="pt2e")


def test_torchao_import_noise_does_not_reach_the_user():
    code = (
        "import torch, qviz; from qviz.models import tiny_mlp; torch.manual_seed(0); "
        "qviz.Session(tiny_mlp().eval(), [torch.randn(8, 16)], flow='pt2e', progress=False).run()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for noise in ("Failed to load", "_pytree", "register_constant"):
        assert noise not in done.stderr + done.stdout, done.stderr


def _debugger_sqnr(model, calib, batch) -> dict[str, float]:
    """{node name: SQNR} from torchao's PT2E numeric debugger, built without qviz."""
    from torchao.quantization.pt2e import (
        compare_results,
        extract_results_from_loggers,
        prepare_for_propagation_comparison,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    dims = ({0: torch.export.Dim.AUTO},)
    exported = torch.export.export(
        copy.deepcopy(model).eval(), (calib[0],), dynamic_shapes=dims
    ).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(copy.deepcopy(exported), quantizer)
    with torch.no_grad():
        for b in calib:
            prepared(b)
    converted = convert_pt2e(prepared)
    ref, actual = (
        prepare_for_propagation_comparison(exported),
        prepare_for_propagation_comparison(converted),
    )
    with torch.no_grad():
        ref(batch)
        actual(batch)
    # with a dynamic batch the loggers also log symbolic sizes (ints), which compare_results refuses
    ref_logs, actual_logs = (
        {
            k: v
            for k, v in extract_results_from_loggers(m).items()
            if isinstance(v[2][0], torch.Tensor)
        }
        for m in (ref, actual)
    )
    results = compare_results(ref_logs, actual_logs)
    return {info.name: float(summary.results[0].sqnr) for info, summary in results.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_output_sqnr_agrees_with_the_pt2e_numeric_debugger(name):
    model, calib, ev = MODELS[name][0]()
    batch = ev[0]
    session = qviz.Session(model, calib, flow="pt2e", eval_data=[batch], progress=False).run()
    theirs = _debugger_sqnr(model, calib, batch)
    frame = session.to_dataframe()
    outputs = {g.layer: g.output for g in session.flow.groups}
    assert set(outputs) == set(frame.index)
    diffs = {}
    for layer, node in outputs.items():
        assert node in theirs, f"{layer}: no numeric-debugger result for node {node!r}"
        diffs[layer] = frame.loc[layer, "output_sqnr"] - theirs[node]
        assert abs(diffs[layer]) <= 0.5, (
            layer,
            node,
            frame.loc[layer, "output_sqnr"],
            theirs[node],
        )
    print(name, {k: round(v, 4) for k, v in diffs.items()})


def test_qat_pt2e_model_works_with_watch():
    from torchao.quantization.pt2e import move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from qviz.demo import load_digits_split

    model = load_demo_model()
    x, y = load_digits_split()["train"]
    exported = torch.export.export(
        copy.deepcopy(model).train(), (x[:32],), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    ).module()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    qat = prepare_qat_pt2e(exported, quantizer)
    move_exported_model_to_train(qat)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    with qviz.watch(qat, every=1, histograms_every=None) as rec:
        for step in range(6):
            loss = torch.nn.functional.cross_entropy(
                qat(x[step * 32 : (step + 1) * 32]), y[step * 32 : (step + 1) * 32]
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.log(loss=loss.item())
    frame = rec.timeline().to_dataframe()
    scales = frame[frame["quantity"] == "scale"]
    assert set(scales["step"]) == set(range(6))
    by_layer = scales.groupby(["layer", "role"])["value"]
    assert {
        ("stem_conv", "weight"),
        ("stem_conv", "output"),
        ("fc1", "weight"),
        ("fc2", "weight"),
    } <= set(by_layer.groups)
    moved = scales[(scales["layer"] == "fc1") & (scales["role"] == "weight")].groupby("channel")[
        "value"
    ]
    assert (moved.max() - moved.min()).max() > 0  # the weight scales follow training


def test_dashboard_editor_offers_what_the_quantizer_runs():
    from qviz.ui.state import DashboardState
    from qviz.ui.views import ConfigEditor

    *_, session = _session("demo")
    editor = ConfigEditor(state=DashboardState(session))
    assert editor.widgets["dtype"].options == ["int8", "float"] and not editor.widgets["dtype"].disabled
    assert not editor.widgets["reduce_range"].disabled
    assert all(editor.widgets[f].disabled for f in ("weight", "activation", "percentile"))
    assert "flow pt2e" in editor.flow_note.object and editor.flow_note.visible


def test_cli_demo_runs_the_pt2e_flow(capsys):
    from qviz.cli import main

    assert main(["demo", "--flow", "pt2e"]) == 0
    out = capsys.readouterr().out
    assert all(layer in out for layer in DEMO_LAYERS) and "model output SQNR" in out

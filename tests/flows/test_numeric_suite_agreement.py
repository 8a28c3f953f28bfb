"""qviz's per-layer SQNRs agree with PyTorch's own FX numeric suite (``_numeric_suite_fx``).

The reference is built here with plain torch, independently of qviz: ``prepare_fx`` on a copy of
the float model with the default x86 QConfigMapping, calibration on the same batches, then
``convert_fx``. On one evaluation batch (so each numeric-suite result holds one entry):

- ``weight_sqnr`` vs ``extract_weights`` (fp32 = the prepared model's BN-folded weights);
- ``output_sqnr`` vs ``add_loggers`` + ``extract_logger_info`` (both models fed the batch);
- ``local_sqnr`` vs ``add_shadow_loggers`` + ``extract_shadow_logger_info`` (the fp32 layer fed
  the int8 model's dequantized input to it).

Numeric-suite results are keyed by FX node name (``layer1_0_conv1``); each entry carries the
module's ``fqn`` (``layer1.0.conv1``), which is how qviz names layers, fused groups by their
first module. Every quantized conv/linear row of qviz's frame must be matched, and agree within
``TOLERANCE_DB``.
"""

from __future__ import annotations

import copy
import math
from functools import cache
from unittest import mock

import pytest
import torch
import torch.ao.ns._numeric_suite_fx as ns
from torch.ao.ns.fx import graph_matcher
from torch.ao.ns.fx.utils import compute_sqnr
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qviz
from qviz.demo import calibration_batches, eval_batches, load_demo_model
from qviz.models import resnet18, tiny_mlp

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)

BACKEND = "x86"
TOLERANCE_DB = 0.5
METRICS = ("weight_sqnr", "output_sqnr", "local_sqnr")
_WEIGHTED_TYPES = ("Conv", "Linear")  # Conv2d, ConvReLU2d, Linear, LinearReLU, ...


def _digits():
    return load_demo_model(), calibration_batches(), eval_batches(n_batches=1)[0]


def _resnet():
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    model.train()  # non-trivial BN running stats, so the folded weights differ from the raw ones
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32) * 2 + 0.5)
    model.eval()
    calib = [torch.randn(1, 3, 32, 32) * 2 + 0.5 for _ in range(2)]
    return model, calib, torch.randn(2, 3, 32, 32) * 2 + 0.5


def _mlp():
    torch.manual_seed(0)
    return tiny_mlp().eval(), [torch.randn(8, 16) for _ in range(4)], torch.randn(16, 16)


MODELS = {"digits": _digits, "resnet18": _resnet, "tiny_mlp": _mlp}


def _by_fqn(results: dict, kind: str) -> dict[str, float]:
    """{module fqn: int8-vs-fp32 SQNR} from numeric-suite results extended with "sqnr"."""
    out = {}
    for node_name, by_type in results.items():
        for entry in by_type[kind]["int8"]:
            name = entry.get("fqn") or entry["ref_node_name"] or node_name
            (value,) = entry["sqnr"]  # one eval batch / one weight
            assert name not in out, f"two numeric-suite {kind} results name {name!r}"
            out[name] = float(value)
    return out


def _numeric_suite(model, calib, batch) -> dict[str, dict[str, float]]:
    """SQNRs per layer fqn from torch's FX numeric suite, for each of qviz's metrics."""
    # The graph matcher rebuilds the (constant) fusion pattern list for every node it visits,
    # about a third of the suite's CPU time on ResNet-18; built once, it gives the same matches.
    fusions = cache(graph_matcher.get_reversed_fusions)
    with mock.patch.object(graph_matcher, "get_reversed_fusions", fusions):
        return _numeric_suite_results(model, calib, batch)


def _numeric_suite_results(model, calib, batch) -> dict[str, dict[str, float]]:
    example = (calib[0],)
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(BACKEND), example)
    with torch.no_grad():
        for b in calib:
            prepared(b)
    quantized = convert_fx(copy.deepcopy(prepared))

    weights = ns.extract_weights("fp32", prepared, "int8", quantized)
    ns.extend_logger_results_with_comparison(weights, "fp32", "int8", compute_sqnr, "sqnr")

    fp32_logged, int8_logged = ns.add_loggers(
        "fp32", copy.deepcopy(prepared), "int8", copy.deepcopy(quantized), ns.OutputLogger
    )
    with torch.no_grad():
        fp32_logged(batch)
        int8_logged(batch)
    outputs = ns.extract_logger_info(fp32_logged, int8_logged, ns.OutputLogger, "int8")
    ns.extend_logger_results_with_comparison(outputs, "fp32", "int8", compute_sqnr, "sqnr")

    shadowed = ns.add_shadow_loggers(
        "fp32", copy.deepcopy(prepared), "int8", copy.deepcopy(quantized), ns.OutputLogger
    )
    with torch.no_grad():
        shadowed(batch)
    shadows = ns.extract_shadow_logger_info(shadowed, ns.OutputLogger, "int8")
    ns.extend_logger_results_with_comparison(shadows, "fp32", "int8", compute_sqnr, "sqnr")

    return {
        "weight_sqnr": _by_fqn(weights, "weight"),
        "output_sqnr": _by_fqn(outputs, "node_output"),
        "local_sqnr": _by_fqn(shadows, "node_output"),
    }


@cache
def _run(model_name: str):
    """(qviz frame, numeric-suite SQNRs) for one model; both quantize under the x86 engine."""
    model, calib, batch = MODELS[model_name]()
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = BACKEND
    try:
        reference = _numeric_suite(model, calib, batch)
        session = qviz.Session(
            model, calib, flow="fx", backend=BACKEND, eval_data=[batch], progress=False
        ).run()
    finally:
        torch.backends.quantized.engine = before
    return session.to_dataframe(), reference


def _weighted_quantized_rows(frame):
    mask = frame["quantized"].astype(bool) & frame["type"].str.contains("|".join(_WEIGHTED_TYPES))
    return frame[mask]


def diffs(model_name: str, metric: str) -> dict[str, float]:
    """{layer: qviz - numeric suite} in dB for the quantized conv/linear layers of qviz's frame."""
    frame, reference = _run(model_name)
    rows = _weighted_quantized_rows(frame)
    theirs = reference[metric]
    missing = [name for name in rows.index if name not in theirs]
    assert not missing, f"{metric}: qviz layers with no numeric-suite result: {missing}"
    return {name: float(rows.loc[name, metric]) - theirs[name] for name in rows.index}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_frame_covers_every_weighted_layer(model_name):
    frame, reference = _run(model_name)
    rows = _weighted_quantized_rows(frame)
    assert len(rows) > 0
    # extract_weights finds every quantized layer with weights: qviz must list all of them
    assert set(reference["weight_sqnr"]) == set(rows.index)
    if model_name == "resnet18":
        assert "layer2.0.downsample.0" in rows.index  # fused conv-bn of a residual branch
        assert len(rows) == 21  # 20 convs (3 downsamples) + fc


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_sqnr_agrees_with_numeric_suite(model_name, metric):
    frame, reference = _run(model_name)
    per_layer = diffs(model_name, metric)
    assert per_layer
    for name, diff in per_layer.items():
        ours, theirs = frame.loc[name, metric], reference[metric][name]
        assert math.isfinite(ours) and math.isfinite(theirs), (name, ours, theirs)
        assert abs(diff) <= TOLERANCE_DB, (
            f"{model_name} {name} {metric}: qviz {ours:.3f} dB, numeric suite {theirs:.3f} dB"
        )

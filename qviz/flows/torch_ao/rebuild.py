"""Live what-if: rebuild only the layers whose plan changed, from statistics already recorded.

``Session.apply`` calls :func:`build_layer` for each changed layer: the float reference layer
(fused, BN folded) is converted by torch's own ``from_float`` with the plan's qconfig, while
its output qparams come from the calibration statistics (:class:`ActivationStats`), so no
calibration pass runs again. A layer set to "float" is wrapped to dequantize its input and, when
quantized layers consume its output, quantize that output again with the qparams recorded for it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from qviz.capture.stats import ActivationStats
from qviz.errors import ConfigError
from qviz.flows.torch_ao.qconfigs import to_qconfig
from qviz.plan import LayerConfig
from qviz.results import output_record

_ACTIVATION_FIELDS = ("dtype", "activation", "percentile", "activation_symmetric", "reduce_range")


class FixedQParams(nn.Module):
    """Stands in for a calibrated observer: ``from_float`` reads the output qparams from it."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype):
        super().__init__()
        self.scale, self.zero_point, self.dtype = float(scale), int(zero_point), dtype

    def calculate_qparams(self):
        return torch.tensor([self.scale]), torch.tensor([self.zero_point], dtype=torch.int64)

    def forward(self, x):
        return x


class FloatLayer(nn.Module):
    """A layer left in float inside a quantized model: dequantize in, quantize out if needed."""

    def __init__(self, module: nn.Module, scale: float | None, zero_point: int | None):
        super().__init__()
        self.module = module
        self.scale, self.zero_point = scale, zero_point

    def forward(self, *args):
        out = self.module(*(a.dequantize() if isinstance(a, torch.Tensor) and a.is_quantized else a
                            for a in args))
        if self.scale is None:
            return out
        return torch.quantize_per_tensor(out, self.scale, self.zero_point, torch.quint8)


def fix_qparams(observer: nn.Module, scale: float, zero_point: int) -> None:
    """Make a prepared model's observer report these qparams at convert (it saw no data)."""
    qparams = (torch.tensor([float(scale)]), torch.tensor([int(zero_point)], dtype=torch.int64))
    observer.calculate_qparams = lambda: qparams


def same_activation(a: LayerConfig, b: LayerConfig) -> bool:
    """True when two configs give a layer's output the same qparams."""
    return all(getattr(a, f) == getattr(b, f) for f in _ACTIVATION_FIELDS)


def activation_qparams(stats: ActivationStats, config: LayerConfig, backend: str) -> tuple[float, int, torch.dtype]:
    """The output qparams ``config`` gives a layer, computed from its recorded statistics."""
    observer = to_qconfig(config, backend).activation()
    kwargs = {"dtype": observer.dtype, "qscheme": observer.qscheme}
    if getattr(observer, "has_customized_qrange", False):
        kwargs.update(quant_min=observer.quant_min, quant_max=observer.quant_max)
    else:
        kwargs["reduce_range"] = bool(getattr(observer, "reduce_range", False))
    scale, zero_point = stats.qparams(config.activation, percentile=config.percentile, **kwargs)
    return scale, zero_point, observer.dtype


def build_layer(reference_layer: nn.Module, config: LayerConfig, backend: str,
                output_qparams: tuple[float, int, torch.dtype] | None) -> nn.Module:
    """The quantized module for ``config`` (or a :class:`FloatLayer` for dtype "float")."""
    module = copy.deepcopy(reference_layer)
    if config.dtype == "float":
        scale, zero_point = (output_qparams[0], output_qparams[1]) if output_qparams else (None, None)
        return FloatLayer(module, scale, zero_point)
    quantized_class = get_default_static_quant_module_mappings().get(type(module))
    if quantized_class is None:
        raise ConfigError(
            f"qviz cannot rebuild a {type(module).__name__} layer live; keep its current config "
            "or set its dtype to 'float'"
        )
    qconfig = to_qconfig(config, backend)
    module.qconfig = qconfig
    if isinstance(module, nn.Sequential):
        module[0].qconfig = qconfig
    module.activation_post_process = FixedQParams(*output_qparams)
    return quantized_class.from_float(module)


def feeds_only_dequantize(quantized: nn.Module, layer: str) -> bool:
    """In an FX-converted graph: is the layer's output only ever dequantized (a model output)?"""
    graph = getattr(quantized, "graph", None)
    if graph is None:
        return False
    for node in graph.nodes:
        if node.op == "call_module" and node.target == layer:
            return all(u.op == "call_method" and u.target == "dequantize" for u in node.users)
    return False


def rebuild_static_layer(name: str, config: LayerConfig, calibration) -> nn.Module:
    """Layer ``name`` of an eager or FX session rebuilt under ``config`` (see :func:`build_layer`):
    output qparams as calibrated where the activation config is the one calibration ran, else
    computed from the recorded statistics; a float layer re-quantizes its output with the
    calibrated qparams unless only a dequantize reads it."""
    reference, initial = calibration.reference.get_submodule(name), calibration.initial
    record = output_record(calibration.records, name)
    record = record if record is not None and record.role == "output" else None  # a static scale to keep
    calibrated = record is not None and "scale" in initial.get(record.name, {})
    if config.dtype == "float" and (record is None or feeds_only_dequantize(calibration.quantized, name)):
        return build_layer(reference, config, calibration.backend, None)
    if calibrated and (config.dtype == "float" or same_activation(config, calibration.run_plan[name])):
        qparams = (float(initial[record.name]["scale"][0]), int(initial[record.name]["zero_point"][0]), torch.quint8)
    elif record is not None:
        qparams = activation_qparams(record.stats, config, calibration.backend)
    else:
        raise ConfigError(f"layer {name!r} has no recorded output statistics to rebuild it from")
    return build_layer(reference, config, calibration.backend, qparams)


def unwrapped(module: nn.Module) -> nn.Module:
    """The layer a :class:`FloatLayer` wraps, else ``module``."""
    return module.module if isinstance(module, FloatLayer) else module


def measured_inside(quantized: nn.Module, name: str) -> str:
    """A float layer is measured inside its wrapper, before its output is quantized again."""
    return f"{name}.module" if isinstance(quantized.get_submodule(name), FloatLayer) else name

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
from torch.ao.quantization import (
    FixedQParamsObserver,
    ReuseInputObserver,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from qviz.capture.stats import ActivationStats
from qviz.errors import ConfigError
from qviz.flows.torch_ao.fx import OP_OF_KIND
from qviz.flows.torch_ao.qconfigs import qconfig_mapping, to_qconfig
from qviz.plan import LayerConfig, Plan

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


def plan_qconfig_mapping(plan: Plan, functional: dict | None = None):
    """The plan as an FX ``QConfigMapping`` in which fused groups share their key's qconfig and
    the ops whose qparams the backend fixes or reuses (sigmoid, tanh, reshape, ...) keep them, as
    in ``get_default_qconfig_mapping``, so re-conversions build the first conversion's graph.

    ``functional`` (row name -> :class:`qviz.flows.torch_ao.fx.FunctionalOp`): a row named by its module
    (``"head"``) is that module, everything inside it, as for any module name; rows inside it
    get entries of their own. A row ``"block.linear#1"`` is that one call
    (``set_module_name_object_type_order``), not the other ops of ``block``."""
    mapping = qconfig_mapping(plan)
    if mapping.global_qconfig is not None:  # ops whose output qparams are fixed or reused, as
        for op, qconfig in get_default_qconfig_mapping(plan.backend).object_type_qconfigs.items():
            observer = getattr(qconfig.activation, "func", qconfig.activation)  # the backend's
            if observer in (FixedQParamsObserver, ReuseInputObserver):  # own mapping has them
                mapping.set_object_type(op, qconfig)
    named = dict(mapping.module_name_qconfigs)
    for group in plan.groups:
        if group[0] in named:
            for member in group[1:]:
                mapping.set_module_name(member, named[group[0]])
    default = mapping.global_qconfig
    for row, op in (functional or {}).items():
        if row != op.owner:  # "block.linear#1": that call alone
            qconfig = mapping.module_name_qconfigs.pop(row, default)
            mapping.set_module_name_object_type_order(op.owner, OP_OF_KIND[op.kind], op.index, qconfig)
    owners = [n for n in mapping.module_name_qconfigs if n in (functional or {})]
    for name in plan:  # a module row's qconfig reaches inside it: rows there keep their own
        if name not in mapping.module_name_qconfigs and any(name.startswith(f"{o}.") for o in owners):
            mapping.set_module_name(name, default)
    return mapping

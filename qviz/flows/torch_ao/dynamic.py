"""Dynamic quantization (``quantize_dynamic``) of Linear and RNN layers, int8 or float16.

There are no observers: activations are quantized per batch at run time. qviz still records
what each quantized layer's input looks like during the calibration pass (role "dynamic").

The layers it quantizes are ``DYNAMIC_TYPES``, exact types (a subclass with its own forward has
no dynamic kernel): torch's own ``quantize_dynamic`` default less the RNN cells, which run once
per time step, and the comparator pairs a layer's float and quantized outputs once per batch. Under
a plan every layer gets its qconfig by name, as its code (:meth:`DynamicFlow.plan_code`) writes it; a layer
changed by ``Session.apply`` is rebuilt alone from its float twin (:meth:`DynamicFlow.rebuild`).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

from qviz.errors import ConfigError, ModelError
from qviz.flows.base import Calibration, Flow, QuantPoint, check_backend, copy_sharing_parameters
from qviz.flows.torch_ao import codegen, qconfigs
from qviz.options import option
from qviz.plan import LayerConfig, Plan

DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
_DTYPES = {"int8": torch.qint8, "fp16": torch.float16}


class DynamicFlow(Flow):
    """``quantize_dynamic``: int8 or fp16 weights, activations quantized per batch at run time."""

    name = "dynamic"
    summary = "quantize_dynamic: Linear/LSTM weights"
    quantizes = "nn.Linear and nn.LSTM"
    session_options = {"dynamic_dtype": "dtype"}
    needs_calibration = False
    deprecated = True
    # the plan fields torch's dynamic qconfigs honour (see qconfigs.to_qconfig, flow "dynamic")
    editable = {"dtype": ("int8", "fp16", "float"), "weight": option("weight").choices}
    ladder = ("int8", "fp16", "float")  # search(): cheap to precise

    def __init__(self, backend: str = "x86", dtype: str | None = "int8", qconfig_spec=None):
        self.backend = check_backend(backend)
        dtype = "int8" if dtype is None else dtype
        if dtype not in _DTYPES:
            raise ConfigError(f"dynamic dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        self.qconfig_spec = qconfig_spec
        self.plan: Plan | None = None

    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        if not any(self._quantizes(n, m) for n, m in model.named_modules()):
            raise ModelError(self._nothing_to_quantize(model))
        return copy.deepcopy(model).eval()

    def _nothing_to_quantize(self, model: nn.Module) -> str:
        weighted = Counter(
            type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))
        )
        found = ", ".join(f"{k} x{v}" for k, v in weighted.items()) or "no layers with weights"
        if self.qconfig_spec is not None:
            return (f"the dynamic flow quantized nothing in {type(model).__name__}: its qconfig_spec "
                    f"names none of the model's layers (it has {found})")
        return (
            f"the dynamic flow quantized nothing in {type(model).__name__}: it quantizes "
            f"{'/'.join(t.__name__ for t in DYNAMIC_TYPES)} layers (weights int8 or fp16, activations "
            f"quantized at run time), and this model has none (it has {found}). Use flow='fx' or "
            "flow='eager' for static quantization of convolutions and other layers"
        )

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        return [
            QuantPoint(name, module, name, "dynamic")
            for name, module in observed.named_modules()
            if self._quantizes(name, module)
        ]

    def _quantizes(self, name: str, module: nn.Module) -> bool:
        if self.qconfig_spec is None:
            return type(module) in DYNAMIC_TYPES
        return name in self.qconfig_spec or type(module) in self.qconfig_spec

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return observed

    def find_layers(self, quantized: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
        """As :func:`qviz.analysis.compare.find_layers`, but only layers this flow could have
        quantized count as left float: convolutions, norms and embeddings were never candidates."""
        from qviz.flows.layers import find_layers

        layers, left_float = find_layers(quantized, reference)
        return layers, [n for n in left_float if self._quantizes(n, reference.get_submodule(n))]

    def convert(self, observed: nn.Module) -> nn.Module:
        """``quantize_dynamic`` in place on a copy of ``observed`` sharing its parameters (the
        quantized layers are new modules; the others keep the float tensors, held once)."""
        model = copy_sharing_parameters(observed)
        if self.plan is not None:
            candidates = {n: m for n, m in model.named_modules() if self._quantizes(n, m)}
            self.check_plan(self.plan, candidates)
            return tq.quantize_dynamic(model, self.qconfig_spec_of(self.plan), inplace=True)
        spec = self.qconfig_spec if self.qconfig_spec is not None else set(DYNAMIC_TYPES)
        return tq.quantize_dynamic(model, spec, dtype=self.dtype, inplace=True)

    # -- plans -------------------------------------------------------------------------------
    def default_plan(self, model: nn.Module, layers: list[str], left_float: list[str]) -> Plan:
        """What ``quantize_dynamic(model, dtype=...)`` ran: torch's default dynamic qconfig
        (per-tensor int8 weights) or float16, for every layer it quantized."""
        config = LayerConfig(dtype=self.dtype_name, weight="per_tensor")
        return Plan(self.backend, {n: LayerConfig(dtype="float") if n in left_float else config for n in layers})

    def check_plan(self, plan: Plan, modules: dict[str, nn.Module]) -> None:
        """Refuse what dynamic quantization cannot run (int4, static-only layers, fp16 off x86)."""
        qconfigs.check_plan(plan, modules, flow="dynamic")

    def qconfig_spec_of(self, plan: Plan) -> dict:
        """The plan as a ``quantize_dynamic`` qconfig_spec: every layer by name (float: None)."""
        return {n: qconfigs.to_qconfig(c, plan.backend, flow="dynamic") for n, c in plan.items()}

    def rebuild_layer(self, name: str, config: LayerConfig, calibration: Calibration) -> nn.Module:
        """One layer under ``config``, from its float twin (a copy; float keeps the float module)."""
        layer = copy.deepcopy(calibration.reference.get_submodule(name))
        if config.dtype == "float":
            return layer
        layer.qconfig = qconfigs.to_qconfig(config, self.backend, flow="dynamic")
        return get_default_dynamic_quant_module_mappings()[type(layer)].from_float(layer)

    @classmethod
    def plan_code(cls, plan: Plan, fixed_qparams=None) -> str:
        """Plain torch code: the ``qconfig_spec`` dict for ``quantize_dynamic``, every layer by name
        (``fixed_qparams`` is refused: activations are quantized at run time)."""
        return codegen.plan_code(plan, cls.name, fixed_qparams)

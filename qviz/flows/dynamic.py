"""Dynamic quantization (``quantize_dynamic``) of Linear and LSTM layers, int8 or float16.

There are no observers: activations are quantized per batch at run time. qviz still records
what each quantized layer's input looks like during the calibration pass (role "dynamic").
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao import quantization as tq

from qviz.errors import ConfigError
from qviz.flows.base import QuantPoint, check_backend

DYNAMIC_TYPES = (nn.Linear, nn.LSTM)
_DTYPES = {"int8": torch.qint8, "fp16": torch.float16}


class DynamicFlow:
    name = "dynamic"
    needs_calibration = False

    def __init__(self, backend: str = "x86", dtype: str = "int8", qconfig_spec=None):
        self.backend = check_backend(backend)
        if dtype not in _DTYPES:
            raise ConfigError(f"dynamic dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.qconfig_spec = qconfig_spec

    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        return copy.deepcopy(model).eval()

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        return [
            QuantPoint(name, module, name, "dynamic")
            for name, module in observed.named_modules()
            if self._quantizes(name, module)
        ]

    def _quantizes(self, name: str, module: nn.Module) -> bool:
        if self.qconfig_spec is None:
            return isinstance(module, DYNAMIC_TYPES)
        return name in self.qconfig_spec or type(module) in self.qconfig_spec

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return observed

    def convert(self, observed: nn.Module) -> nn.Module:
        spec = self.qconfig_spec if self.qconfig_spec is not None else set(DYNAMIC_TYPES)
        return tq.quantize_dynamic(copy.deepcopy(observed), spec, dtype=self.dtype)

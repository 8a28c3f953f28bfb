"""Quantization flows behind one protocol (:class:`qviz.flows.base.Flow`)."""

from __future__ import annotations

from qviz.errors import ConfigError
from qviz.flows.base import BACKENDS, Flow, QuantPoint, quantized_engine
from qviz.flows.pt2e.flow import Pt2eFlow
from qviz.flows.torch_ao.dynamic import DynamicFlow
from qviz.flows.torch_ao.eager import EagerFlow
from qviz.flows.torch_ao.fx import FxFlow
from qviz.flows.torchao.flow import TorchaoFlow

FLOWS = {
    "eager": EagerFlow,
    "fx": FxFlow,
    "dynamic": DynamicFlow,
    "torchao": TorchaoFlow,
    "pt2e": Pt2eFlow,
}
TORCH_AO_FLOWS = ("eager", "fx", "dynamic")  # the deprecated torch.ao.quantization flows

__all__ = ["BACKENDS", "FLOWS", "Flow", "QuantPoint", "TORCH_AO_FLOWS", "make_flow", "quantized_engine"]


def make_flow(name: str, backend: str, **options) -> Flow:
    """The flow called ``name``, configured with the options it accepts."""
    if name not in FLOWS:
        raise ConfigError(f"unknown flow {name!r}: choose one of {', '.join(FLOWS)}")
    return FLOWS[name](backend, **{k: v for k, v in options.items() if v is not None})

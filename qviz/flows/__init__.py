"""Quantization flows behind one protocol (:class:`qviz.flows.base.Flow`)."""

from __future__ import annotations

from qviz.errors import ConfigError
from qviz.flows.base import BACKENDS, Flow, QuantPoint, quantized_engine
from qviz.flows.dynamic import DynamicFlow
from qviz.flows.eager import EagerFlow
from qviz.flows.fx import FxFlow

FLOWS = {"eager": EagerFlow, "fx": FxFlow, "dynamic": DynamicFlow}
PLANNED_FLOWS = ("pt2e", "torchao")

__all__ = ["BACKENDS", "FLOWS", "Flow", "QuantPoint", "make_flow", "quantized_engine"]


def make_flow(name: str, backend: str, **options) -> Flow:
    """The flow called ``name``, configured with the options it accepts."""
    if name in PLANNED_FLOWS:
        raise ConfigError(
            f"flow={name!r} is not available in this version of qviz yet: use 'fx' or 'eager'"
        )
    if name not in FLOWS:
        raise ConfigError(f"unknown flow {name!r}: choose one of {', '.join(FLOWS)}")
    return FLOWS[name](backend, **{k: v for k, v in options.items() if v is not None})

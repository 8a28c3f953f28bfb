"""What every flow shares: the flow protocol, quantization points found by duck typing, backends.

A flow turns the user's float model into three models that qviz works with:

- ``observed``: a deep copy prepared for quantization (observers / fake-quants inserted, fused);
  calibration runs through it while probes record every quantization point.
- ``reference``: the float model fused exactly like ``observed`` but with every quantization
  point made a no-op, so float-vs-quantized errors compare like with like.
- ``quantized``: the converted model.

Layers are named as the float model's ``named_modules()`` spells them (a fused group by its first
module), and the three models keep those names, so capture and analysis never need to know which
flow produced them. New flows (PT2E, torchao) implement :class:`Flow` and register themselves.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from qviz.errors import ConfigError

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


@dataclass(frozen=True)
class QuantPoint:
    """One observer or fake-quant: where it sits in ``observed`` and which layer it serves.

    ``role`` is "output" (observes the output of ``layer``), "input" (the model input), "weight"
    (a weight fake-quant/observer of ``layer``) or "dynamic" (the input of a dynamically
    quantized layer, recorded for information: its qparams are computed per batch at run time).
    """

    name: str
    module: nn.Module
    layer: str
    role: str
    origin: str = ""  # where it sits in the user's code, for error messages (FX: op, module, line)
    leave_float: str = ""  # the QConfigMapping call that leaves its op float (FX)


def is_quant_point(module: nn.Module) -> bool:
    """Observers and fake-quants of torch.ao and torchao alike, recognised by what they carry."""
    if not hasattr(module, "calculate_qparams"):
        return False
    carried = ("min_val", "scale", "activation_post_process", "histogram")
    return any(hasattr(module, attr) for attr in carried)


def is_fake_quant(module: nn.Module) -> bool:
    return hasattr(module, "fake_quant_enabled") and hasattr(module, "observer_enabled")


class Flow(Protocol):
    """The steps qviz needs from a quantization flow (eager, FX, dynamic, ...)."""

    name: str
    backend: str
    needs_calibration: bool

    def prepare(self, model: nn.Module, example_inputs: Any) -> nn.Module:
        """``example_inputs`` is a batch (see :func:`split_batch`): a mapping where the user's
        batches are keyword inputs (:func:`positional` for APIs that take a tuple)."""

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]: ...

    def reference(self, observed: nn.Module) -> nn.Module: ...

    def convert(self, observed: nn.Module) -> nn.Module: ...


def neutral_reference(observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
    """A copy of ``observed`` computing in float: observers become Identity, fake-quants are off."""
    names = {p.name for p in points}
    ref = copy.deepcopy(observed)
    for name, module in list(ref.named_modules()):
        if name not in names:
            continue
        if is_fake_quant(module):
            module.fake_quant_enabled.fill_(0)
            module.observer_enabled.fill_(0)
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent_name), attr, nn.Identity())
    return ref.eval()


def copy_sharing_parameters(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s modules that shares its parameter tensors, for a convert that
    replaces the weights of the layers it quantizes (new modules or new weight objects) and
    leaves the other parameters as they are: the embeddings, norms and float layers of a large
    model then exist once, not once per model (``model`` is the flow's own copy, never the user's)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"backend {backend!r} is not built into this torch "
            f"(it has {', '.join(torch.backends.quantized.supported_engines)}): pick one of those"
        )
    return backend


@contextlib.contextmanager
def quantized_engine(backend: str):
    """Run quantized kernels of ``backend``; restore the engine that was set before."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def parent_layer(point_name: str) -> tuple[str, str]:
    """'block.conv.activation_post_process' -> ('block.conv', 'activation_post_process')."""
    parent, _, attr = point_name.rpartition(".")
    return parent, attr


def role_of_attribute(attr: str) -> str | None:
    """Eager and QAT modules keep their quantization points in attributes with fixed names."""
    if attr == "activation_post_process":
        return "output"
    if attr == "weight_fake_quant":
        return "weight"
    return None


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """A batch as (positional inputs, keyword inputs): a tensor is the one positional input, a
    tuple or list holds positional inputs, a mapping (a dict, a Hugging Face ``BatchEncoding``)
    holds keyword inputs, as ``model(**batch)`` takes them. Tensors are passed as they are."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call_model(model: nn.Module, batch: Any):
    """``model(*args, **kwargs)`` of one batch (see :func:`split_batch`)."""
    args, kwargs = split_batch(batch)
    return model(*args, **kwargs)


def positional(model: nn.Module, batch: Any) -> tuple:
    """The batch as positional inputs of ``model.forward`` in signature order, defaults filled in:
    for APIs that take positional inputs only (``prepare_fx``'s example inputs, an FX
    ``Interpreter``). TypeError where the batch does not fit the signature."""
    args, kwargs = split_batch(batch)
    if not kwargs:
        return args
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    inputs = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            inputs.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD and value:
            raise TypeError(f"{type(model).__name__}.forward takes {', '.join(value)} as **kwargs: "
                            "they have no position")
        elif kind is not inspect.Parameter.VAR_KEYWORD:
            inputs.append(value)
    return tuple(inputs)

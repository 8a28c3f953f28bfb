"""What every flow shares: the flow protocol, quantization points found by duck typing, backends.

A flow turns the user's float model into three models that qviz works with:

- ``observed``: a deep copy prepared for quantization (observers / fake-quants inserted, fused);
  calibration runs through it while probes record every quantization point.
- ``reference``: the float model fused exactly like ``observed`` but with every quantization
  point made a no-op, so float-vs-quantized errors compare like with like.
- ``quantized``: the converted model.

Layers are named as the float model's ``named_modules()`` spells them (a fused group by its first
module), and the three models keep those names, so capture and analysis never need to know which
flow produced them. Every flow subclasses :class:`Flow` and is found through
:mod:`qviz.flows.registry`.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from qviz.errors import ConfigError
from qviz.flows.layers import find_layers, is_fake_quant
from qviz.options import SEARCH_LADDER

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


@dataclass
class Calibration:
    """What a session's run left that a flow needs to re-convert layers without calibrating
    again: the models, the plan in force and the one calibration ran under, every point's
    record and its qparams at calibration, the batches, and ``run_batch(model, batch, index)``
    (the session's model call, with its error messages). Dicts are the session's own."""

    model: nn.Module  # the user's float model: never modified
    reference: nn.Module
    quantized: nn.Module
    plan: Any  # qviz.plan.Plan in force
    run_plan: Any  # the Plan the calibrated model was prepared under
    records: dict  # point name -> PointRecord
    initial: dict  # point name -> its arrays (scale, zero_point, ...) at calibration
    calib: list
    example: Any
    backend: str
    run_batch: Callable


@dataclass
class Reconversion:
    """A flow's answer to a plan change: the new quantized model, and the modules it swapped
    into the session's live quantized model (name -> the module that was there), which the
    session swaps back if anything fails before it commits."""

    quantized: nn.Module
    swapped: dict[str, nn.Module] = field(default_factory=dict)


class Flow(abc.ABC):
    """A quantization flow: how qviz prepares, calibrates, converts and edits a model with it.

    Subclass it, set the class attributes, implement the four abstract steps and whatever of
    the editing methods the flow supports, then :func:`qviz.flows.registry.register_flow` it
    (or declare it in the ``qviz.flows`` entry point group). The Session calls only what is
    declared here; nothing outside a flow's package knows its name.
    """

    #: the name users pass as ``Session(flow=...)`` and ``qviz demo --flow``
    name: ClassVar[str]
    #: a few words for help texts (``qviz demo --help``)
    summary: ClassVar[str] = ""
    #: what it quantizes, for the message of a model where it found nothing to quantize
    quantizes: ClassVar[str] = "layers with weights"
    #: ``Session`` keyword arguments it takes, as {session keyword: constructor keyword}
    session_options: ClassVar[Mapping[str, str]] = {}
    #: whether calibration batches set its qparams (False: weight-only or dynamic)
    needs_calibration: ClassVar[bool] = True
    #: built on the deprecated torch.ao.quantization (the session says so once)
    deprecated: ClassVar[bool] = False
    #: the plan fields it honours with their allowed values (None: any); None: every field
    editable: ClassVar[Mapping[str, tuple | None] | None] = None
    #: the dtypes the mixed-precision search tries, cheap to precise
    ladder: ClassVar[tuple[str, ...]] = SEARCH_LADDER
    #: whether :meth:`reconvert` can edit layers live (Session.apply, the editor, search)
    can_edit: ClassVar[bool] = True
    #: how a sensitivity sweep builds each variant: "module swap" (one layer's module swapped
    #: between the float and quantized models) or "re-conversion" (:meth:`reconvert` per variant,
    #: for flows whose converted model has no layer modules, such as graphs)
    sensitivity_by: ClassVar[str] = "module swap"
    #: whether the first conversion can leave a plan's float layers float by itself; if not,
    #: the session runs them quantized and applies the float layers right after
    converts_float_layers: ClassVar[bool] = True

    backend: str
    plan: Any = None  # the Plan driving the next prepare (see use_plan)
    handed_over: bool = False  # the user gave a model this flow had prepared already

    # -- the run ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, model: nn.Module, example_inputs: Any) -> nn.Module:
        """A prepared copy of ``model`` (never the model itself). ``example_inputs`` is a batch
        (see :func:`split_batch`); :func:`positional` gives it as a tuple. A model the flow had
        prepared already (the user's QAT model) is taken as it is, with ``handed_over`` set."""

    @abc.abstractmethod
    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        """Every observer / fake-quant of ``observed``, with the layer each serves."""

    @abc.abstractmethod
    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        """``observed`` computing in float, fused and named like it (see :func:`neutral_reference`)."""

    @abc.abstractmethod
    def convert(self, observed: nn.Module) -> nn.Module:
        """The quantized model, layers named as in ``reference``."""

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        """Whether ``model`` was prepared by this flow already (a QAT model the user trained):
        :meth:`prepare` then takes it as it is (``handed_over``) and a QAT session picks this flow."""
        return False

    def find_layers(self, quantized: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
        """(quantized layers, layers with weights left float), in execution order."""
        return find_layers(quantized, reference)

    @property
    def meta(self) -> dict:
        """Options saved with the results (a plan's code needs them, see :meth:`plan_code`)."""
        return {}

    @property
    def owns_configs(self) -> bool:
        """Whether qviz chose the configs (the plan), so it may change them; False where the user
        passed their own qconfigs, quantizer or prepared model."""
        return not self.handed_over

    # -- the plan --------------------------------------------------------------------------------
    def use_plan(self, plan) -> None:
        """Drive the next prepare and convert by ``plan`` (a qviz.Plan)."""
        self.plan = plan

    @abc.abstractmethod
    def default_plan(self, model: nn.Module, layers: list[str], left_float: list[str]):
        """The Plan describing what the flow did without one (layers in execution order)."""

    @abc.abstractmethod
    def check_plan(self, plan, modules: Mapping[str, nn.Module]) -> None:
        """Raise ConfigError naming what of ``plan`` this flow and backend cannot run on
        ``modules`` (layer name -> float module) and what to choose instead."""

    @classmethod
    def plan_code(cls, plan, **options) -> str:
        """Plain torch code that quantizes a model as ``plan`` says, without qviz; ``options``
        are the flow's :attr:`meta`."""
        raise ConfigError(f"flow {cls.name!r} cannot write a plan as code")

    # -- live editing ----------------------------------------------------------------------------
    def reconvert(self, target, changed: list[str], calibration: Calibration) -> Reconversion:
        """The quantized model under plan ``target`` (``changed``: its layers that differ from
        the plan in force), qparams from the recorded statistics, no calibration pass where
        possible. The default swaps each changed layer's module for :meth:`rebuild_layer`'s."""
        quantized, swapped = calibration.quantized, {}
        try:
            for name in changed:
                module = self.rebuild_layer(name, target[name], calibration)
                swapped[name] = swap_module(quantized, name, module)
        except BaseException:
            for name, module in swapped.items():
                swap_module(quantized, name, module)
            raise
        return Reconversion(quantized, swapped)

    def rebuild_layer(self, name: str, config, calibration: Calibration) -> nn.Module:
        """Layer ``name`` converted under ``config`` (a LayerConfig), for :meth:`reconvert`."""
        raise ConfigError(f"flow {self.name!r} cannot rebuild one layer: it re-converts the whole model")

    def measured_module(self, quantized: nn.Module, name: str) -> str:
        """Where in ``quantized`` layer ``name``'s output is measured (a layer a flow wrapped to
        keep it float is measured inside the wrapper)."""
        return name

    def layer_type(self, quantized_layer: nn.Module, float_layer: nn.Module | None) -> str:
        """The layer's class name as the user knows it: what a module a flow made for it declares
        (``layer_type``: "F.linear", a graph tap's module class), the float model's where the
        converted model holds a bare ``nn.Module`` (FX traced through the user's layer)."""
        declared = getattr(quantized_layer, "layer_type", None)
        if isinstance(declared, str):
            return declared
        if type(quantized_layer) is nn.Module and float_layer is not None:
            return type(float_layer).__name__
        return type(quantized_layer).__name__

    # -- weight groups ---------------------------------------------------------------------------
    def int4_groups(self, config, float_layer: nn.Module) -> tuple[bool, int | None]:
        """(whether this flow quantized the layer with int4 groups of its own, the group size int4
        has or would have here); see Session.weight_groups."""
        return False, None


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` inside ``model``; return the module that was there."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    old = getattr(owner, attr)
    setattr(owner, attr, module)
    return old


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

"""Eager-mode static quantization: QuantStub/DeQuantStub models, fuse_modules, prepare, convert.

Also takes models the user already prepared with ``prepare`` or ``prepare_qat`` (they carry
observers or fake-quants): those are converted as they are, after calibration through a copy.
Models the user fused already (``fuse_modules``: ConvReLU2d, LinearReLU, ...) keep their fused
modules; conv-bn modules fused for QAT (``fuse_modules_qat``: ConvBnReLU2d, ...) have their BN
folded as ``fuse_modules`` does in eval mode, since eager convert has no static kernel for them.
"""

from __future__ import annotations

import copy
import re

from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.quantization.fuser_method_mappings import get_fuser_method

from qviz.errors import ConfigError, ModelError
from qviz.flows.base import (
    QuantPoint,
    check_backend,
    neutral_reference,
    parent_layer,
    role_of_attribute,
)
from qviz.flows.layers import is_quant_point
from qviz.flows.torch_ao import codegen, qconfigs
from qviz.flows.torch_ao.static import BN, StaticFlow, detect_fusion_groups

_NO_KERNEL = re.compile(r"Could not run '(aten::[\w.]+)' with arguments from the 'Quantized\w*' backend")
_FLOAT_FUNCTIONAL_OPS = ("add", "mul", "cat", "matmul")  # what FloatFunctional has quantized versions of


def is_prepared(model: nn.Module) -> bool:
    """True when the model already carries observers or fake-quants (prepare / prepare_qat)."""
    return any(is_quant_point(m) for m in model.modules())


def fold_fused_bn(model: nn.Module) -> None:
    """Fold the BN of conv-bn / linear-bn modules fused for QAT (ConvBnReLU2d, ...) in place, as
    ``fuse_modules`` does in eval mode (ConvBnReLU2d -> ConvReLU2d).

    Eager ``convert`` has static kernels for ConvReLU2d, not for ConvBnReLU2d (which it leaves
    float, and which then fails on a quantized input); the folded module computes the same."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _FusedModule) and any(isinstance(c, BN) for c in module.children()):
            members = list(module.children())
            try:
                fuser = get_fuser_method(tuple(type(c) for c in members))
            except AssertionError:
                continue  # a fused type torch has no eval-mode fold for: left as it is
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, fuser(False, *members))


class EagerFlow(StaticFlow):
    """Static PTQ in eager mode, or conversion of a model the user prepared (QAT included)."""

    name = "eager"
    summary = "QuantStub/DeQuantStub, fuse_modules, prepare, convert"
    quantizes = "nn.Linear and nn.Conv1d/2d/3d between a QuantStub and a DeQuantStub"
    session_options = {"qconfig": "qconfig", "fuse": "fuse"}
    converts_float_layers = False  # a float layer needs stubs around it: the session applies it after

    def __init__(self, backend: str = "x86", qconfig=None, fuse="auto", module_qconfigs=None):
        self.backend = check_backend(backend)
        self.module_qconfigs = module_qconfigs or {}  # layer name -> qconfig, from a Plan
        self.user_qconfig = qconfig
        self.qconfig = qconfig if qconfig is not None else tq.get_default_qconfig(backend)
        if fuse != "auto" and not (
            isinstance(fuse, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in fuse)
        ):
            raise ConfigError(
                f"fuse must be 'auto' or a list of module-name lists such as "
                f"[['conv1', 'bn1', 'relu1']], got {fuse!r}"
            )
        self.fuse = fuse

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return is_prepared(model)

    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        if self.recognises(model):
            self.handed_over = True
            return copy.deepcopy(model).eval()
        if not any(isinstance(m, tq.QuantStub) for m in model.modules()):
            raise ModelError(
                f"{type(model).__name__} has no QuantStub, which eager mode needs to know where "
                "quantized computation starts: add QuantStub/DeQuantStub to the model, wrap it "
                "as torch.ao.quantization.QuantWrapper(model), or use flow='fx'"
            )
        observed = copy.deepcopy(model).eval()
        fold_fused_bn(observed)
        groups = detect_fusion_groups(observed) if self.fuse == "auto" else self.fuse
        if groups:
            try:
                tq.fuse_modules(observed, [list(g) for g in groups], inplace=True)
            except (AssertionError, AttributeError, KeyError) as exc:
                raise ConfigError(
                    f"could not fuse {groups}: {exc}. Each group must name existing modules in "
                    "an order fuse_modules supports (conv-bn, conv-bn-relu, conv-relu, linear-relu)"
                ) from exc
        observed.qconfig = self.qconfig
        for name, qconfig in self.module_qconfigs.items():
            observed.get_submodule(name).qconfig = qconfig
        tq.prepare(observed, inplace=True)
        return observed

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        points = []
        for name, module in observed.named_modules():
            if is_quant_point(module) and not is_quant_point_child(observed, name):
                layer, attr = parent_layer(name)
                points.append(QuantPoint(name, module, layer, role_of_attribute(attr) or "output"))
        return points

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return neutral_reference(observed, points)

    def convert(self, observed: nn.Module) -> nn.Module:
        return tq.convert(copy.deepcopy(observed).eval(), inplace=False)

    @property
    def owns_configs(self) -> bool:
        return self.user_qconfig is None and not self.handed_over

    def use_plan(self, plan) -> None:
        """Each quantized layer of ``plan`` gets its qconfig by module name."""
        self.plan = plan
        self.module_qconfigs = {n: qconfigs.to_qconfig(c, self.backend) for n, c in plan.items() if c.dtype != "float"}

    def check_plan(self, plan, modules) -> None:
        qconfigs.check_plan(plan, modules)

    @classmethod
    def plan_code(cls, plan, fixed_qparams=None) -> str:
        """Plain torch code: ``apply_qconfigs(model)`` setting each planned module's ``.qconfig``
        by name; ``fixed_qparams`` ({layer: (scale, zero_point)}) pins percentile layers."""
        return codegen.plan_code(plan, cls.name, fixed_qparams)


def is_quant_point_child(model: nn.Module, name: str) -> bool:
    """The observer inside a fake-quant is part of that fake-quant, not a point of its own."""
    parent, _ = parent_layer(name)
    return bool(parent) and is_quant_point(model.get_submodule(parent))


def unsupported_op_advice(exc: BaseException, module: str | None = None, backend: str = "x86") -> str | None:
    """What happened and what to do when an eager-converted model ran an op that has no kernel
    for quantized tensors (``out += identity``: ``aten::add.out``; a BatchNorm subclass eager
    convert does not swap: ``aten::native_batch_norm``); None for any other failure.

    ``module`` is the module whose forward failed, if known. Eager mode runs forward() as
    written: tensor arithmetic on quantized tensors needs FloatFunctional, other float code
    needs DeQuantStub/QuantStub around it, and FX inserts both itself."""
    found = _NO_KERNEL.search(str(exc))
    if found is None:
        return None
    op = found.group(1)
    where = f" in {module!r}" if module else ""
    said = (f"the eager-mode quantized model ran {op}{where} on a quantized tensor, and backend "
            f"{backend!r} has no quantized kernel for it (eager mode runs forward() as written; "
            "only the modules convert swapped compute on quantized tensors)")
    if op.split("::")[1].split(".")[0].rstrip("_") in _FLOAT_FUNCTIONAL_OPS:
        fix = ("replace that tensor arithmetic (`out += identity`, `x * y`, `torch.cat`) with a "
               "torch.ao.nn.quantized.FloatFunctional module (self.skip_add = FloatFunctional() in "
               "__init__, out = self.skip_add.add(out, identity) in forward), ")
    else:
        fix = ""
    return (f"{said}. Fix: {fix}leave that code float (a DeQuantStub before it and a QuantStub after "
            "it, and qconfig None on its modules), or use flow='fx', which quantizes such ops or "
            "dequantizes around them for you")

"""A plan in torch.ao's terms: qconfigs, the QConfigMapping, and what each backend's kernels run.

:func:`to_qconfig` turns one :class:`qviz.plan.LayerConfig` into a torch ``QConfig`` and
:func:`qconfig_mapping` a whole plan into a ``QConfigMapping``, for the eager, FX and dynamic
flows; :func:`plan_specs` describes the same qconfigs as data, which
:mod:`qviz.flows.torch_ao.codegen` prints as code, so the code cannot drift from what qviz builds
in process. :func:`supported` / :func:`check_plan` say which choices a backend's kernels really run
(checked against torch 2.13: conversions that crash, silently stay float, or give wrong numbers
are refused). ``flow`` is "static" (eager or FX; "fx" and "eager" work too) or "dynamic".
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import nn

from qviz.errors import ConfigError
from qviz.options import FORMAT_DTYPES, choices_text
from qviz.plan import LayerConfig, Plan, default_layer_config, known_backend

_FLOW_ALIASES = {"static": "static", "fx": "static", "eager": "static", "dynamic": "dynamic"}
INT4_WEIGHT_RANGE = (-8, 7)  # qint8 restricted to 4 bits
INT4_ACT_RANGE = (0, 15)  # quint8 restricted to 4 bits


def static_or_dynamic(flow) -> str:
    """"static" or "dynamic" for a flow name ("fx", "eager", "static", "dynamic")."""
    if isinstance(flow, str) and flow in _FLOW_ALIASES:
        return _FLOW_ALIASES[flow]
    raise ConfigError(f"flow {flow!r} is not valid; choose one of {choices_text(_FLOW_ALIASES)}")


# --------------------------------------------------------------------------- qconfig specs


def _source(value) -> str:
    if isinstance(value, (torch.dtype, torch.qscheme)):
        return str(value)  # "torch.quint8", "torch.per_tensor_affine"
    return repr(value)


@dataclass(frozen=True)
class ObserverSpec:
    cls: type
    kwargs: tuple[tuple[str, Any], ...]

    def build(self):
        return self.cls.with_args(**dict(self.kwargs))

    def source(self, indent: str) -> str:
        args = [f"{k}={_source(v)}" for k, v in self.kwargs]
        line = f"{self.cls.__name__}.with_args({', '.join(args)})"
        if len(indent) + len(line) <= 90:
            return line
        inner = "".join(f"{indent}    {a},\n" for a in args)
        return f"{self.cls.__name__}.with_args(\n{inner}{indent})"


@dataclass(frozen=True)
class QConfigSpec:
    activation: ObserverSpec
    weight: ObserverSpec

    def build(self):
        return tq.QConfig(activation=self.activation.build(), weight=self.weight.build())


@dataclass(frozen=True)
class NamedQConfig:
    """One of torch's own qconfig constants, e.g. ``float16_dynamic_qconfig``."""

    name: str

    def build(self):
        return getattr(tq, self.name)


def activation_range(config: LayerConfig) -> tuple[int, int]:
    if config.simulated:
        return INT4_ACT_RANGE
    return (0, 127) if config.reduce_range else (0, 255)


def _activation_spec(config: LayerConfig, fixed: tuple[float, int] | None) -> ObserverSpec:
    if fixed is not None:
        lo, hi = activation_range(config)
        return ObserverSpec(
            tq.FixedQParamsObserver,
            (
                ("scale", fixed[0]),
                ("zero_point", fixed[1]),
                ("dtype", torch.quint8),
                ("quant_min", lo),
                ("quant_max", hi),
            ),
        )
    cls = {
        "minmax": tq.MinMaxObserver,
        # qviz overwrites this observer's min_val/max_val with the percentile clip it
        # computes from its recorded histogram, after calibration and before convert.
        "percentile": tq.MinMaxObserver,
        "moving_average": tq.MovingAverageMinMaxObserver,
        "histogram": tq.HistogramObserver,
    }[config.activation]
    qscheme = torch.per_tensor_symmetric if config.activation_symmetric else torch.per_tensor_affine
    kwargs: tuple[tuple[str, Any], ...] = (("dtype", torch.quint8), ("qscheme", qscheme))
    if config.simulated:
        kwargs += (("quant_min", INT4_ACT_RANGE[0]), ("quant_max", INT4_ACT_RANGE[1]))
    else:
        kwargs += (("reduce_range", config.reduce_range),)
    return ObserverSpec(cls, kwargs)


def _weight_spec(config: LayerConfig) -> ObserverSpec:
    if config.weight == "per_channel":
        cls = tq.PerChannelMinMaxObserver
        qscheme = (
            torch.per_channel_symmetric if config.weight_symmetric else torch.per_channel_affine
        )
    else:
        cls = tq.MinMaxObserver
        qscheme = torch.per_tensor_symmetric if config.weight_symmetric else torch.per_tensor_affine
    kwargs: tuple[tuple[str, Any], ...] = (("dtype", torch.qint8), ("qscheme", qscheme))
    if config.simulated:
        kwargs += (("quant_min", INT4_WEIGHT_RANGE[0]), ("quant_max", INT4_WEIGHT_RANGE[1]))
    return ObserverSpec(cls, kwargs)


def _check_not_format(config: LayerConfig, flow: str) -> None:
    """Refuse a torchao number format in a torch.ao flow ("static" or "dynamic")."""
    if config.dtype in FORMAT_DTYPES:
        raise ConfigError(
            f"dtype {config.dtype!r} is a torchao number format: it runs with flow 'torchao' only "
            f"(Session(..., flow='torchao')); {flow} torch.ao quantization takes dtype "
            + ("'int8', 'fp16' or 'float'" if flow == "dynamic" else "'int8', 'int4', 'fp16' or 'float'")
        )


def qconfig_spec(config: LayerConfig, flow: str, fixed: tuple[float, int] | None = None):
    """The spec of ``config``'s qconfig for flow "static" or "dynamic" (None: stays float)."""
    if config.dtype == "float":
        return None
    _check_not_format(config, flow)
    if flow == "dynamic":
        if config.dtype == "fp16":
            return NamedQConfig("float16_dynamic_qconfig")
        if config.dtype == "int4":
            raise ConfigError(
                "dtype 'int4' is not available with flow 'dynamic': torch's dynamic kernels "
                "are int8 and fp16 only; use dtype 'int8', 'fp16' or 'float', or a static flow"
            )
        if config.weight == "per_channel":
            return NamedQConfig("per_channel_dynamic_qconfig")
        return NamedQConfig("default_dynamic_qconfig")
    if config.dtype == "fp16":
        return NamedQConfig("float16_static_qconfig")
    return QConfigSpec(_activation_spec(config, fixed), _weight_spec(config))


def to_qconfig(config: LayerConfig, backend: str, *, flow: str = "static"):
    """The torch ``QConfig`` (or None for float) that builds ``config`` on ``backend``.

    ``flow`` is "static" (eager or FX post-training quantization; "fx"/"eager" work too)
    or "dynamic". int8/int4 static use the observers the fields name; for activation
    "percentile" that is a MinMaxObserver whose min_val/max_val qviz overwrites with the
    percentile clip before convert. fp16 maps to torch's float16 qconfigs. This does not
    check that the backend has kernels for it: see :func:`supported`.
    """
    known_backend(backend)
    spec = qconfig_spec(config, static_or_dynamic(flow))
    return None if spec is None else spec.build()


# --------------------------------------------------------------------------- backend support

_STATIC_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FUSED_NAME = re.compile(r"(Conv|Linear)\D*?([123])?d?$")


def _layer_class(layer_type) -> type:
    """The weighted layer class behind a module class or instance, fused ones included."""
    from torch.ao.nn.intrinsic import _FusedModule

    if isinstance(layer_type, _FusedModule):
        return type(layer_type[0])
    if isinstance(layer_type, nn.Module):
        return type(layer_type)
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ConfigError(
            f"layer_type must be a torch.nn.Module class or instance, not {layer_type!r}"
        )
    if issubclass(layer_type, _FusedModule):  # nni.ConvReLU2d -> nn.Conv2d, ...
        m = _FUSED_NAME.match(layer_type.__name__)
        if m and m.group(1) == "Linear":
            return nn.Linear
        if m and m.group(2):
            return getattr(nn, f"Conv{m.group(2)}d")
    return layer_type


def supported(config: LayerConfig, backend: str, layer_type, *, flow: str = "static") -> None:
    """Return None if ``backend`` really runs ``config`` on ``layer_type``, else raise ConfigError.

    ``layer_type`` is a module class or instance (fused modules count as their first
    member). The refusals come from running torch 2.13's kernels, not from documentation:
    fp16 static stays float (FX) or crashes (eager); onednn needs symmetric weights and its
    ConvTranspose gives wrong results, as does qnnpack's ConvTranspose3d; ConvTranspose
    takes per-tensor weights only; dynamic covers Linear/RNN layers, fp16 on x86/fbgemm only.
    torchao's number formats (float8, MX, NVFP4) are for flow "torchao" only.
    """
    known_backend(backend)
    flow = static_or_dynamic(flow)
    cls = _layer_class(layer_type)
    if config.dtype == "float":
        return None
    _check_not_format(config, flow)
    name = cls.__name__
    if flow == "dynamic":
        qconfig_spec(config, flow)  # int4 -> ConfigError
        if not issubclass(cls, _DYNAMIC_LAYERS):
            raise ConfigError(
                f"dynamic quantization covers {_names(_DYNAMIC_LAYERS)} layers, not {name}; "
                "set this layer's dtype to 'float' or use a static flow"
            )
        if config.dtype == "fp16" and backend not in ("x86", "fbgemm"):
            raise ConfigError(
                f"backend {backend!r} has no fp16 kernels (dynamic fp16 runs on 'x86' and "
                "'fbgemm' only); use dtype 'int8' or 'float' on this backend"
            )
        return None
    if config.dtype == "int4" and config.group_size is not None:
        raise ConfigError(
            f"group_size {config.group_size} applies to flow 'torchao' only: static int4 has one weight "
            "scale per output channel or tensor; set group_size=None, or use flow='torchao'"
        )
    if config.dtype == "fp16":
        raise ConfigError(
            f"dtype 'fp16' is not available for static quantization on backend {backend!r}: "
            "torch runs fp16 only as dynamic quantization of Linear/RNN layers on 'x86' and "
            "'fbgemm' (flow 'dynamic'); for static flows use dtype 'int8', 'int4' or 'float'"
        )
    if not issubclass(cls, _STATIC_LAYERS):
        raise ConfigError(
            f"qviz quantizes {_names(_STATIC_LAYERS)} layers in static flows, not {name}; "
            "set this layer's dtype to 'float'"
        )
    if backend == "onednn" and not config.weight_symmetric:
        raise ConfigError(
            "backend 'onednn' supports weight_symmetric=True only (its kernels need weight "
            "zero point 0); set weight_symmetric=True or use backend 'x86', 'fbgemm' or 'qnnpack'"
        )
    if issubclass(cls, _CONV_TRANSPOSE):
        if config.weight == "per_channel":
            raise ConfigError(
                f"{name} supports weight='per_tensor' only (torch has no per-channel "
                "ConvTranspose); set weight='per_tensor'"
            )
        is_3d = issubclass(cls, nn.ConvTranspose3d)
        if backend == "onednn" or (backend == "qnnpack" and is_3d):
            ok = ("x86", "fbgemm") if is_3d else ("x86", "fbgemm", "qnnpack")
            raise ConfigError(
                f"backend {backend!r}'s quantized {name} gives wrong results in torch 2.13 "
                f"(checked by qviz); use backend {choices_text(ok)} or set this layer's dtype "
                "to 'float'"
            )
    return None


def _names(classes) -> str:
    return "/".join(c.__name__ for c in classes)



def _most_common(specs: list, preferred) -> Any:
    """The most frequent spec; a tie goes to ``preferred`` if it is among the tied, else to
    the tied spec seen first."""
    counts = Counter(specs)
    top = max(counts.values())
    if counts.get(preferred) == top:
        return preferred
    return next(s for s, n in counts.items() if n == top)



# --------------------------------------------------------------------------- whole plans


def check_plan(plan: Plan, layer_types: Mapping[str, Any], *, flow: str = "static") -> None:
    """Run :func:`supported` on every layer of ``plan`` found in ``layer_types`` (name -> module
    or class); raise one ConfigError listing every layer the backend cannot run."""
    problems = []
    for name, config in plan.layers.items():
        if name in layer_types:
            try:
                supported(config, plan.backend, layer_types[name], flow=flow)
            except ConfigError as exc:
                problems.append(f"layer {name!r}: {exc}")
    if problems:
        raise ConfigError(
            f"{len(problems)} layer(s) cannot run on backend {plan.backend!r}:\n" + "\n".join(problems)
        )


def plan_specs(plan: Plan, flow: str, fixed: Mapping[str, tuple[float, int]] | None = None):
    """(global spec, per-layer specs) of ``plan`` for flow "static" or "dynamic". The global is
    the most common layer spec (ties: the backend default), so the mapping stays short and ops
    outside the plan (add, cat...) follow the majority; ``fixed`` pins layers' activation qparams."""
    base, specs = {}, {}
    for name, config in plan.layers.items():
        try:
            base[name] = qconfig_spec(config, flow)
            specs[name] = qconfig_spec(config, flow, (fixed or {}).get(name))
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r}: {exc}") from None
    default = qconfig_spec(default_layer_config(plan.backend), flow)
    if not base:
        return default, specs
    return _most_common(list(base.values()), default), specs


def qconfig_mapping(plan: Plan, *, flow: str = "static"):
    """``plan`` as a torch ``QConfigMapping`` (global + ``set_module_name`` for each layer that
    differs); what :mod:`qviz.flows.torch_ao.codegen` prints, built in process."""
    glob, specs = plan_specs(plan, static_or_dynamic(flow))
    mapping = tq.QConfigMapping().set_global(None if glob is None else glob.build())
    for name, spec in specs.items():
        if spec != glob:
            mapping.set_module_name(name, None if spec is None else spec.build())
    return mapping


def check_fixed(plan: Plan, fixed, flow: str) -> dict[str, tuple[float, int]]:
    """``fixed`` ({layer: (scale, zero_point)}) checked against ``plan``, keyed by layer key:
    int8/int4 percentile layers only, zero points in their activation range; not for "dynamic"."""
    if not fixed:
        return {}
    if not isinstance(fixed, Mapping):
        raise ConfigError("fixed_qparams must map layer names to (scale, zero_point)")
    if flow == "dynamic":
        raise ConfigError(
            "fixed_qparams apply to flows 'fx' and 'eager' only: dynamic quantization "
            "computes activation qparams at run time"
        )
    out = {}
    for name, value in fixed.items():
        key = plan.resolve(name)
        config = plan.layers[key]
        if config.activation != "percentile" or config.dtype not in ("int8", "int4"):
            raise ConfigError(
                f"fixed_qparams[{name!r}]: only int8/int4 layers with activation "
                f"'percentile' take fixed qparams; {key!r} is {config.describe()}"
            )
        lo, hi = activation_range(config)
        ok = isinstance(value, (tuple, list)) and len(value) == 2
        scale, zp = value if ok else (None, None)
        ok = ok and isinstance(scale, numbers.Real) and not isinstance(scale, bool)
        ok = ok and math.isfinite(scale) and scale > 0
        ok = ok and isinstance(zp, numbers.Integral) and not isinstance(zp, bool)
        if not ok or not lo <= zp <= hi:
            raise ConfigError(
                f"fixed_qparams[{name!r}] must be (scale, zero_point) with a finite scale "
                f"> 0 and an integer zero_point in [{lo}, {hi}], not {value!r}"
            )
        out[key] = (float(scale), int(zp))
    return out

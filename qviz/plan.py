"""Per-layer quantization plans: which layer is quantized how, as torch qconfigs and as code.

A :class:`Plan` maps layer names to :class:`LayerConfig` choices for one backend. Flows
build torch qconfigs from it with :func:`to_qconfig` / :meth:`Plan.qconfig_mapping`;
:meth:`Plan.to_code` prints plain torch code that rebuilds the same qconfigs without qviz.
:func:`supported` says which choices a backend's kernels really run (checked against
torch 2.13: conversions that crash, silently stay float, or give wrong numbers are refused).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import nn

from qviz.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DTYPES",
    "FORMAT_DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHT_SCHEMES",
    "LayerConfig",
    "Plan",
    "UnknownLayerError",
    "default_layer_config",
    "supported",
    "to_qconfig",
]

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
#: torchao's number formats, for flow "torchao" only (qviz.flows.torchao.formats: configs, CPU simulation)
FORMAT_DTYPES = ("float8_e4m3fn", "float8_e5m2", "mxfp8", "mxfp4", "nvfp4")
DTYPES = ("int8", "int4", "fp16", "float", *FORMAT_DTYPES)
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
ACTIVATIONS = ("minmax", "moving_average", "histogram", "percentile")
#: torch's observer classes in the plan's words, so that the layer table, the editor and the
#: plan speak one vocabulary before and after an apply (other classes keep their own names).
OBSERVER_NAMES = {
    "MinMaxObserver": "minmax", "MovingAverageMinMaxObserver": "moving_average", "HistogramObserver": "histogram",
    "PerChannelMinMaxObserver": "minmax", "MovingAveragePerChannelMinMaxObserver": "moving_average",
}


def observer_name(class_name: str) -> str:
    """The plan's word for a torch observer class (``HistogramObserver`` -> ``histogram``)."""
    return OBSERVER_NAMES.get(class_name, class_name)
FORMAT_NAME = "qviz-plan"
FORMAT_VERSION = 1

_FLOW_ALIASES = {"static": "static", "fx": "static", "eager": "static", "dynamic": "dynamic"}
_CODE_FLOWS = ("fx", "eager", "dynamic")
_INT4_WEIGHT_RANGE = (-8, 7)  # qint8 restricted to 4 bits
_INT4_ACT_RANGE = (0, 15)  # quint8 restricted to 4 bits


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    """Refuse a value outside ``choices``, naming it, the valid ones and a close match."""
    if isinstance(value, str) and value in choices:
        return
    hint = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"{field} {value!r} is not valid{extra}; choose one of {_choices(choices)}")


def _check_backend(backend) -> None:
    if not (isinstance(backend, str) and backend in BACKENDS):
        _check_choice("backend", backend, BACKENDS)


def _static_or_dynamic(flow) -> str:
    if not (isinstance(flow, str) and flow in _FLOW_ALIASES):
        _check_choice("flow", flow, tuple(_FLOW_ALIASES))
    return _FLOW_ALIASES[flow]


# --------------------------------------------------------------------------- LayerConfig


@dataclass(frozen=True)
class LayerConfig:
    """How one layer (or fused group) is quantized. Immutable; invalid values raise ConfigError.

    - ``dtype``: "int8", "int4" (simulated, see :attr:`simulated`), "fp16", or "float"
      (left unquantized); with flow "torchao" also its number formats "float8_e4m3fn",
      "float8_e5m2", "mxfp8", "mxfp4" and "nvfp4" (see :mod:`qviz.flows.torchao.formats`).
    - ``weight``: "per_channel" or "per_tensor" weight scales; ``weight_symmetric``: zero
      point 0 (symmetric) or affine weights.
    - ``activation``: observer of the layer's output: "minmax", "moving_average",
      "histogram" or "percentile" (clip at ``percentile``, a float in (50, 100], computed
      by qviz from its recorded histogram; torch itself only sees a MinMaxObserver).
    - ``activation_symmetric``: symmetric quint8 activations (zero point 128).
    - ``reduce_range``: int8 activations use 7 bits (0..127). x86/fbgemm (and onednn on
      CPUs without VNNI) saturate 16-bit intermediate sums otherwise, which costs much
      accuracy. Ignored for int4, whose 4-bit products cannot overflow.
    - ``group_size``: input columns per int4 weight scale (flow "torchao" only; None: the
      flow's ``group_size``); a positive int dividing the layer's in_features, which the flow
      checks. Ignored for other dtypes.

    Fields other than ``dtype`` matter for int8/int4 only; the dynamic flow uses torch's
    stock dynamic qconfigs, so there only ``dtype`` and ``weight`` apply.
    """

    dtype: str = "int8"
    weight: str = "per_channel"
    weight_symmetric: bool = True
    activation: str = "histogram"
    percentile: float = 99.99
    activation_symmetric: bool = False
    reduce_range: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("weight", self.weight, WEIGHT_SCHEMES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("weight_symmetric", "activation_symmetric", "reduce_range"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, not {value!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 50 < p <= 100:
            raise ConfigError(f"percentile must be a number in (50, 100], like 99.99, not {p!r}")
        object.__setattr__(self, "percentile", float(p))
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, numbers.Integral) or g <= 0):
            raise ConfigError(f"group_size must be a positive int (e.g. 32, 64, 128) or None for the flow's, "
                              f"not {g!r}")
        if g is not None:
            object.__setattr__(self, "group_size", int(g))  # a numpy integer too: JSON needs an int
        if self.dtype == "int8" and self.activation_symmetric and self.reduce_range:
            raise ConfigError(
                "activation_symmetric=True cannot be combined with reduce_range=True for int8: "
                "torch cannot reduce the range of symmetric quint8 activations; set "
                "reduce_range=False or activation_symmetric=False"
            )

    @property
    def simulated(self) -> bool:
        """True for int4: torch.ao has no int4 conv/linear kernel, so qviz runs int8 kernels
        on the 4-bit range (weights qint8 -8..7, activations quint8 0..15).

        The int8 kernels clamp to 8 bits only: FX-lowered weights are not clamped to the
        observer's range (symmetric weights can reach +8) and outputs beyond the calibrated
        range exceed 15, so a faithful simulation needs clamping by the flow."""
        return self.dtype == "int4"

    def replace(self, **changes) -> LayerConfig:
        """A new, validated config with ``changes`` applied."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerConfig:
        """Build from a (possibly partial) dict; missing fields take their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a layer config must be a dict of fields, not {type(data).__name__}")
        _check_fields(data)
        return cls(**data)

    def describe(self) -> str:
        """A short human description, used in generated code and the UI."""
        if self.dtype == "float":
            return "float (left unquantized)"
        if self.dtype == "fp16":
            return "fp16"
        if self.dtype in FORMAT_DTYPES:
            return f"{self.dtype} (torchao number format)"
        sym = "symmetric" if self.weight_symmetric else "affine"
        act = self.activation
        if act == "percentile":
            act = f"percentile {self.percentile:g}"
        parts = [
            self.dtype + (" (simulated)" if self.simulated else ""),
            f"{self.weight.replace('_', '-')} {sym} weights",
            f"{act} activations",
        ]
        if self.activation_symmetric:
            parts.append("symmetric activations")
        if self.reduce_range and self.dtype == "int8":
            parts.append("reduce_range")
        if self.group_size is not None and self.dtype == "int4":
            parts.append(f"group_size {self.group_size}")
        return ", ".join(parts)


_FIELDS = tuple(f.name for f in dataclasses.fields(LayerConfig))


def _check_fields(data: Mapping) -> None:
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise ConfigError(
            f"unknown layer config field(s) {_choices(unknown)}; valid fields: {_choices(_FIELDS)}"
        )


_DEFAULT_CONFIGS = {
    # Mirrors torch.ao.quantization.get_default_qconfig(backend) (torch 2.13): histogram
    # activations everywhere; reduce_range on x86/fbgemm; per-tensor weights on qnnpack.
    "x86": LayerConfig(reduce_range=True),
    "fbgemm": LayerConfig(reduce_range=True),
    "qnnpack": LayerConfig(weight="per_tensor"),
    "onednn": LayerConfig(),
}


def default_layer_config(backend: str) -> LayerConfig:
    """The config equivalent to ``torch.ao.quantization.get_default_qconfig(backend)``."""
    _check_backend(backend)
    return _DEFAULT_CONFIGS[backend]


# --------------------------------------------------------------------------- qconfig specs
# One description of each qconfig drives both to_qconfig() and to_code(), so the generated
# code cannot drift from what qviz builds in process.


def _source(value) -> str:
    if isinstance(value, (torch.dtype, torch.qscheme)):
        return str(value)  # "torch.quint8", "torch.per_tensor_affine"
    return repr(value)


@dataclass(frozen=True)
class _ObserverSpec:
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
class _QConfigSpec:
    activation: _ObserverSpec
    weight: _ObserverSpec

    def build(self):
        return tq.QConfig(activation=self.activation.build(), weight=self.weight.build())


@dataclass(frozen=True)
class _NamedQConfig:
    """One of torch's own qconfig constants, e.g. ``float16_dynamic_qconfig``."""

    name: str

    def build(self):
        return getattr(tq, self.name)


def _activation_range(config: LayerConfig) -> tuple[int, int]:
    if config.simulated:
        return _INT4_ACT_RANGE
    return (0, 127) if config.reduce_range else (0, 255)


def _activation_spec(config: LayerConfig, fixed: tuple[float, int] | None) -> _ObserverSpec:
    if fixed is not None:
        lo, hi = _activation_range(config)
        return _ObserverSpec(
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
        kwargs += (("quant_min", _INT4_ACT_RANGE[0]), ("quant_max", _INT4_ACT_RANGE[1]))
    else:
        kwargs += (("reduce_range", config.reduce_range),)
    return _ObserverSpec(cls, kwargs)


def _weight_spec(config: LayerConfig) -> _ObserverSpec:
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
        kwargs += (("quant_min", _INT4_WEIGHT_RANGE[0]), ("quant_max", _INT4_WEIGHT_RANGE[1]))
    return _ObserverSpec(cls, kwargs)


def _check_not_format(config: LayerConfig, flow: str) -> None:
    """Refuse a torchao number format in a torch.ao flow ("static" or "dynamic")."""
    if config.dtype in FORMAT_DTYPES:
        raise ConfigError(
            f"dtype {config.dtype!r} is a torchao number format: it runs with flow 'torchao' only "
            f"(Session(..., flow='torchao')); {flow} torch.ao quantization takes dtype "
            + ("'int8', 'fp16' or 'float'" if flow == "dynamic" else "'int8', 'int4', 'fp16' or 'float'")
        )


def _qconfig_spec(config: LayerConfig, flow: str, fixed: tuple[float, int] | None = None):
    """The spec of ``config``'s qconfig for flow "static" or "dynamic" (None: stays float)."""
    if config.dtype == "float":
        return None
    _check_not_format(config, flow)
    if flow == "dynamic":
        if config.dtype == "fp16":
            return _NamedQConfig("float16_dynamic_qconfig")
        if config.dtype == "int4":
            raise ConfigError(
                "dtype 'int4' is not available with flow 'dynamic': torch's dynamic kernels "
                "are int8 and fp16 only; use dtype 'int8', 'fp16' or 'float', or a static flow"
            )
        if config.weight == "per_channel":
            return _NamedQConfig("per_channel_dynamic_qconfig")
        return _NamedQConfig("default_dynamic_qconfig")
    if config.dtype == "fp16":
        return _NamedQConfig("float16_static_qconfig")
    return _QConfigSpec(_activation_spec(config, fixed), _weight_spec(config))


def to_qconfig(config: LayerConfig, backend: str, *, flow: str = "static"):
    """The torch ``QConfig`` (or None for float) that builds ``config`` on ``backend``.

    ``flow`` is "static" (eager or FX post-training quantization; "fx"/"eager" work too)
    or "dynamic". int8/int4 static use the observers the fields name; for activation
    "percentile" that is a MinMaxObserver whose min_val/max_val qviz overwrites with the
    percentile clip before convert. fp16 maps to torch's float16 qconfigs. This does not
    check that the backend has kernels for it: see :func:`supported`.
    """
    _check_backend(backend)
    spec = _qconfig_spec(config, _static_or_dynamic(flow))
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
    _check_backend(backend)
    flow = _static_or_dynamic(flow)
    cls = _layer_class(layer_type)
    if config.dtype == "float":
        return None
    _check_not_format(config, flow)
    name = cls.__name__
    if flow == "dynamic":
        _qconfig_spec(config, flow)  # int4 -> ConfigError
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
                f"(checked by qviz); use backend {_choices(ok)} or set this layer's dtype "
                "to 'float'"
            )
    return None


def _names(classes) -> str:
    return "/".join(c.__name__ for c in classes)


# --------------------------------------------------------------------------- Plan


class UnknownLayerError(ConfigError, KeyError):
    """A layer name the plan lacks. Also a KeyError, so Mapping idioms keep working."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check_groups(groups, layers: Mapping[str, LayerConfig] | None) -> tuple[tuple[str, ...], ...]:
    """Validate fused groups; with ``layers``, also their keys against the plan's layers."""
    if isinstance(groups, str) or not isinstance(groups, (tuple, list)):
        raise ConfigError(
            "groups must be a sequence of name tuples, like (('conv1', 'bn1', 'relu1'),), "
            f"not {groups!r}"
        )
    out, seen = [], set()
    for group in groups:
        if isinstance(group, str) or not isinstance(group, (tuple, list)) or len(group) < 2:
            raise ConfigError(
                f"each fused group must be a tuple of at least 2 layer names, not {group!r}"
            )
        for member in group:
            if not isinstance(member, str) or not member:
                raise ConfigError(f"fused group {group!r} holds {member!r}, not a layer name")
            if member in seen:
                raise ConfigError(f"{member!r} belongs to more than one fused group")
            seen.add(member)
        out.append(tuple(group))
        if layers is None:
            continue
        if group[0] not in layers:
            raise ConfigError(
                f"fused group {tuple(group)!r} starts with {group[0]!r}, which is not a layer "
                "of the plan; a group's first name is its layer key"
            )
        inner = [m for m in group[1:] if m in layers]
        if inner:
            raise ConfigError(
                f"{_choices(inner)} in fused group {tuple(group)!r} must not have a config of "
                f"their own: the group is configured through its first name {group[0]!r}"
            )
    return tuple(out)


def _most_common(specs: list, preferred) -> Any:
    """The most frequent spec; a tie goes to ``preferred`` if it is among the tied, else to
    the tied spec seen first."""
    counts = Counter(specs)
    top = max(counts.values())
    if counts.get(preferred) == top:
        return preferred
    return next(s for s, n in counts.items() if n == top)


def _sample(names, limit: int = 8) -> str:
    names = list(names)
    shown = _choices(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True, eq=False, repr=False)
class Plan(Mapping):
    """The per-layer quantization choices in force for a model, for one backend. Immutable.

    ``layers`` maps each layer key to its :class:`LayerConfig`, in model order (stored as a
    read-only mapping). ``groups`` lists fused groups like ``("conv1", "bn1", "relu1")``:
    the first name is the layer key; the other members have no config of their own, and
    reading or changing them acts on the key. Reading: ``plan["fc"]``, ``"fc" in plan``,
    ``len(plan)``, iteration over layer keys.
    """

    backend: str
    layers: Mapping[str, LayerConfig]
    groups: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        if not isinstance(self.layers, Mapping):
            raise ConfigError(
                f"layers must map layer names to LayerConfigs, not {type(self.layers).__name__}"
            )
        layers: dict[str, LayerConfig] = {}
        for name, config in self.layers.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"layer names must be non-empty strings, not {name!r}")
            if isinstance(config, Mapping):
                try:
                    config = LayerConfig.from_dict(config)
                except ConfigError as exc:
                    raise ConfigError(f"layer {name!r}: {exc}") from None
            elif not isinstance(config, LayerConfig):
                raise ConfigError(
                    f"layer {name!r}: expected a LayerConfig or a dict of its fields, "
                    f"not {type(config).__name__}"
                )
            layers[name] = config
        groups = _check_groups(self.groups, layers)
        object.__setattr__(self, "layers", MappingProxyType(layers))
        object.__setattr__(self, "groups", groups)
        object.__setattr__(
            self, "_group_key", MappingProxyType({m: g[0] for g in groups for m in g[1:]})
        )

    @classmethod
    def default(cls, layer_names, backend: str, groups=()) -> Plan:
        """Every layer at :func:`default_layer_config` of ``backend``. Non-first members of
        ``groups`` may appear in ``layer_names``; they are folded into their group's key."""
        if isinstance(layer_names, str):
            raise ConfigError(
                f"layer_names must be a list of names, not the string {layer_names!r}"
            )
        members = {m for g in _check_groups(groups, None) for m in g[1:]}
        config = default_layer_config(backend)
        names = [n for n in dict.fromkeys(layer_names) if n not in members]
        return cls(backend, dict.fromkeys(names, config), tuple(tuple(g) for g in groups))

    # -- read access

    def resolve(self, name: str) -> str:
        """The layer key ``name`` refers to (itself, or its fused group's first name)."""
        if not isinstance(name, str):
            raise UnknownLayerError(f"layer names are strings, not {name!r}")
        if name in self.layers:
            return name
        if name in self._group_key:
            return self._group_key[name]
        candidates = list(self.layers) + list(self._group_key)
        close = difflib.get_close_matches(str(name), candidates, n=3, cutoff=0.6)
        hint = (
            f"did you mean {_choices(close)}?"
            if close
            else f"the plan's layers are {_sample(self.layers)}"
        )
        raise UnknownLayerError(f"unknown layer {name!r}: {hint}")

    def __getitem__(self, name: str) -> LayerConfig:
        return self.layers[self.resolve(name)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (name in self.layers or name in self._group_key)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (self.backend, dict(self.layers), self.groups) == (
            other.backend,
            dict(other.layers),
            other.groups,
        )

    def __hash__(self) -> int:
        return hash((self.backend, frozenset(self.layers.items()), self.groups))

    def __reduce__(self):
        # the read-only mappings do not pickle or deepcopy; rebuild from plain values
        return (type(self), (self.backend, dict(self.layers), self.groups))

    def __repr__(self) -> str:
        return f"Plan(backend={self.backend!r}, {len(self)} layers, {len(self.groups)} groups)"

    # -- changes

    def with_changes(self, changes: Mapping[str, LayerConfig | Mapping[str, Any]]) -> Plan:
        """A new plan with ``changes`` applied: a LayerConfig replaces a layer's config, a
        dict of fields changes the current one. A fused group's member names its group.
        Entries apply in order; unknown names raise a ConfigError with close matches."""
        if not isinstance(changes, Mapping):
            raise ConfigError(
                f"changes must map layer names to LayerConfigs or dicts, not {type(changes).__name__}"
            )
        layers = dict(self.layers)
        for name, change in changes.items():
            key = self.resolve(name)
            if isinstance(change, LayerConfig):
                layers[key] = change
            elif isinstance(change, Mapping):
                try:
                    _check_fields(change)
                    layers[key] = layers[key].replace(**change)
                except ConfigError as exc:
                    raise ConfigError(f"layer {name!r}: {exc}") from None
            else:
                raise ConfigError(
                    f"layer {name!r}: a change must be a LayerConfig or a dict of fields, "
                    f"not {type(change).__name__}"
                )
        return dataclasses.replace(self, layers=layers)

    def diff(self, other: Plan) -> list[str]:
        """Layer names whose config differs from ``other``'s (including names only one has)."""
        if not isinstance(other, Plan):
            raise TypeError(f"can only diff a Plan with a Plan, not {type(other).__name__}")
        changed = [n for n, c in self.layers.items() if other.layers.get(n) != c]
        return changed + [n for n in other.layers if n not in self.layers]

    def check(self, layer_types: Mapping[str, Any], *, flow: str = "static") -> None:
        """Run :func:`supported` on every layer found in ``layer_types`` (name -> module or
        class); raise one ConfigError listing every layer the backend cannot run."""
        problems = []
        for name, config in self.layers.items():
            if name in layer_types:
                try:
                    supported(config, self.backend, layer_types[name], flow=flow)
                except ConfigError as exc:
                    problems.append(f"layer {name!r}: {exc}")
        if problems:
            raise ConfigError(
                f"{len(problems)} layer(s) cannot run on backend {self.backend!r}:\n"
                + "\n".join(problems)
            )

    # -- torch

    def _specs(self, flow: str, fixed: Mapping[str, tuple[float, int]] | None = None):
        """(global spec, per-layer specs). The global is the most common layer spec (ties:
        the backend default), so the mapping stays short and ops outside the plan (add,
        cat...) follow the majority."""
        base, specs = {}, {}
        for name, config in self.layers.items():
            try:
                base[name] = _qconfig_spec(config, flow)
                specs[name] = _qconfig_spec(config, flow, (fixed or {}).get(name))
            except ConfigError as exc:
                raise ConfigError(f"layer {name!r}: {exc}") from None
        default = _qconfig_spec(default_layer_config(self.backend), flow)
        if not base:
            return default, specs
        return _most_common(list(base.values()), default), specs

    def qconfig_mapping(self, *, flow: str = "static"):
        """The plan as a torch ``QConfigMapping`` (global + ``set_module_name`` for each
        layer that differs); what :meth:`to_code` prints, built in process."""
        glob, specs = self._specs(_static_or_dynamic(flow))
        mapping = tq.QConfigMapping().set_global(None if glob is None else glob.build())
        for name, spec in specs.items():
            if spec != glob:
                mapping.set_module_name(name, None if spec is None else spec.build())
        return mapping

    # -- json

    def to_json(self) -> str:
        """A versioned JSON document that :meth:`from_json` reads back."""
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "backend": self.backend,
                "groups": [list(g) for g in self.groups],
                "layers": {name: config.to_dict() for name, config in self.layers.items()},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str | bytes, layer_names=None) -> Plan:
        """Read :meth:`to_json`'s output. With ``layer_names`` (the model's layers), refuse
        a plan made for another model, naming the missing and extra layers."""
        try:
            doc = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"not a qviz plan: the text is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ConfigError(
                f'not a qviz plan: expected a JSON object with "format": "{FORMAT_NAME}"'
            )
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"invalid qviz plan version {version!r}")
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"this plan has format version {version}, newer than this qviz reads "
                f"({FORMAT_VERSION}); upgrade qviz"
            )
        keys = ("format", "version", "backend", "groups", "layers")
        unknown = [k for k in doc if k not in keys]
        if unknown or "backend" not in doc or not isinstance(doc.get("layers"), dict):
            raise ConfigError(
                f"malformed qviz plan: expected keys {_choices(keys)} with a 'layers' object"
                + (f"; unknown keys {_choices(unknown)}" if unknown else "")
            )
        groups = doc.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise ConfigError(
                f"malformed qviz plan: 'groups' must be a list of name lists, not {groups!r}"
            )
        plan = cls(doc["backend"], doc["layers"], tuple(tuple(g) for g in groups))
        if layer_names is not None:
            wanted = [n for n in dict.fromkeys(layer_names) if n not in plan._group_key]
            missing = [n for n in wanted if n not in plan.layers]
            extra = [n for n in plan.layers if n not in set(wanted)]
            if missing or extra:
                parts = []
                if missing:
                    parts.append(
                        f"it lacks {len(missing)} of this model's layers ({_sample(missing)})"
                    )
                if extra:
                    parts.append(f"it has {len(extra)} layers this model lacks ({_sample(extra)})")
                raise ConfigError("this plan was made for another model: " + "; ".join(parts))
        return plan

    # -- code

    def _check_fixed(self, fixed, flow: str) -> dict[str, tuple[float, int]]:
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
            key = self.resolve(name)
            config = self.layers[key]
            if config.activation != "percentile" or config.dtype not in ("int8", "int4"):
                raise ConfigError(
                    f"fixed_qparams[{name!r}]: only int8/int4 layers with activation "
                    f"'percentile' take fixed qparams; {key!r} is {config.describe()}"
                )
            lo, hi = _activation_range(config)
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

    def code_for(self, meta: dict) -> str:
        """:meth:`to_code` for the flow a session ran (``results.meta``: flow and its options)."""
        flow = meta.get("flow")
        if flow == "torchao":  # quantize_ code, with the session's scheme and group size
            return self.to_code("torchao", **{k: v for k, v in meta.items() if k in ("scheme", "group_size")})
        return self.to_code(flow) if flow in (*_CODE_FLOWS, "pt2e") else self.to_code()

    def to_code(
        self, flow: str = "fx", fixed_qparams: Mapping[str, tuple[float, int]] | None = None, **options
    ) -> str:
        """Runnable Python, importing torch only, that rebuilds this plan's qconfigs.

        flow "fx": ``build_qconfig_mapping()`` returning a QConfigMapping; "eager":
        ``apply_qconfigs(model)`` setting ``.qconfig`` by module name; "dynamic": a
        ``qconfig_spec`` dict for ``quantize_dynamic``. Percentile activations need qviz's
        recorded histogram: pass ``fixed_qparams`` ({layer: (scale, zero_point)}, as qviz
        recorded them) to pin them with FixedQParamsObserver; otherwise the code uses a
        MinMaxObserver and says so. In FX, a layer whose input is not quantized yet (the
        model input, say) observes that input with its activation observer too, so a
        fixed observer pins the input's qparams as well. flow "torchao": an ``FqnToConfig``
        for ``quantize_`` (``options``: ``scheme``, ``group_size``, as the session's); "pt2e":
        ``build_quantizer()`` returning the X86InductorQuantizer.
        """
        if flow == "torchao":
            from qviz.flows.torchao.flow import torchao_code

            return torchao_code(self, **options)
        if flow == "pt2e" and not options:
            from qviz.flows.pt2e.flow import pt2e_code

            return pt2e_code(self)
        if options:
            raise ConfigError(f"to_code options {_choices(options)} apply to flow 'torchao' only")
        if not (isinstance(flow, str) and flow in _CODE_FLOWS):
            _check_choice("flow", flow, _CODE_FLOWS)
        qflow = "dynamic" if flow == "dynamic" else "static"
        fixed = self._check_fixed(fixed_qparams, qflow)
        glob, specs = self._specs(qflow, fixed)
        return _CodeWriter(self, flow, glob, specs, fixed).write()


def _literal(text: str) -> str:
    """A Python string literal for any layer name (JSON string syntax is valid Python)."""
    return json.dumps(text)


def _fx_entry(name: str, qconfig: str) -> str:
    """The QConfigMapping line for one FX row: a module by name, or one functional call
    (``"block.linear#1"``: the second ``F.linear`` in ``block``'s forward, ``"linear#0"`` in the
    model's own) by FX's module / op / call-order key."""
    if "#" not in name:
        return f"mapping.set_module_name({_literal(name)}, {qconfig})"
    path, index = name.rsplit("#", 1)
    owner, _, op = path.rpartition(".")
    return (f"mapping.set_module_name_object_type_order({_literal(owner)}, "
            f"torch.nn.functional.{op}, {int(index)}, {qconfig})")


_USAGE = {
    "fx": [
        "# Usage: torch.backends.quantized.engine = BACKEND",
        "#        prepared = prepare_fx(model.eval(), build_qconfig_mapping(), example_inputs)",
        "#        ...calibrate prepared...; quantized = convert_fx(prepared)",
    ],
    "eager": [
        "# Usage: torch.backends.quantized.engine = BACKEND",
        "#        (model with QuantStub/DeQuantStub, fused with fuse_modules), then",
        "#        prepared = prepare(apply_qconfigs(model.eval())); ...calibrate...; convert(prepared)",
    ],
    "dynamic": [
        "# Usage: torch.backends.quantized.engine = BACKEND",
        "#        quantized = quantize_dynamic(model.eval(), qconfig_spec=qconfig_spec)",
    ],
}


class _CodeWriter:
    """Renders a plan's qconfig specs as a standalone Python module."""

    def __init__(self, plan: Plan, flow: str, glob, specs: dict, fixed: dict):
        self.plan, self.flow, self.glob, self.specs, self.fixed = plan, flow, glob, specs, fixed
        self.imports: set[str] = set()
        self.var_of: dict[Any, str] = {}
        self.definitions: list[str] = []

    def ref(self, spec) -> str:
        """The expression naming ``spec``: None, a torch constant or a module variable."""
        if spec is None:
            return "None"
        if isinstance(spec, _NamedQConfig):
            self.imports.add(spec.name)
            return spec.name
        if spec not in self.var_of:
            var = f"qconfig_{len(self.var_of)}"
            self.var_of[spec] = var
            self.imports.update(("QConfig", spec.activation.cls.__name__, spec.weight.cls.__name__))
            self.definitions.append(
                f"{var} = QConfig(\n"
                f"    activation={spec.activation.source('    ')},\n"
                f"    weight={spec.weight.source('    ')},\n"
                ")"
            )
        return self.var_of[spec]

    def note(self, name: str) -> str:
        config = self.plan.layers[name]
        text = config.describe()
        if self.flow == "dynamic" and config.dtype == "int8":  # activations: per batch, no observer
            text = f"int8, {config.weight.replace('_', '-')} weights, activations quantized at run time"
        if self.flow != "dynamic" and self._is_percentile(config):
            text += "; qviz's qparams pinned" if name in self.fixed else "; see the note on top"
        return f"  # {text}"

    @staticmethod
    def _is_percentile(config: LayerConfig) -> bool:
        return config.activation == "percentile" and config.dtype in ("int8", "int4")

    def write(self) -> str:
        flow = self.flow
        if flow == "dynamic":
            # every layer by name, no "" entry: a global would also reach nn.Embedding (which
            # quantize_dynamic then refuses) and layers the plan does not hold
            body = [
                "qconfig_spec = {  # layers not named here stay float",
                *(f"    {_literal(n)}: {self.ref(s)},{self.note(n)}" for n, s in self.specs.items()),
                "}",
            ]
            return self._module(body)
        glob = self.ref(self.glob)
        changed = [(n, self.ref(s)) for n, s in self.specs.items() if s != self.glob]
        rest = f"{len(self.specs) - len(changed)} layer(s)"
        if flow == "fx":
            self.imports.add("QConfigMapping")
            body = [
                "def build_qconfig_mapping():",
                '    """The plan as a QConfigMapping for prepare_fx."""',
                f"    mapping = QConfigMapping().set_global({glob})  # {rest} and all other ops",
                *(f"    {_fx_entry(n, r)}{self.note(n)}" for n, r in changed),
                "    return mapping",
            ]
        else:
            body = [
                "def apply_qconfigs(model):",
                '    """Set the plan\'s qconfigs on model\'s modules, by name; returns model."""',
                f"    model.qconfig = {glob}  # modules outside the plan (stubs, adds...)",
                "    # every planned layer explicitly, so no qconfig set on a parent leaks in",
                *(
                    f"    model.get_submodule({_literal(n)}).qconfig = {self.ref(s)}{self.note(n)}"
                    for n, s in self.specs.items()
                ),
                "    return model",
            ]
        return self._module(body)

    def _module(self, body: list[str]) -> str:
        plan, flow = self.plan, self.flow
        header = [
            f'"""Quantization plan exported by qviz: backend "{plan.backend}", flow "{flow}", '
            f"{len(plan)} layers.",
            "",
            "Plain torch code: qviz is not needed to run it.",
            '"""',
            "",
            *(["import torch"] if self.definitions or any("torch." in line for line in body) else []),
            *(["from torch.ao.quantization import ("] if self.imports else []),
            *(f"    {name}," for name in sorted(self.imports, key=str.lower)),
            *([")"] if self.imports else []),
        ]
        top = [f"BACKEND = {_literal(plan.backend)}", *_USAGE[flow], *self._notes()]
        parts = ["\n".join(header), "\n".join(top), *self.definitions]
        return "\n\n".join(parts) + "\n\n\n" + "\n".join(body) + "\n"

    def _notes(self) -> list[str]:
        layers = self.plan.layers
        notes = []
        if self.flow == "dynamic":
            return [
                "#",
                "# Dynamic quantization uses torch's stock dynamic qconfigs: of each layer's",
                "# choices only dtype and per-channel/per-tensor weights apply.",
            ]
        unpinned = [n for n, c in layers.items() if self._is_percentile(c) and n not in self.fixed]
        if unpinned:
            notes += [
                "#",
                f"# Percentile activations: {_sample(unpinned)}. qviz clips these at a",
                "# percentile of its recorded histogram; without that data this code observes",
                "# them with a MinMaxObserver (full range). Pass fixed_qparams to qviz's",
                "# Plan.to_code to pin qviz's scale and zero point instead.",
            ]
        if self.fixed and self.flow == "fx":
            notes += [
                "#",
                f"# Pinned activation qparams: {_sample(self.fixed)}. In FX, a layer whose input",
                "# is not quantized yet (e.g. the model input) pins that input's qparams too.",
            ]
        simulated = [n for n, c in layers.items() if c.simulated]
        if simulated:
            notes += [
                "#",
                f"# int4 (simulated): {_sample(simulated)}. torch has no int4 conv/linear",
                "# kernel: these run int8 kernels restricted to the 4-bit range",
                "# (weights qint8 -8..7, activations quint8 0..15).",
            ]
        return notes

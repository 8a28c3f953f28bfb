"""Per-layer quantization plans as plain data: which layer is quantized how, and their JSON.

A :class:`Plan` maps layer names to :class:`LayerConfig` choices for one backend; the fields of
a LayerConfig, their validation and defaults come from the option table :data:`qviz.options.OPTIONS`.
Nothing here knows a flow: each flow turns a plan into what its library runs and into code
(``flow_class(name).plan_code``, which :meth:`Plan.to_code` calls through the flow registry).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from qviz.errors import ConfigError
from qviz.options import FORMAT_DTYPES, OPTIONS, choices_text, sample_text

__all__ = [
    "BACKENDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerConfig",
    "Plan",
    "UnknownLayerError",
    "default_layer_config",
    "known_backend",
    "observer_name",
]

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
#: torch's observer classes in the plan's words, so that the layer table, the editor and the
#: plan speak one vocabulary before and after an apply (other classes keep their own names).
OBSERVER_NAMES = {
    "MinMaxObserver": "minmax", "MovingAverageMinMaxObserver": "moving_average", "HistogramObserver": "histogram",
    "PerChannelMinMaxObserver": "minmax", "MovingAveragePerChannelMinMaxObserver": "moving_average",
}
FORMAT_NAME = "qviz-plan"
FORMAT_VERSION = 1
#: the keys of a session's meta that are not options of its flow's code (see Plan.code_for)
_SESSION_META = ("flow", "backend", "torch", "qviz", "sensitivity_metric")


def observer_name(class_name: str) -> str:
    """The plan's word for a torch observer class (``HistogramObserver`` -> ``histogram``)."""
    return OBSERVER_NAMES.get(class_name, class_name)


def known_backend(backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS`; ConfigError naming them (and a close match)."""
    if isinstance(backend, str) and backend in BACKENDS:
        return backend
    hint = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.6)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"backend {backend!r} is not valid{extra}; choose one of {choices_text(BACKENDS)}")


# --------------------------------------------------------------------------- LayerConfig


def _option_fields(cls):
    """Give ``cls`` one dataclass field per row of :data:`qviz.options.OPTIONS`, in its order."""
    cls.__annotations__ = {o.name: o.annotation for o in OPTIONS}
    for o in OPTIONS:
        setattr(cls, o.name, o.default)
    return cls


@dataclass(frozen=True)
@_option_fields
class LayerConfig:
    """How one layer (or fused group) is quantized. Immutable; invalid values raise ConfigError.

    Its fields are the rows of :data:`qviz.options.OPTIONS` (each with its choices or bounds,
    default and meaning): ``dtype``, ``weight``, ``weight_symmetric``, ``activation``,
    ``percentile``, ``activation_symmetric``, ``reduce_range``, ``group_size``. Fields other
    than ``dtype`` matter for int8/int4 only, and a flow honours those it lists in its
    ``editable``; the flows check what their kernels run (``Flow.check_plan``).
    """

    def __post_init__(self) -> None:
        for o in OPTIONS:
            object.__setattr__(self, o.name, o.check(getattr(self, o.name)))
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
        """A short human description, used in generated code and the UI: the dtype, the weights,
        the activations, then each option's ``phrase`` where it is away from its default."""
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
        parts += [o.phrase.format(getattr(self, o.name)) for o in OPTIONS
                  if o.phrase and self.dtype in o.applies_to and getattr(self, o.name) != o.default]
        return ", ".join(parts)


def _check_fields(data: Mapping) -> None:
    fields = [o.name for o in OPTIONS]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown layer config field(s) {choices_text(unknown)}; valid fields: {choices_text(fields)}"
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
    return _DEFAULT_CONFIGS[known_backend(backend)]


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
                f"{choices_text(inner)} in fused group {tuple(group)!r} must not have a config of "
                f"their own: the group is configured through its first name {group[0]!r}"
            )
    return tuple(out)


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
        known_backend(self.backend)
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
            f"did you mean {choices_text(close)}?"
            if close
            else f"the plan's layers are {sample_text(self.layers)}"
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
                f"malformed qviz plan: expected keys {choices_text(keys)} with a 'layers' object"
                + (f"; unknown keys {choices_text(unknown)}" if unknown else "")
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
                        f"it lacks {len(missing)} of this model's layers ({sample_text(missing)})"
                    )
                if extra:
                    parts.append(f"it has {len(extra)} layers this model lacks ({sample_text(extra)})")
                raise ConfigError("this plan was made for another model: " + "; ".join(parts))
        return plan

    # -- code

    def to_code(self, flow: str | None = None, **options) -> str:
        """Runnable Python, without qviz, that builds this plan's configuration for ``flow`` (None:
        the default flow, FX; see each flow's ``plan_code`` for what it writes and the ``options`` it takes, e.g.
        ``fixed_qparams`` for the torch.ao flows, ``scheme`` and ``group_size`` for torchao's)."""
        from qviz.flows.registry import DEFAULT_FLOW, flow_class  # the flows import this module

        flow = DEFAULT_FLOW if flow is None else flow
        cls = flow_class(flow)
        parameters = list(inspect.signature(cls.plan_code).parameters.values())[1:]  # after the plan
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes = [p.name for p in parameters if p.kind in named]
        unknown = [k for k in options if k not in takes]
        if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise ConfigError(f"to_code option(s) {choices_text(unknown)} do not apply to flow {flow!r}; its code takes "
                              f"{choices_text(takes) or 'no options'}")
        return cls.plan_code(self, **options)

    def code_for(self, meta: Mapping[str, Any]) -> str:
        """:meth:`to_code` for the flow a session ran (``results.meta``: the flow's name, the
        session's own entries, and the flow's ``meta``, passed to its code as options)."""
        options = {k: v for k, v in meta.items() if k not in _SESSION_META}
        return self.to_code(meta["flow"], **options) if meta.get("flow") else self.to_code(**options)

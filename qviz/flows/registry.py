"""The flow registry: every flow qviz can run, by name.

The built-in flows are listed here as ``"module:Class"`` strings and imported on first use, so
nothing below the registry depends on which flows exist. Other packages ship flows through the
``qviz.flows`` entry point group (``[project.entry-points."qviz.flows"] myflow =
"mypkg.flow:MyFlow"``), and code in the same process calls :func:`register_flow`. Session, the
CLI and the dashboard's editor read names and options from here, never a list of their own.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from importlib import metadata

from qviz.errors import ConfigError
from qviz.flows.base import Flow

ENTRY_POINT_GROUP = "qviz.flows"
DEFAULT_FLOW = "fx"  # Session(flow=...) and the CLI without one

_BUILTIN = {
    "fx": "qviz.flows.torch_ao.fx:FxFlow",
    "eager": "qviz.flows.torch_ao.eager:EagerFlow",
    "dynamic": "qviz.flows.torch_ao.dynamic:DynamicFlow",
    "pt2e": "qviz.flows.pt2e.flow:Pt2eFlow",
    "torchao": "qviz.flows.torchao.flow:TorchaoFlow",
}
_registered: dict[str, type] = {}
_entry_points_read = False


def register_flow(cls: type) -> type:
    """Make ``cls`` (a :class:`qviz.flows.base.Flow` subclass) available as ``cls.name``; usable
    as a class decorator. Registering another class under a taken name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Flow)):
        raise ConfigError(f"register_flow takes a subclass of qviz.flows.base.Flow, not {cls!r}")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"flow class {cls.__qualname__} needs a `name` that is an identifier, not {name!r}")
    taken = _registered.get(name) or (_BUILTIN.get(name) if name not in _registered else None)
    if taken is not None and taken is not cls and taken != f"{cls.__module__}:{cls.__qualname__}":
        raise ConfigError(f"a flow named {name!r} is registered already ({_label(taken)}): pick another name")
    _registered[name] = cls
    return cls


def unregister_flow(name: str) -> None:
    """Forget a flow registered in this process (tests, notebooks trying a flow out)."""
    if name in _BUILTIN:
        raise ConfigError(f"{name!r} is a built-in flow and cannot be unregistered")
    _registered.pop(name, None)


def flow_names() -> tuple[str, ...]:
    """Every flow's name: the built-ins first, then those of other packages and this process."""
    _read_entry_points()
    return tuple(dict.fromkeys([*_BUILTIN, *_registered]))


def flow_class(name: str) -> type:
    """The flow class registered as ``name``; ConfigError naming the flows there are."""
    if name not in _registered and name in _BUILTIN:
        module, _, attr = _BUILTIN[name].partition(":")
        _registered[name] = getattr(importlib.import_module(module), attr)
    if name not in _registered:
        _read_entry_points()
    if not isinstance(name, str) or name not in _registered:
        raise ConfigError(f"unknown flow {name!r}: choose one of {', '.join(map(repr, flow_names()))}")
    return _registered[name]


def make_flow(name: str, backend: str, **options):
    """The flow called ``name`` for ``backend``, configured with ``options``: keyword arguments of
    its constructor (an unknown one is refused, naming those it has)."""
    cls = flow_class(name)
    accepted = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"flow {name!r} has no option {', '.join(map(repr, unknown))}; its options are "
                          f"{', '.join(map(repr, accepted)) or 'none'}")
    return cls(backend, **options)


def _read_entry_points() -> None:
    """Register the flows other installed packages declare (once per process)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _registered or point.name in _BUILTIN:
            continue
        try:
            register_flow(point.load())
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the other flows
            warnings.warn(f"the flow {point.name!r} that an installed package declares ({point.value}) "
                          f"was skipped: {type(exc).__name__}: {exc}", stacklevel=3)


def _label(entry) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}.{entry.__qualname__}"

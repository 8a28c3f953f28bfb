"""A small explicit validator for the JSON in a session file's manifest.

A file from a stranger is well-formed JSON of any shape; its consumers (the results, the
report, the dashboard) index it as if it came from ``session.save()``. ``validate`` checks it
first against a spec and names the first field that departs from it. A spec is:

- a type or a tuple of types (``bool`` never passes as a number unless listed),
- ``ListOf(spec)``, ``DictOf(spec)`` (str keys), ``Row(spec, ...)`` (a fixed-length list),
- ``Fields(required, optional, extra)``: an object; ``extra`` is the spec of any other key
  (``None``: no other key allowed),
- ``OneOf(value, ...)``: one of these values, or ``AnyOf(spec, ...)``: one of these specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qviz.errors import SessionFileError

NULL = type(None)
REAL = (int, float, NULL)  # null stands for NaN
SCALAR = (str, int, float, bool, NULL)
ANY = object

_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true/false", NULL: "null", object: "anything"}


class _Mismatch(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(where, problem)
        self.where, self.problem = where, problem


@dataclass(frozen=True)
class ListOf:
    item: object


@dataclass(frozen=True)
class DictOf:
    value: object


@dataclass(frozen=True)
class Row:
    items: tuple

    def __init__(self, *items):
        object.__setattr__(self, "items", items)


@dataclass(frozen=True)
class Fields:
    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)
    extra: object = ANY


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class AnyOf:
    specs: tuple

    def __init__(self, *specs):
        object.__setattr__(self, "specs", specs)


def describe(spec) -> str:
    """What ``spec`` accepts, in words."""
    if isinstance(spec, type):
        return _NAMES.get(spec, spec.__name__)
    if isinstance(spec, tuple):
        return " or ".join(describe(s) for s in spec)
    if isinstance(spec, ListOf):
        return f"a list of ({describe(spec.item)})"
    if isinstance(spec, DictOf):
        return f"an object of ({describe(spec.value)})"
    if isinstance(spec, Row):
        return f"a list of {len(spec.items)} items"
    if isinstance(spec, Fields):
        return "an object"
    if isinstance(spec, OneOf):
        return "one of " + ", ".join(map(repr, spec.values))
    return " or ".join(describe(s) for s in spec.specs)


def _got(value) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return f"{_NAMES[type(value)]} ({value!r:.40})"
    return _NAMES.get(type(value), type(value).__name__)


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types and object not in types:
        return False
    return isinstance(value, types)


def _check(value, spec, where: str) -> None:
    if isinstance(spec, (type, tuple)):
        ok = _is(value, spec)
    elif isinstance(spec, ListOf):
        ok = isinstance(value, list)
        if ok:
            for i, v in enumerate(value):
                _check(v, spec.item, f"{where}[{i}]")
    elif isinstance(spec, DictOf):
        ok = isinstance(value, dict)
        if ok:
            for k, v in value.items():
                _check(v, spec.value, f"{where}.{k}")
    elif isinstance(spec, Row):
        ok = isinstance(value, list) and len(value) == len(spec.items)
        if ok:
            for i, (v, s) in enumerate(zip(value, spec.items, strict=True)):
                _check(v, s, f"{where}[{i}]")
    elif isinstance(spec, Fields):
        ok = isinstance(value, dict)
        if ok:
            _check_fields(value, spec, where)
    elif isinstance(spec, OneOf):
        ok = any(type(value) is type(v) and value == v for v in spec.values)
    else:
        ok = any(_passes(value, s, where) for s in spec.specs)
    if not ok:
        raise _Mismatch(where, f"is {_got(value)}, expected {describe(spec)}")


def _passes(value, spec, where: str) -> bool:
    try:
        _check(value, spec, where)
    except _Mismatch:
        return False
    return True


def _check_fields(value: dict, spec: Fields, where: str) -> None:
    for key in spec.required:
        if key not in value:
            raise _Mismatch(f"{where}.{key}", "is missing")
    for key, v in value.items():
        sub = spec.required.get(key, spec.optional.get(key, spec.extra))
        if sub is None:
            raise _Mismatch(f"{where}.{key}", "is not a field qviz knows")
        _check(v, sub, f"{where}.{key}")


def fail(path, where: str, problem: str) -> SessionFileError:
    """The error for field ``where`` of ``path``'s manifest."""
    return SessionFileError(
        f"{path}: the manifest field {where} {problem}; the file was damaged or not written "
        "by qviz: re-create it with session.save()"
    )


def validate(doc, spec, path, where: str = "manifest") -> None:
    """Raise :class:`SessionFileError` naming the first field of ``doc`` that ``spec`` refuses."""
    try:
        _check(doc, spec, where)
    except _Mismatch as exc:
        raise fail(path, exc.where, exc.problem) from None

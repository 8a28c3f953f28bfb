"""The per-layer quantization options: one table, read by everything that knows a layer's choices.

Each :class:`Option` declares one field of :class:`qviz.plan.LayerConfig` once: its type, its
choices or bounds, its default and a one-line description. LayerConfig takes its fields, its
validation, its JSON keys and the tail of ``describe()`` from :data:`OPTIONS`; the flows' ``editable``
choices, the mixed-precision search's default ladder and the dashboard's editor read it too. A new
option (``bits=6``, say) is one more row here, plus the flows that honour it. Plain data: no torch.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from qviz.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "FORMAT_DTYPES",
    "OPTIONS",
    "SEARCH_LADDER",
    "TORCH_DTYPES",
    "WEIGHT_SCHEMES",
    "Option",
    "choices_text",
    "option",
    "sample_text",
]

#: what torch.ao's kernels run: int8, int4 (simulated on the int8 kernels), fp16, float (unquantized)
TORCH_DTYPES = ("int8", "int4", "fp16", "float")
#: torchao's number formats, for flow "torchao" only (qviz.flows.torchao.formats: configs, CPU simulation)
FORMAT_DTYPES = ("float8_e4m3fn", "float8_e5m2", "mxfp8", "mxfp4", "nvfp4")
DTYPES = (*TORCH_DTYPES, *FORMAT_DTYPES)
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
ACTIVATIONS = ("minmax", "moving_average", "histogram", "percentile")
#: the dtypes the mixed-precision search tries unless a flow or the caller says otherwise, cheap to precise
SEARCH_LADDER = ("int4", "int8", "float")
_INTEGER = ("int8", "int4")


def choices_text(values) -> str:
    """``'a', 'b', 'c'``: values as an error message lists them."""
    return ", ".join(repr(v) for v in values)


def sample_text(names, limit: int = 8) -> str:
    """The first ``limit`` names as :func:`choices_text` lists them, and how many more there are."""
    names = list(names)
    shown = choices_text(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class Option:
    """One per-layer option: what values it takes and what it means.

    ``choices`` (strings) or ``bounds`` (``(low, high)``, ``high`` None for no limit, ends
    ``inclusive`` or not) say what is valid; ``optional``: None is valid too (the flow's own
    value). ``suggested``: the values an editor offers for an open-ended number. ``applies_to``:
    the dtypes it matters for (empty: the integer ones); ``phrase``: the words ``describe()`` adds
    when the option is away from its default (``{}`` is the value). ``widget``: the editor's
    control ("buttons", "select", "number", "checkbox"; "" hides it from the editor).
    """

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple = ()
    bounds: tuple | None = None
    inclusive: tuple[bool, bool] = (True, True)
    optional: bool = False
    suggested: tuple = ()
    applies_to: tuple[str, ...] = _INTEGER
    phrase: str = ""
    widget: str = ""

    @property
    def annotation(self) -> str:
        """The field's type as a dataclass annotation."""
        return self.type.__name__ + (" | None" if self.optional else "")

    def check(self, value) -> Any:
        """``value`` as the field holds it (a float for a float option, an int for an int one);
        ConfigError naming the option, the value and what is valid."""
        if value is None and self.optional:
            return None
        if self.choices:
            if isinstance(value, str) and value in self.choices:
                return value
            hint = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.6)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{self.name} {value!r} is not valid{extra}; choose one of "
                              f"{choices_text(self.choices)}")
        if self.type is bool:
            if isinstance(value, bool):
                return value
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and self._in_bounds(value):
            if self.type is float:
                return float(value)
            if isinstance(value, numbers.Integral):
                return int(value)  # a numpy integer too: JSON needs an int
        raise ConfigError(f"{self.name} must be {self.expected()}, not {value!r}")

    def _in_bounds(self, value) -> bool:
        if not math.isfinite(value):
            return False
        low, high = self.bounds or (None, None)
        low_ok = low is None or (value >= low if self.inclusive[0] else value > low)
        high_ok = high is None or (value <= high if self.inclusive[1] else value < high)
        return low_ok and high_ok

    def expected(self) -> str:
        """What a valid value is, in words: "True or False", "a number in (50, 100], like 99.99"."""
        if self.choices:
            return f"one of {choices_text(self.choices)}"
        if self.type is bool:
            return "True or False"
        low, high = self.bounds or (None, None)
        kind = "an int" if self.type is int else "a number"
        if self.type is int and low == 0 and high is None and not self.inclusive[0]:
            text = "a positive int"
        elif low is None and high is None:
            text = kind
        else:
            left, right = "[" if self.inclusive[0] else "(", "]" if self.inclusive[1] else ")"
            text = f"{kind} in {left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        if self.suggested:
            text += f" (e.g. {', '.join(map(str, self.suggested))})"
        elif self.default is not None:
            text += f", like {self.default:g}"
        return text + (" or None for the flow's" if self.optional else "")


OPTIONS: tuple[Option, ...] = (
    Option("dtype", str, "int8", "what the layer computes in: int8, int4 (simulated on int8 kernels), fp16, "
           "float (left unquantized), or a torchao number format (flow 'torchao')",
           choices=DTYPES, applies_to=DTYPES, widget="buttons"),
    Option("weight", str, "per_channel", "one weight scale per output channel or one per tensor",
           choices=WEIGHT_SCHEMES, widget="buttons"),
    Option("weight_symmetric", bool, True, "symmetric weights (zero point 0) or affine ones"),
    Option("activation", str, "histogram", "the observer of the layer's output; percentile clips at "
           "`percentile` of qviz's recorded histogram", choices=ACTIVATIONS, widget="select"),
    Option("percentile", float, 99.99, "where activation 'percentile' clips the output's range",
           bounds=(50, 100), inclusive=(False, True), widget="number"),
    Option("activation_symmetric", bool, False, "symmetric quint8 activations (zero point 128)",
           phrase="symmetric activations"),
    Option("reduce_range", bool, False, "int8 activations on 7 bits (0..127): x86/fbgemm saturate 16-bit "
           "sums otherwise; int4 ignores it", applies_to=("int8",), phrase="reduce_range", widget="checkbox"),
    Option("group_size", int, None, "input columns per int4 weight scale (flow 'torchao'); None: the "
           "flow's group_size", bounds=(0, None), inclusive=(False, True), optional=True,
           suggested=(32, 64, 128), applies_to=("int4",), phrase="group_size {}", widget="select"),
)
_BY_NAME = MappingProxyType({o.name: o for o in OPTIONS})


def option(name: str) -> Option:
    """The option called ``name``; ConfigError listing the options otherwise."""
    if name not in _BY_NAME:
        raise ConfigError(f"unknown layer config field {name!r}; valid fields: {choices_text(_BY_NAME)}")
    return _BY_NAME[name]

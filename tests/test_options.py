"""The per-layer option table (qviz.options) is the one place a LayerConfig field is declared:
LayerConfig's fields, defaults, validation and JSON, the flows' editable choices and the editor's
parameters all agree with it, and a new row is a new, validated field."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from qviz import options, plan
from qviz.errors import ConfigError
from qviz.options import OPTIONS, Option, option
from qviz.plan import LayerConfig, Plan


def _valid(o: Option) -> list:
    """Values the table says ``o`` takes: every choice, both bools, the bounds' inclusive ends."""
    if o.choices:
        return list(o.choices)
    if o.type is bool:
        return [True, False]
    low, high = o.bounds
    values = [o.default, *o.suggested]
    values += [low] if o.inclusive[0] else []
    values += [high] if high is not None and o.inclusive[1] else []
    return [v for v in values if v is not None] + ([None] if o.optional else [])


def _invalid(o: Option) -> list:
    """Values the table refuses: a near-miss string, non-bools, the excluded ends, beyond the bounds."""
    if o.choices:
        return [o.choices[0] + "x", None, 1]
    if o.type is bool:
        return [1, 0, "yes", None]
    low, high = o.bounds
    values = ["1", True, math.nan, low - 1]
    values += [] if o.inclusive[0] else [low]
    values += [] if high is None else [high + 1] + ([] if o.inclusive[1] else [high])
    return values + ([] if o.optional else [None]) + ([1.5] if o.type is int else [])


def test_layer_config_fields_are_the_table():
    fields = dataclasses.fields(LayerConfig)
    assert [f.name for f in fields] == [o.name for o in OPTIONS]
    assert [f.default for f in fields] == [o.default for o in OPTIONS]
    assert LayerConfig().to_dict() == {o.name: o.default for o in OPTIONS}
    assert all(o.doc and o.type in (str, bool, int, float) for o in OPTIONS)
    with pytest.raises(ConfigError, match="valid fields: 'dtype'"):
        option("bits")


@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: o.name)
def test_validation_follows_the_table(o):
    base = {"dtype": o.applies_to[0]} if o.name != "dtype" else {}
    for value in _valid(o):
        config = LayerConfig(**base, **{o.name: value})
        held = getattr(config, o.name)
        assert held == value and (held is None or type(held) is o.type), (o.name, value)
        assert LayerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for value in _invalid(o):
        with pytest.raises(ConfigError, match=f"^{o.name} ") as info:
            LayerConfig(**base, **{o.name: value})
        assert repr(value) in str(info.value)
        assert o.expected().split(" (")[0].split(",")[0] in str(info.value)


def test_json_and_plans_read_the_table():
    doc = json.loads(Plan("x86", {"fc": {}}).to_json())
    assert list(doc["layers"]["fc"]) == [o.name for o in OPTIONS]
    with pytest.raises(ConfigError, match="layer 'fc': unknown layer config field"):
        Plan("x86", {"fc": {"bits": 6}})


def test_the_editor_and_the_flows_offer_the_table():
    pytest.importorskip("panel")
    from qviz.flows.torch_ao.dynamic import DynamicFlow
    from qviz.flows.torchao.flow import TorchaoFlow
    from qviz.ui.state import _CONFIG_DEFAULTS, CONFIG_FIELDS
    from qviz.ui.views import ConfigEditor

    assert CONFIG_FIELDS == tuple(o.name for o in OPTIONS if o.widget)
    for name in CONFIG_FIELDS:
        o, p = option(name), ConfigEditor.param[name]
        assert _CONFIG_DEFAULTS[name] == o.default
        assert p.default == (0 if o.default is None and o.optional else o.default), name
        if o.choices:
            assert list(p.objects) == list(o.choices), name
        elif o.optional:
            assert list(p.objects) == [0, *o.suggested], name
        elif o.type is float:
            assert (tuple(p.bounds), tuple(p.inclusive_bounds)) == (o.bounds, o.inclusive), name
    # the editor opens on the plan's own default: the activation the backends' defaults use
    assert ConfigEditor.param["activation"].default == LayerConfig().activation == "histogram"
    for flow in (TorchaoFlow, DynamicFlow):
        for name, values in flow.editable.items():
            allowed = {*option(name).choices, *option(name).suggested, *([None] if option(name).optional else [])}
            assert values is None or set(values) <= allowed, (flow.name, name)


def test_a_new_row_is_a_new_validated_field(monkeypatch):
    """One more row in the table (here a toy ``bits`` option) gives LayerConfig the field: its
    default, its bounds enforced, JSON, and describe()'s words for it."""
    bits = Option("bits", int, 8, "bits per weight", bounds=(2, 8), applies_to=("int8",), phrase="{} bits")
    monkeypatch.setattr(plan, "OPTIONS", (*OPTIONS, bits))
    toy = dataclasses.dataclass(frozen=True)(plan._option_fields(type("ToyConfig", (LayerConfig,), {})))
    assert toy().bits == 8 and toy(bits=6).bits == 6
    assert toy(bits=6).to_dict()["bits"] == 6 and toy.from_dict({"bits": 2}) == toy(bits=2)
    assert "6 bits" in toy(bits=6).describe() and "bits" not in toy().describe()
    for bad in (9, 1, 6.5, "6", True):
        with pytest.raises(ConfigError, match=r"bits must be an int in \[2, 8\], like 8"):
            toy(bits=bad)
    with pytest.raises(ConfigError, match="unknown layer config field"):
        toy().replace(group=3)
    assert options.OPTIONS == OPTIONS  # the table itself is untouched

"""A flow written outside the qviz package joins through the registry and touches no core file.

``RoundingFlow`` below is what another package would ship: int8 weights rounded per output
channel (activations left float), built on the protocol alone. The session runs it, the editor
and apply() re-convert with it, the CLI offers it, and its figures equal plain torch's.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import torch
from torch import nn

import qviz
from qviz.cli import build_parser
from qviz.errors import ConfigError
from qviz.flows import registry
from qviz.flows.base import Calibration, Flow, QuantPoint
from qviz.plan import LayerConfig, Plan


class RoundedLinear(nn.Module):
    """A Linear whose weight was rounded to an int8 grid, one scale per output channel."""

    layer_type = "RoundedLinear"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.weight = nn.Parameter((weight / self.scale).round().clamp(-127, 127) * self.scale, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class RoundingFlow(Flow):
    """Weight-only int8 rounding, a flow of another package."""

    name = "rounding"
    summary = "int8 weight rounding (a plug-in)"
    quantizes = "nn.Linear"
    needs_calibration = False
    editable = {"dtype": ("int8", "float")}
    ladder = ("int8", "float")

    def __init__(self, backend: str = "x86", skip: tuple = ()):
        self.backend, self.skip = backend, tuple(skip)

    def prepare(self, model, example_inputs):
        return _copy(model)

    def quant_points(self, observed):
        return [QuantPoint(n, m, n, "dynamic") for n, m in observed.named_modules() if isinstance(m, nn.Linear)]

    def reference(self, observed, points):
        return observed

    def convert(self, observed):
        quantized = _copy(observed)
        for name, module in list(quantized.named_modules()):
            config = self.plan.get(name) if self.plan is not None else None
            if isinstance(module, nn.Linear) and name not in self.skip and (config is None or config.dtype == "int8"):
                quantized.set_submodule(name, RoundedLinear(module))
        return quantized

    def find_layers(self, quantized, reference):
        rounded = [n for n, m in quantized.named_modules() if isinstance(m, RoundedLinear)]
        return rounded, [n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)]

    def default_plan(self, model, layers, left_float):
        return Plan(self.backend, {n: LayerConfig(dtype="float" if n in left_float else "int8") for n in layers})

    def check_plan(self, plan, modules):
        bad = [n for n, c in plan.items() if c.dtype not in ("int8", "float")]
        if bad:
            raise ConfigError(f"the rounding flow does int8 or float, not {', '.join(f'{plan[n].dtype} ({n})' for n in bad)}")

    def rebuild_layer(self, name: str, config, calibration: Calibration):
        float_layer = calibration.reference.get_submodule(name)
        return _copy(float_layer) if config.dtype == "float" else RoundedLinear(float_layer)

    @classmethod
    def plan_code(cls, plan, **options):
        return "\n".join(f"round_int8(model.{n})" for n, c in plan.items() if c.dtype == "int8")


def _copy(module):
    import copy

    return copy.deepcopy(module).eval()


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


DATA = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.fixture
def rounding():
    registry.register_flow(RoundingFlow)
    yield RoundingFlow
    registry.unregister_flow("rounding")


def _sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum()))


def test_an_outside_flow_runs_a_session_with_plain_torch_figures(rounding):
    model = TwoLinears()
    s = qviz.Session(model, DATA, flow="rounding", progress=False).run()
    table = s.to_dataframe()
    assert list(table.index) == ["fc1", "fc2"] and list(table["type"]) == ["RoundedLinear"] * 2
    with torch.no_grad():  # the same rounding in plain torch, on the eval batch (calib_data[0])
        plain = TwoLinears()
        for layer in (plain.fc1, plain.fc2):
            scale = layer.weight.abs().amax(dim=1, keepdim=True) / 127
            layer.weight.copy_((layer.weight / scale).round().clamp(-127, 127) * scale)
        expected = _sqnr(model(DATA[0]), plain(DATA[0]))
    assert s.summary()["output_sqnr"] == pytest.approx(expected, abs=0.01)
    assert s.results.meta["flow"] == "rounding"
    assert s.plan.to_code("rounding") == "round_int8(model.fc1)\nround_int8(model.fc2)"


def test_an_outside_flow_edits_live_as_a_fresh_build_would(rounding):
    live = qviz.Session(TwoLinears(), DATA, flow="rounding", progress=False).run()
    assert live.choices("fc1", "dtype", ("int8", "int4", "float")) == ("int8", "float")
    live.apply({"fc1": {"dtype": "float"}})
    with pytest.warns(UserWarning, match="stayed float.*fc1"):
        scratch = qviz.Session(TwoLinears(), DATA, flow="rounding", plan=live.plan, progress=False).run()
    assert not live.to_dataframe().loc["fc1", "quantized"]
    assert live.summary()["output_sqnr"] == pytest.approx(scratch.summary()["output_sqnr"], abs=1e-6)
    with pytest.raises(ConfigError, match="does int8 or float"):
        live.apply({"fc2": {"dtype": "int4"}})
    live.undo()
    assert live.to_dataframe().loc["fc1", "quantized"]


def test_an_outside_flow_takes_its_options_and_refuses_unknown_ones(rounding):
    with pytest.warns(UserWarning, match="stayed float.*fc2"):
        s = qviz.Session(TwoLinears(), DATA, flow="rounding", flow_options={"skip": ("fc2",)}, progress=False).run()
    assert list(s.to_dataframe().index[s.to_dataframe()["quantized"].astype(bool)]) == ["fc1"]
    with pytest.raises(ConfigError, match="has no option 'bits'.*'skip'"):
        qviz.Session(TwoLinears(), DATA, flow="rounding", flow_options={"bits": 4}, progress=False)


def test_the_cli_offers_registered_flows(rounding):
    demo = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                if a.dest == "flow")
    assert "rounding" in demo.choices and "int8 weight rounding (a plug-in)" in demo.help
    assert set(registry.flow_names()) >= {"fx", "eager", "dynamic", "pt2e", "torchao", "rounding"}


def test_entry_points_register_flows_and_a_broken_one_is_skipped_with_a_warning(monkeypatch):
    class EntryFlow(RoundingFlow):
        name = "from_entry_point"

    points = [importlib.metadata.EntryPoint("from_entry_point", f"{__name__}:EntryFlow", registry.ENTRY_POINT_GROUP),
              importlib.metadata.EntryPoint("broken", "no_such_module_anywhere:Flow", registry.ENTRY_POINT_GROUP)]
    globals()["EntryFlow"] = EntryFlow
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [p for p in points if p.group == group])
    monkeypatch.setattr(registry, "_entry_points_read", False)
    try:
        with pytest.warns(UserWarning, match="'broken'.*skipped"):
            assert registry.flow_class("from_entry_point") is EntryFlow
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert "from_entry_point" in registry.flow_names()  # read once: no second warning
    finally:
        registry.unregister_flow("from_entry_point")
        del globals()["EntryFlow"]


def test_the_registry_refuses_what_is_no_flow():
    with pytest.raises(ConfigError, match="unknown flow 'nope': choose one of 'fx'"):
        registry.flow_class("nope")
    with pytest.raises(ConfigError, match="subclass of qviz.flows.base.Flow"):
        registry.register_flow(dict)

    class Clash(RoundingFlow):
        name = "fx"

    with pytest.raises(ConfigError, match="'fx' is registered already"):
        registry.register_flow(Clash)
    with pytest.raises(ConfigError, match="built-in"):
        registry.unregister_flow("fx")


def test_every_built_in_flow_implements_the_protocol():
    for name in ("fx", "eager", "dynamic", "pt2e", "torchao"):
        cls = registry.flow_class(name)
        assert issubclass(cls, Flow) and cls.name == name and not getattr(cls, "__abstractmethods__", None)
        assert cls.summary and cls.quantizes

"""The PT2E flow: ``torch.export`` + ``prepare_pt2e`` / ``convert_pt2e`` from torchao under
X86InductorQuantizer by default (``Session(..., flow="pt2e", quantizer=...)`` takes your own); how
layers are found in the exported graph and measured through taps is :mod:`qviz.flows.pt2e.graph`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qviz.errors import ConfigError
from qviz.flows.base import (
    Calibration,
    Flow,
    QuantPoint,
    Reconversion,
    call_model,
    check_backend,
    neutral_reference,
)
from qviz.flows.layers import is_quant_point
from qviz.flows.pt2e.codegen import pt2e_code
from qviz.flows.pt2e.graph import (
    Group,
    default_quantizer,
    export_model,
    fetch,
    find_groups,
    insert_taps,
    is_pt2e_prepared,
    module_path,
    output_notes,
    prepare_graph,
    shared_layers,
    torchao_pt2e,
)
from qviz.flows.torch_ao.rebuild import activation_qparams, fix_qparams
from qviz.flows.torchao.flow import quiet_torchao
from qviz.flows.tracing import one_trace_at_a_time
from qviz.plan import LayerConfig, Plan


class Pt2eFlow(Flow):
    """``flow="pt2e"``: export, prepare_pt2e under a quantizer, calibrate, convert_pt2e."""

    name = "pt2e"
    summary = "torch.export + a Quantizer"
    quantizes = "linear and conv ops (X86InductorQuantizer's default config)"
    session_options = {"quantizer": "quantizer"}
    sensitivity_by = "re-conversion"  # a graph has no layer modules to swap
    ladder = ("int8", "float")  # what X86InductorQuantizer runs: the mixed-precision search's rungs
    editable = {"dtype": ("int8", "float"), "reduce_range": None}  # plan fields it honours (see check_plan)

    def __init__(self, backend: str = "x86", quantizer=None):
        torchao_pt2e()  # fail early, with the install hint
        self.backend = check_backend(backend)
        self.quantizer = quantizer
        self.plan = None
        self.groups: list[Group] = []
        self._notes: dict[str, str] = {}
        self._exported = None
        self._model = None

    def _quantizer(self, plan):
        if plan is None:
            return self.quantizer or default_quantizer()
        self.check_plan(plan, {})
        # only layers off the global config are named: X86InductorQuantizer annotates a graph with
        # module-name configs differently (pooling, flatten) even when they equal the global one
        return default_quantizer(
            {
                n: "float" if c.dtype == "float" else True
                for n, c in plan.items()
                if c.dtype == "float" or c.reduce_range
            }
        )

    @property
    def owns_configs(self) -> bool:
        return self.quantizer is None

    def default_plan(self, model: nn.Module, layers: list[str], left_float: list[str]) -> Plan:
        """What X86InductorQuantizer's default config does: int8, per-channel symmetric weights,
        histogram activations, full 8-bit range. The ops of one module ("fc", "fc#1") form one
        plan group: the quantizer configures them together, by module name (int8 when it
        quantized any of them: X86InductorQuantizer leaves a shared Linear's first call float)."""
        groups = shared_layers(self.groups)
        members = {m for g in groups for m in g[1:]}
        float_keys = set(left_float) - {g[0] for g in groups if not set(g) <= set(left_float)}
        return Plan(
            self.backend,
            {
                n: LayerConfig(dtype="float" if n in float_keys else "int8", reduce_range=False)
                for n in layers
                if n not in members
            },
            groups,
        )

    def check_plan(self, plan: Plan, modules: dict) -> None:
        """Refuse what the default X86InductorQuantizer cannot express per module name."""
        default, ops = LayerConfig(), {g.layer: g for g in self.groups}
        problems, other = [], []
        for name, config in plan.items():
            if config.dtype == "float":
                continue
            if name in ops and not ops[name].quantizable:
                other.append(
                    f"layer {name!r} runs {ops[name].op} ({ops[name].module_class.__name__ if ops[name].module_class else 'a functional op'}), "
                    "which X86InductorQuantizer leaves float (it quantizes conv and linear): keep it 'float'"
                )
                continue
            extra = [
                f
                for f in (
                    "dtype",
                    "weight",
                    "weight_symmetric",
                    "activation",
                    "activation_symmetric",
                )
                if getattr(config, f) != getattr(default, f)
            ]
            if extra:
                problems.append(
                    f"layer {name!r}: {', '.join(f'{f}={getattr(config, f)!r}' for f in extra)}"
                )
        for group in shared_layers(self.groups):
            configs = {plan[m] for m in group if m in plan}
            if len(configs) > 1:
                other.append(
                    f"layers {', '.join(map(repr, group))} are ops of one module, which the quantizer "
                    "configures by module name: give them the same config"
                )
        if other:
            raise ConfigError("; ".join(other))
        if problems:
            raise ConfigError(
                "flow 'pt2e' with X86InductorQuantizer takes dtype 'int8' (histogram activations, "
                "per-channel symmetric weights, reduce_range True or False) or 'float' per layer; "
                "not "
                + "; ".join(problems)
                + ". Pass your own quantizer (Session(..., quantizer=...)) "
                "for other schemes"
            )

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return is_pt2e_prepared(model)

    @one_trace_at_a_time
    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        self._model = model
        self._exported = export_model(model, example_inputs)
        observed = prepare_graph(self._exported, self._quantizer(self.plan), model)
        self.groups = find_groups(observed, model)
        if self.plan is not None:  # now that the layers are known (shared modules, op kinds)
            self.check_plan(self.plan, {})
        self._notes = output_notes(observed, self.groups)
        return observed

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        points, self.sources = self._map_points(observed)
        return points

    def _map_points(self, observed: nn.Module) -> tuple[list[QuantPoint], dict[str, frozenset]]:
        """One point per observer module (a SharedQuantizationSpec reuses one observer on several
        nodes: it is named and mapped by the first), mapped to the layer of the node it observes;
        and the names of the nodes each point observes."""
        outputs = {g.output: g.layer for g in self.groups}
        anchors = {g.nodes[0]: g.layer for g in self.groups}
        points, sources = {}, {}
        for node in observed.graph.nodes:
            if node.op != "call_module" or not is_quant_point(
                module := observed.get_submodule(node.target)
            ):
                continue
            source = node.args[0]
            sources.setdefault(id(module), set()).add(source.name)
            if id(module) in points:
                continue
            if source.op == "get_attr":
                users = [anchors[u.name] for u in node.users if u.name in anchors]
                layer, role = (users[0] if users else source.target), "weight"
            elif source.op == "placeholder":
                layer, role = source.name, "input"
            elif source.name in outputs:
                layer, role = outputs[source.name], "output"
            else:
                layer, role = module_path(source) or source.name, "output"
            points[id(module)] = QuantPoint(node.target, module, layer, role)
        return list(points.values()), {p.name: frozenset(sources[key]) for key, p in points.items()}

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return insert_taps(neutral_reference(observed, points), self.groups, reference=True)

    @one_trace_at_a_time
    def convert(self, observed: nn.Module) -> nn.Module:
        quantize_pt2e, _ = torchao_pt2e()
        with quiet_torchao():
            quantized = quantize_pt2e.convert_pt2e(copy.deepcopy(observed))
        return insert_taps(quantized, self.groups, reference=False, notes=self._notes)

    def find_layers(
        self, quantized: nn.Module, reference: nn.Module
    ) -> tuple[list[str], list[str]]:
        """(layers with an int8 weight, layers left float), in graph order."""
        layers = [g.layer for g in self.groups]
        done = [n for n in layers if getattr(quantized.get_submodule(n), "quantized", False)]
        return done, [n for n in layers if n not in done]

    def reconvert(self, target, changed: list[str], calibration: Calibration) -> Reconversion:
        return Reconversion(self._reconvert(target, calibration.records, calibration.initial, calibration.calib))

    @one_trace_at_a_time
    def _reconvert(self, plan, records: dict, initial: dict, calib: list) -> nn.Module:
        """prepare_pt2e under ``plan`` and convert_pt2e without calibrating again where possible.

        An observer watching the same nodes as one at calibration gets that observer's qparams
        (recomputed from its recorded statistics when reduce_range changed); weight observers see
        their weight. The quantizer may also place an observer that did not exist at calibration
        (e.g. X86InductorQuantizer quantizes a pooling op on its own once its producer is float):
        only then does one pass over ``calib`` run, and only those observers' results are used.
        """
        quantize_pt2e, _ = torchao_pt2e()
        observed = prepare_graph(self._exported, self._quantizer(plan), self._model)
        notes = output_notes(observed, self.groups)
        calibrated = {sources: name for name, sources in self.sources.items()}
        missing, (points, sources) = [], self._map_points(observed)
        for p in points:
            if p.role == "weight":
                source = next(
                    n for n in observed.graph.nodes if n.op == "call_module" and n.target == p.name
                )
                p.module(fetch(observed, source.args[0].target).detach())
                continue
            name = calibrated.get(sources[p.name])
            if name is None or "scale" not in initial.get(name, {}):
                missing.append(p)
                continue
            record = records[name]
            if (
                record.info.get("quant_max") == p.module.quant_max
            ):  # same range: the calibrated qparams
                scale, zero_point = (
                    float(initial[name]["scale"][0]),
                    int(initial[name]["zero_point"][0]),
                )
            else:  # reduce_range changed: the observer's algorithm replayed on the recorded statistics
                config = LayerConfig(reduce_range=p.module.quant_max == 127)
                scale, zero_point, _ = activation_qparams(record.stats, config, self.backend)
            fix_qparams(p.module, scale, zero_point)
        if missing:
            if not calib:
                raise ConfigError(
                    f"this plan needs observers qviz did not see at calibration ({', '.join(p.layer for p in missing)}); "
                    "build it from scratch with Session(model, data, flow='pt2e', plan=plan).run()"
                )
            with torch.no_grad():
                for batch in calib:
                    call_model(observed, batch)
        with quiet_torchao():
            quantized = quantize_pt2e.convert_pt2e(observed)
        return insert_taps(quantized, self.groups, reference=False, notes=notes)

    @classmethod
    def plan_code(cls, plan: Plan) -> str:
        """Plain torch + torchao code building the X86InductorQuantizer of ``plan``."""
        return pt2e_code(plan)

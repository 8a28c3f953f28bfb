"""The torch.ao flows' plan code: plain torch (no qviz) building the plan's qconfigs.

flow "fx": ``build_qconfig_mapping()`` returning a QConfigMapping; "eager": ``apply_qconfigs(model)``
setting ``.qconfig`` by module name; "dynamic": a ``qconfig_spec`` dict for ``quantize_dynamic``.
The code prints the specs of :func:`qviz.flows.torch_ao.qconfigs.plan_specs`, the same qconfigs
the flows build in process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qviz.flows.torch_ao.qconfigs import NamedQConfig, check_fixed, plan_specs, static_or_dynamic
from qviz.options import sample_text
from qviz.plan import LayerConfig, Plan


def plan_code(plan: Plan, flow: str, fixed_qparams: Mapping[str, tuple[float, int]] | None = None) -> str:
    """Runnable Python, importing torch only, that rebuilds ``plan``'s qconfigs for ``flow``
    ("fx", "eager" or "dynamic").

    Percentile activations need qviz's recorded histogram: pass ``fixed_qparams`` ({layer: (scale,
    zero_point)}, as qviz recorded them) to pin them with FixedQParamsObserver; otherwise the code
    uses a MinMaxObserver and says so. In FX, a layer whose input is not quantized yet (the model
    input, say) observes that input with its activation observer too, so a fixed observer pins the
    input's qparams as well.
    """
    qflow = static_or_dynamic(flow)
    fixed = check_fixed(plan, fixed_qparams, qflow)
    glob, specs = plan_specs(plan, qflow, fixed)
    return _CodeWriter(plan, flow, glob, specs, fixed).write()


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
        if isinstance(spec, NamedQConfig):
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
                f"# Percentile activations: {sample_text(unpinned)}. qviz clips these at a",
                "# percentile of its recorded histogram; without that data this code observes",
                "# them with a MinMaxObserver (full range). Pass fixed_qparams to qviz's",
                "# Plan.to_code to pin qviz's scale and zero point instead.",
            ]
        if self.fixed and self.flow == "fx":
            notes += [
                "#",
                f"# Pinned activation qparams: {sample_text(self.fixed)}. In FX, a layer whose input",
                "# is not quantized yet (e.g. the model input) pins that input's qparams too.",
            ]
        simulated = [n for n, c in layers.items() if c.simulated]
        if simulated:
            notes += [
                "#",
                f"# int4 (simulated): {sample_text(simulated)}. torch has no int4 conv/linear",
                "# kernel: these run int8 kernels restricted to the 4-bit range",
                "# (weights qint8 -8..7, activations quint8 0..15).",
            ]
        return notes

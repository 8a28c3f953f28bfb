"""What torch.ao's static flows (eager, FX) share: fusion groups found by an FX trace, the
default plan, and live edits that rebuild one layer from the statistics recorded at calibration."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.nn.intrinsic import _FusedModule

from qviz.flows.base import Calibration, Flow
from qviz.flows.torch_ao.rebuild import measured_inside, rebuild_static_layer, unwrapped
from qviz.flows.tracing import one_trace_at_a_time
from qviz.plan import Plan

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StaticFlow(Flow):
    """A torch.ao static flow: the backend's default plan with the model's fusion groups, and
    apply() rebuilding a changed layer with torch's ``from_float`` (see :mod:`.rebuild`)."""

    deprecated = True

    def default_plan(self, model: nn.Module, layers: list[str], left_float: list[str]) -> Plan:
        """The backend's default config for every layer, fused groups as the model's."""
        groups = tuple(g for g in detect_fusion_groups(model, warn=False) if g[0] in layers)
        return Plan.default(layers, self.backend, groups)

    def rebuild_layer(self, name: str, config, calibration: Calibration) -> nn.Module:
        return rebuild_static_layer(name, config, calibration)

    def measured_module(self, quantized: nn.Module, name: str) -> str:
        return measured_inside(quantized, name)

    def layer_type(self, quantized_layer: nn.Module, float_layer: nn.Module | None) -> str:
        return super().layer_type(unwrapped(quantized_layer), float_layer)


@one_trace_at_a_time
def detect_fusion_groups(model: nn.Module, warn: bool = True) -> list[list[str]]:
    """conv-bn(-relu), conv-relu, linear-relu and linear-bn chains, found by an FX trace.

    A module joins a chain only when it is the sole user of the previous module's output, so
    fusing never changes what the model computes. Modules inside a fused module the user made
    (``fuse_modules``: ConvReLU2d, ...) are fused already and left alone. Returns [] when FX
    cannot trace the model. A copy is traced: tracing runs forward, and a forward may assign
    to the model (a new ``self.relu``, say), which must not change the user's model.
    """
    model = copy.deepcopy(model)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure just means "no automatic fusion"
        if not warn:
            return []
        warnings.warn(
            "qviz could not trace the model to find fusion groups, so none were fused; pass "
            "fuse=[['conv', 'bn', 'relu'], ...] to Session to fuse them yourself",
            stacklevel=3,
        )
        return []
    modules = dict(model.named_modules())

    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    def sole_module_user(node, types):
        users = list(node.users)
        if len(users) == 1 and isinstance(module_of(users[0]), types):
            return users[0]
        return None

    groups = []
    for node in graph.nodes:
        first = module_of(node)
        if not isinstance(first, (*CONV, nn.Linear)) or _inside_fused(node.target, modules):
            continue
        chain = [node]
        bn = sole_module_user(node, BN)
        if bn is not None:
            chain.append(bn)
        relu = sole_module_user(chain[-1], nn.ReLU)
        if relu is not None:
            chain.append(relu)
        if len(chain) > 1:
            groups.append([n.target for n in chain])
    return groups


def _inside_fused(name: str, modules: dict[str, nn.Module]) -> bool:
    """True for 'conv1.0' when 'conv1' is a fused module (FX traces through those Sequentials)."""
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), _FusedModule) for i in range(1, len(parts)))

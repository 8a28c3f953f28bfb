"""FX graph mode: ``prepare_fx`` / ``convert_fx`` under a QConfigMapping, or a model the user
prepared with ``prepare_fx`` / ``prepare_qat_fx``.

FX names its observers ``activation_post_process_N``; each observes the node in its first
argument, so a point maps to the module that produced that node (fused groups are named by
their first module, as in the float model). Weight fake-quants of QAT modules sit inside the
module (``conv1.weight_fake_quant``).
"""

from __future__ import annotations

import copy
import traceback

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qviz.errors import ConfigError, ModelError
from qviz.flows.base import (
    QuantPoint,
    check_backend,
    is_quant_point,
    neutral_reference,
    parent_layer,
    positional,
    role_of_attribute,
)
from qviz.flows.eager import is_quant_point_child
from qviz.flows.tracing import one_trace_at_a_time


def is_fx_prepared(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and "_observed_graph_module_attrs" in model.meta


def _user_frame(exc: BaseException) -> str:
    """The last frame of the traceback outside torch: the user's line FX choked on."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/qviz/" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}(): `{(f.line or '').strip()}`"


class FxFlow:
    name = "fx"
    needs_calibration = True

    def __init__(self, backend: str = "x86", qconfig_mapping=None):
        self.backend = check_backend(backend)
        self.qconfig_mapping = qconfig_mapping
        self.handed_over = False

    @one_trace_at_a_time
    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        if is_fx_prepared(model):
            self.handed_over = True
            return copy.deepcopy(model).eval()
        mapping = self.qconfig_mapping or get_default_qconfig_mapping(self.backend)
        observed = copy.deepcopy(model).eval()
        try:
            return prepare_fx(observed, mapping, positional(model, example_inputs))
        except LookupError as exc:
            raise ConfigError(
                f"prepare_fx refused the QConfigMapping: {exc}. Modules fused together "
                "(conv-bn-relu, linear-relu) need the same qconfig: set it for the whole group"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - FX tracing fails with many exception types
            raise ModelError(
                f"FX could not trace {type(model).__name__}{_user_frame(exc)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                "Data-dependent control flow and non-tensor arguments stop symbolic tracing: "
                "use flow='eager' (with QuantStub/DeQuantStub) or flow='pt2e', or make that "
                "code traceable"
            ) from exc

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        points, seen = [], set()
        for node in observed.graph.nodes:
            if node.op != "call_module" or not is_quant_point(observed.get_submodule(node.target)):
                continue
            source = node.args[0]
            if source.op == "placeholder":
                layer, role = source.name, "input"
            elif source.op == "call_module":
                layer, role = source.target, "output"
            else:
                layer, role = source.name, "output"
            points.append(QuantPoint(node.target, observed.get_submodule(node.target), layer, role))
            seen.add(node.target)
        for name, module in observed.named_modules():  # weight fake-quants of QAT modules
            if name in seen or not is_quant_point(module) or is_quant_point_child(observed, name):
                continue
            layer, attr = parent_layer(name)
            points.append(QuantPoint(name, module, layer, role_of_attribute(attr) or "output"))
        return points

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return neutral_reference(observed, points)

    @one_trace_at_a_time
    def convert(self, observed: nn.Module) -> nn.Module:
        return convert_fx(copy.deepcopy(observed).eval())

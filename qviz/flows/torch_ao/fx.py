"""FX graph mode: ``prepare_fx`` / ``convert_fx`` under a QConfigMapping, or a model the user
prepared with ``prepare_fx`` / ``prepare_qat_fx``.

FX names its observers ``activation_post_process_N``; each observes the node in its first
argument, so a point maps to the module that produced that node (fused groups are named by
their first module, as in the float model). Weight fake-quants of QAT modules sit inside the
module (``conv1.weight_fake_quant``).

Functional layers (``F.linear`` / ``F.conv1d..3d`` on a module's parameters, as timm's ``Linear``
and many classifier heads are written) have no module in the traced graph. qviz makes each one a
module of its own, in the reference and in the converted model alike (:class:`FunctionalLayer`,
the op plus a ReLU fused into it), so that every quantized op is a row. Row names: the module
whose ``forward`` calls the op (``"head"``) when it calls one such op; otherwise
``"<module>.<op>#<i>"``, ``i`` counting that module's calls of that op from 0 (``"block.linear#1"``;
the model's own ``forward``: ``"linear#0"``), which is FX's ``set_module_name_object_type_order``
index, so a plan addresses exactly that call.
"""

from __future__ import annotations

import copy
import operator
import os
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (
    FixedQParamsObserver,
    ReuseInputObserver,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qviz.capture.probes import describe, probing
from qviz.errors import ConfigError, ModelError
from qviz.flows.base import (
    Calibration,
    QuantPoint,
    Reconversion,
    check_backend,
    neutral_reference,
    parent_layer,
    positional,
    role_of_attribute,
)
from qviz.flows.layers import is_quant_point
from qviz.flows.torch_ao import codegen, qconfigs
from qviz.flows.torch_ao.eager import is_quant_point_child
from qviz.flows.torch_ao.rebuild import (
    activation_qparams,
    fix_qparams,
    same_activation,
)
from qviz.flows.torch_ao.static import StaticFlow
from qviz.flows.tracing import one_trace_at_a_time
from qviz.plan import Plan, default_layer_config

_QVIZ_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # qviz/
_OWN_DIRS = (os.path.dirname(os.path.realpath(torch.__file__)) + os.sep, _QVIZ_DIR + os.sep)
WEIGHTED_OPS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}
OP_OF_KIND = {kind: op for op, kind in WEIGHTED_OPS.items()}
_EQUIVALENT = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_RELUS = (F.relu, torch.relu, torch.relu_, F.relu_)


def is_fx_prepared(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and "_observed_graph_module_attrs" in model.meta


def _user_frame(exc: BaseException) -> str:
    """The last frame of the traceback outside torch and qviz (their installed package
    directories): the user's line FX choked on."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.realpath(f.filename).startswith(_OWN_DIRS)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}(): `{(f.line or '').strip()}`"


def _check_module_names(model: nn.Module) -> None:
    """FX writes module names into generated Python: quotes and backslashes break that code."""
    for name, _ in model.named_modules():
        if any(c in name for c in '"\\\n\r'):
            raise ModelError(
                f"module name {name!r} contains a quote, backslash or line break, which FX cannot "
                "write into its generated code: rename that module (add_module with a plain name) "
                "or use flow='eager' or flow='pt2e'"
            )


# -- functional layers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FunctionalOp:
    """One call of a weighted functional op in the traced graph, and the row it becomes."""

    row: str  # the layer name (see the module docstring)
    owner: str  # the module whose forward calls it ("" for the model itself)
    kind: str  # "linear", "conv2d", ...
    index: int  # among the owner's calls of this op, in graph order (FX's object_type_order)
    node: str  # the op's node name, the same in the observed, reference and converted graphs


def _scope(observed: nn.Module) -> dict:
    attrs = observed.meta.get("_observed_graph_module_attrs")
    return getattr(attrs, "node_name_to_scope", None) or {}


def _source(gm: nn.Module, node):
    """The graph value behind ``node`` seen through observers and their no-op stand-ins."""
    while isinstance(node, torch.fx.Node) and node.op == "call_module" and (
        is_quant_point(m := gm.get_submodule(node.target)) or isinstance(m, nn.Identity)
    ):
        node = node.args[0]
    return node


def functional_ops(observed: nn.Module) -> dict[str, FunctionalOp]:
    """The weighted functional calls of a prepared graph whose weight comes from parameters or
    buffers alone, by node name, named as the module docstring says."""
    scope = _scope(observed)
    calls = []
    counts: dict[tuple[str, object], int] = {}
    for node in observed.graph.nodes:
        if node.op == "call_function" and node.target in WEIGHTED_OPS:
            owner = scope.get(node.name, ("", None))[0]
            index = counts.get((owner, node.target), 0)
            counts[(owner, node.target)] = index + 1
            try:
                constant_value(observed, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            except LookupError:
                continue  # a weight computed from the input: not a layer of parameters
            calls.append((owner, WEIGHTED_OPS[node.target], index, node.name))
    per_owner = {}
    for owner, *_ in calls:
        per_owner[owner] = per_owner.get(owner, 0) + 1
    ops = {}
    for owner, kind, index, name in calls:
        row = owner if owner and per_owner[owner] == 1 else f"{owner}.{kind}#{index}".lstrip(".")
        ops[name] = FunctionalOp(row, owner, kind, index, name)
    return ops


def _fused_relu(gm: nn.Module, node):
    """The ReLU applied to ``node``'s output alone (FX fuses it into the quantized op), or None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if (user.op == "call_function" and user.target in _RELUS) or (
        user.op == "call_method" and user.target in ("relu", "relu_")
    ) or (user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.ReLU)):
        return user
    return None


def _chain(gm: nn.Module, node) -> list:
    relu = _fused_relu(gm, node)
    return [node] if relu is None else [node, relu]


class _Input:
    """Marks where a :class:`FunctionalLayer` puts its input (and each step the previous result);
    one object, kept by copies and pickles (the layer finds it by identity)."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_IN"


_IN = _Input()


class FunctionalLayer(nn.Module):
    """A functional op of the float model (plus the ReLU FX fuses into it) as a module, so hooks,
    shadow runs and plans see it as a layer. ``steps`` are (node op, target, args, kwargs) with the
    graph's constants resolved and the running value marked by ``_IN``."""

    quantized = False

    def __init__(self, steps: list, kind: str):
        super().__init__()
        self.steps, self.kind = steps, kind
        fused = len(steps) > 1 or str(steps[0][1]).endswith("_relu")  # quantized::linear_relu
        self.layer_type = f"F.{kind}" + ("+relu" if fused else "")
        self.equivalent = _EQUIVALENT[kind]  # the module class whose plan rules apply
        if not self.quantized:
            args, kwargs = steps[0][2], steps[0][3]
            self.weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.bias = bias if isinstance(bias, torch.Tensor) else None

    def forward(self, x):
        for node_op, target, args, kwargs in self.steps:
            args = tuple(x if a is _IN else a for a in args)
            x = getattr(args[0], target)(*args[1:], **kwargs) if node_op == "call_method" else target(*args, **kwargs)
        return x


class QuantizedFunctionalLayer(FunctionalLayer):
    """The converted op (``quantized::linear(x, packed, scale, zero_point)``, ...) as a module."""

    quantized = True

    def weight(self) -> torch.Tensor:
        """The quantized weight, unpacked (weight_sqnr and the weight's qparams come from it)."""
        packed = next(a for a in self.steps[0][2] if isinstance(a, torch._C.ScriptObject))
        return torch.ops.quantized.linear_unpack(packed)[0] if self.kind == "linear" else packed.unpack()[0]

    @property
    def scale(self) -> float:
        return float(self.steps[0][2][2])

    @property
    def zero_point(self) -> int:
        return int(self.steps[0][2][3])


def constant_value(gm: nn.Module, node):
    """A graph argument that does not depend on the model's inputs (a parameter, or a weight
    computed from parameters as timm's StdConv2d does), as the object it stands for; LookupError
    for one that does."""
    if isinstance(node, (tuple, list)):
        return type(node)(constant_value(gm, n) for n in node)
    if isinstance(node, dict):
        return {k: constant_value(gm, v) for k, v in node.items()}
    if not isinstance(node, torch.fx.Node):
        return node
    node = _source(gm, node)
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    if node.op not in ("call_function", "call_method"):
        raise LookupError(node.name)
    args, kwargs = constant_value(gm, node.args), constant_value(gm, node.kwargs)
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _install(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, making parent containers as needed; a container already at
    ``path`` (FX's holder of get_attr targets) hands its children over."""
    owner = gm
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    old = owner._modules.get(parts[-1])
    if old is not None:
        for attr in ("_parameters", "_buffers", "_modules"):
            for k, v in getattr(old, attr).items():
                if k not in module.__dict__ and k not in getattr(module, attr):
                    getattr(module, attr)[k] = v
    owner._modules[parts[-1]] = module


def wrap_functional(gm: torch.fx.GraphModule, ops: dict[str, FunctionalOp]) -> torch.fx.GraphModule:
    """Replace each op of ``ops`` found in ``gm`` (by node name) with a call of a
    :class:`FunctionalLayer` at its row name; ops whose arguments depend on data stay as they are."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, op in ops.items():
        node = nodes.get(name)
        if node is None:
            continue
        chain = _chain(gm, node)
        quantized = not (node.op == "call_function" and node.target in WEIGHTED_OPS)
        try:
            steps = []
            for i, step in enumerate(chain):
                target = gm.get_submodule(step.target) if step.op == "call_module" else step.target
                first = node.args[0] if i == 0 else chain[i - 1]
                args = tuple(_IN if a is first else constant_value(gm, a) for a in step.args)
                if _IN not in args:
                    raise LookupError(step.name)
                steps.append((step.op, target, args, {k: constant_value(gm, v) for k, v in step.kwargs.items()}))
        except LookupError:
            continue
        layer = QuantizedFunctionalLayer if quantized else FunctionalLayer
        _install(gm, op.row, layer(steps, op.kind))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(op.row, (node.args[0],))
        call.meta = dict(node.meta)
        chain[-1].replace_all_uses_with(call)
        for step in reversed(chain):
            gm.graph.erase_node(step)
    gm.graph.lint()
    gm.recompile()
    return gm


def observed_nodes(observed: nn.Module) -> dict[str, str]:
    """Each graph observer's name -> the node it observes (stable across prepares of one model)."""
    return {n.target: n.args[0].name for n in observed.graph.nodes
            if n.op == "call_module" and is_quant_point(observed.get_submodule(n.target))}


def _code_line(node) -> str:
    """'model.py:12: `return x * mask`': the user's frame in the node's stack trace, or ''."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(ln.strip().split('"'), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i, ln in enumerate(lines) if ln.strip().startswith('File "')]
    frames = [(head, code) for head, code in frames
              if len(head) > 2 and not os.path.realpath(head[1]).startswith(_OWN_DIRS)]
    if not frames:
        return ""
    (_, path, rest, *_), code = frames[-1]
    return f"{os.path.basename(path)}:{rest.split(',')[1].split()[-1]}: `{code}`"


def _op_literal(gm: nn.Module, node) -> tuple[str, str]:
    """(the op in the user's terms, the QConfigMapping call that leaves it float)."""
    if node.op == "call_module":
        return (f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})",
                f"qconfig_mapping.set_module_name({node.target!r}, None)")
    if node.op == "call_method":
        return f"the method `.{node.target}()`", f"qconfig_mapping.set_object_type({node.target!r}, None)"
    module = getattr(node.target, "__module__", None) or "torch"
    module = "operator" if module == "_operator" else module
    name = f"{module}.{getattr(node.target, '__name__', node.target)}"
    return f"`{name}`", f"qconfig_mapping.set_object_type({name}, None)"


def _origin(observed: nn.Module, observer, scope: dict) -> tuple[str, str]:
    """Where a graph observer sits in the user's terms (the value, the op taking it, its module
    and line of code), and the QConfigMapping call that leaves that op float."""
    source = observer.args[0]
    value = (f"the model input `{source.name}`" if source.op == "placeholder"
             else f"the output of {_op_literal(observed, source)[0]}" if source.op != "get_attr"
             else f"the parameter `{source.target}`")
    users = [u for u in observer.users if u.op in ("call_function", "call_method", "call_module")]
    if not users:
        return value, ""
    op, fix = _op_literal(observed, users[0])
    owner, owner_type = scope.get(users[0].name, ("", None))
    where = f" in module {owner!r} ({owner_type.__name__})" if owner and owner_type else ""
    line = _code_line(users[0])
    return f"{value} going into {op}{where}" + (f" at {line}" if line else ""), fix


class FxFlow(StaticFlow):
    """``prepare_fx`` / calibrate / ``convert_fx`` under a QConfigMapping (the user's, the
    backend's default or a plan's), functional linear/conv calls included as layers."""

    name = "fx"
    summary = "prepare_fx / convert_fx under a QConfigMapping"
    quantizes = ("nn.Linear, nn.Conv1d/2d/3d (with a following BatchNorm/ReLU), nn.ConvTranspose "
                 "and functional linear/conv on the model's parameters")
    session_options = {"qconfig_mapping": "qconfig_mapping"}

    def __init__(self, backend: str = "x86", qconfig_mapping=None):
        self.backend = check_backend(backend)
        self.qconfig_mapping = qconfig_mapping
        self.functional: dict[str, FunctionalOp] = {}  # row name -> op, set at prepare
        self.layer_subclasses: set[str] = set()  # set at prepare, see find_layers

    def plan_mapping(self, plan):
        """The plan as a QConfigMapping that addresses this model's functional rows exactly."""
        return plan_qconfig_mapping(plan, self.functional)

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return is_fx_prepared(model)

    @one_trace_at_a_time
    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        if self.recognises(model):
            self.handed_over = True
            observed = copy.deepcopy(model).eval()
            self.functional = {op.row: op for op in functional_ops(observed).values()}
            return observed
        _check_module_names(model)
        self.layer_subclasses = _torch_layer_subclasses(model)
        if self.plan is not None:  # the functional rows' names come from a trace first
            self.functional = {op.row: op for op in functional_ops(
                self._prepare(model, torch.ao.quantization.QConfigMapping(), example_inputs)).values()}
            mapping = self.plan_mapping(self.plan)
        else:
            mapping = self.qconfig_mapping or get_default_qconfig_mapping(self.backend)
        observed = self._prepare(model, mapping, example_inputs)
        self.functional = {op.row: op for op in functional_ops(observed).values()}
        return observed

    def _prepare(self, model: nn.Module, mapping, example_inputs: tuple) -> nn.Module:
        try:
            return prepare_fx(copy.deepcopy(model).eval(), mapping, positional(model, example_inputs))
        except LookupError as exc:
            raise ConfigError(
                f"prepare_fx refused the QConfigMapping: {exc}. Modules fused together "
                "(conv-bn-relu, linear-relu) need the same qconfig: set it for the whole group"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - FX tracing fails with many exception types
            raise ModelError(
                f"FX could not trace {type(model).__name__}{_user_frame(exc)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                "Data-dependent control flow and non-tensor arguments stop symbolic tracing, "
                "and Hugging Face transformers are not traceable by prepare_fx: use flow='eager' "
                "(with QuantStub/DeQuantStub), or flow='pt2e', 'torchao' or 'dynamic', which "
                "take such models, or make that code traceable"
            ) from exc

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        ops = functional_ops(observed)
        rows = {_chain(observed, node)[-1].name: op.row
                for node in observed.graph.nodes if (op := ops.get(node.name)) is not None}
        weights = {_first_observer(observed, node): op.row for node in observed.graph.nodes
                   if (op := ops.get(node.name)) is not None}
        scope = _scope(observed)
        points, seen = [], set()
        for node in observed.graph.nodes:
            if node.op != "call_module" or not is_quant_point(observed.get_submodule(node.target)):
                continue
            source = node.args[0]
            if node.name in weights:
                layer, role = weights[node.name], "weight"
            elif source.name in rows:
                layer, role = rows[source.name], "output"
            elif source.op == "placeholder":
                layer, role = source.name, "input"
            elif source.op == "call_module":
                layer, role = source.target, "output"
            else:
                layer, role = source.name, "output"
            origin, fix = _origin(observed, node, scope)
            points.append(QuantPoint(node.target, observed.get_submodule(node.target), layer, role, origin, fix))
            seen.add(node.target)
        for name, module in observed.named_modules():  # weight fake-quants of QAT modules
            if name in seen or not is_quant_point(module) or is_quant_point_child(observed, name):
                continue
            layer, attr = parent_layer(name)
            points.append(QuantPoint(name, module, layer, role_of_attribute(attr) or "output"))
        return points

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        reference = neutral_reference(observed, points)
        reference.meta["qviz_observed_nodes"] = observed_nodes(observed)  # for re-conversion
        return wrap_functional(reference, functional_ops(observed))

    @one_trace_at_a_time
    def convert(self, observed: nn.Module) -> nn.Module:
        return wrap_functional(convert_fx(copy.deepcopy(observed).eval()), functional_ops(observed))

    def find_layers(self, quantized: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
        """Module layers as everywhere plus the functional rows. FX's bare holders of get_attr
        targets are left out, except those of a torch layer subclass whose ops stay float
        (timm's BatchNormAct2d calling F.batch_norm): that is a float row."""
        from qviz.flows.layers import find_layers

        layers, left_float = find_layers(quantized, reference)
        functional = {n: m for n, m in quantized.named_modules() if isinstance(m, FunctionalLayer)}

        def module_row(name):
            bare = type(quantized.get_submodule(name)) is nn.Module
            return name not in functional and (not bare or name in self.layer_subclasses)

        return ([n for n in layers if module_row(n)] + [n for n, m in functional.items() if m.quantized],
                [n for n in left_float if module_row(n)] + [n for n, m in functional.items() if not m.quantized])

    def check_plan(self, plan, modules: dict) -> None:
        """The plan's rules for a functional row are those of the module it stands for."""
        qconfigs.check_plan(plan, {n: m.equivalent if isinstance(m, FunctionalLayer) else m
                                   for n, m in modules.items()})

    @classmethod
    def plan_code(cls, plan, fixed_qparams=None) -> str:
        """Plain torch code: ``build_qconfig_mapping()`` returning the plan's QConfigMapping for
        ``prepare_fx``; ``fixed_qparams`` ({layer: (scale, zero_point)}) pins percentile layers."""
        return codegen.plan_code(plan, cls.name, fixed_qparams)

    @property
    def owns_configs(self) -> bool:
        return self.qconfig_mapping is None and not self.handed_over


    def reconvert(self, target, changed: list[str], calibration: Calibration) -> Reconversion:
        """Changed layers rebuilt in place, unless the graph itself changes: FX decides where
        quantize/dequantize go around float layers, and functional layers have no module to
        swap, so then the whole model is prepared and converted again (:meth:`_reconvert_graph`)."""
        structural = any(
            (target[n].dtype == "float") != (calibration.plan[n].dtype == "float")
            or isinstance(calibration.reference.get_submodule(n), FunctionalLayer) for n in changed
        )
        if not structural:
            return super().reconvert(target, changed, calibration)
        return Reconversion(self._reconvert_graph(target, calibration))

    @one_trace_at_a_time
    def _reconvert_graph(self, target, calibration: Calibration) -> nn.Module:
        """prepare_fx under ``target`` and convert, qparams set without calibration data where
        possible. A point observing a value computed from parameters alone (a functional layer's
        weight, a layer-scale parameter) observes it now; the others are matched with
        calibration's by the node they observe (stable across prepares of one model) and get
        qparams from the statistics recorded there. Points new to this graph (a layer that was
        float at calibration makes FX observe its input, say) are calibrated in one pass over
        calib_data, with a warning naming them in the user's terms."""
        model, reference, records, initial = (calibration.model, calibration.reference, calibration.records,
                                              calibration.initial)
        observed = prepare_fx(copy.deepcopy(model).eval(), self.plan_mapping(target),
                              positional(model, calibration.example))
        recorded = {}
        for point, node in reference.meta.get("qviz_observed_nodes", {}).items():
            record = records.get(point)
            if record is not None and record.role in ("output", "input"):
                recorded.setdefault(node, record)
        points = {p.name: p for p in self.quant_points(observed)}
        default = default_layer_config(self.backend)
        new = []
        for node in observed.graph.nodes:
            p = points.get(node.target) if node.op == "call_module" else None
            if p is None:
                continue
            source = node.args[0]
            try:
                constant = constant_value(observed, source)
            except LookupError:
                constant = None  # data flows into it
            if isinstance(constant, torch.Tensor):  # a weight or other parameter-only value
                p.module(constant)
                continue
            record = recorded.get(source.name)
            if record is None:
                new.append(p)
                continue
            config = target.get(p.layer) if p.layer in target else default
            config = default if config.dtype == "float" else config
            run_config = calibration.run_plan.get(p.layer) if p.layer in calibration.run_plan else default
            start = initial.get(record.name, {})
            if "scale" in start and same_activation(config, run_config) and (
                type(p.module).__name__ == record.info.get("observer")
            ):
                scale, zero_point = float(start["scale"][0]), int(start["zero_point"][0])
            else:
                scale, zero_point, _ = activation_qparams(record.stats, config, self.backend)
            fix_qparams(p.module, scale, zero_point)
        if new:
            _calibrate_new_points(observed, new, calibration)
        return self.convert(observed)


def _calibrate_new_points(observed: nn.Module, new: list[QuantPoint], calibration: Calibration) -> None:
    """One pass over calib_data for points that calibration did not have; their records join
    the session's (named '<point>@<observed node>'), so later re-conversions reuse them."""
    observes = observed_nodes(observed)
    with probing(new) as records, torch.no_grad():
        for i, batch in enumerate(calibration.calib):
            calibration.run_batch(observed, batch, i)
    known = calibration.reference.meta.setdefault("qviz_observed_nodes", {})
    for p in new:
        record = describe(records[p.name], p.module)
        record.name = f"{p.name}@{observes[p.name]}"
        calibration.records[record.name] = record
        calibration.initial[record.name] = dict(record.arrays)
        known[record.name] = observes[p.name]
    warnings.warn(  # no "quantiz"/"observer" in the text: quiet_torch() would hide it
        f"under the new plan, {len(new)} value(s) that calibration did not see need qparams "
        f"({'; '.join(p.origin for p in new[:3])}{'; ...' if len(new) > 3 else ''}): qviz "
        "ran one pass over calib_data for them",
        stacklevel=6,
    )


def _torch_layer_subclasses(model: nn.Module) -> set[str]:
    """Modules of the user's classes built on a torch layer (not a container): FX traces
    through them, leaving bare holders that still stand for a layer."""
    def torch_layer(cls):
        return (cls.__module__.startswith("torch.nn.modules.")
                and cls.__module__ != "torch.nn.modules.container" and cls is not nn.Module)

    return {name for name, m in model.named_modules()
            if not torch_layer(type(m)) and any(torch_layer(c) for c in type(m).__mro__[1:])}


def _first_observer(observed: nn.Module, node) -> str | None:
    """The name of the observer node on a functional op's weight argument."""
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return arg.name if isinstance(arg, torch.fx.Node) and arg.op == "call_module" else None


def plan_qconfig_mapping(plan: Plan, functional: dict | None = None):
    """The plan as an FX ``QConfigMapping`` in which fused groups share their key's qconfig and
    the ops whose qparams the backend fixes or reuses (sigmoid, tanh, reshape, ...) keep them, as
    in ``get_default_qconfig_mapping``, so re-conversions build the first conversion's graph.

    ``functional`` (row name -> :class:`qviz.flows.torch_ao.fx.FunctionalOp`): a row named by its module
    (``"head"``) is that module, everything inside it, as for any module name; rows inside it
    get entries of their own. A row ``"block.linear#1"`` is that one call
    (``set_module_name_object_type_order``), not the other ops of ``block``."""
    mapping = qconfigs.qconfig_mapping(plan)
    if mapping.global_qconfig is not None:  # ops whose output qparams are fixed or reused, as
        for op, qconfig in get_default_qconfig_mapping(plan.backend).object_type_qconfigs.items():
            observer = getattr(qconfig.activation, "func", qconfig.activation)  # the backend's
            if observer in (FixedQParamsObserver, ReuseInputObserver):  # own mapping has them
                mapping.set_object_type(op, qconfig)
    named = dict(mapping.module_name_qconfigs)
    for group in plan.groups:
        if group[0] in named:
            for member in group[1:]:
                mapping.set_module_name(member, named[group[0]])
    default = mapping.global_qconfig
    for row, op in (functional or {}).items():
        if row != op.owner:  # "block.linear#1": that call alone
            qconfig = mapping.module_name_qconfigs.pop(row, default)
            mapping.set_module_name_object_type_order(op.owner, OP_OF_KIND[op.kind], op.index, qconfig)
    owners = [n for n in mapping.module_name_qconfigs if n in (functional or {})]
    for name in plan:  # a module row's qconfig reaches inside it: rows there keep their own
        if name not in mapping.module_name_qconfigs and any(name.startswith(f"{o}.") for o in owners):
            mapping.set_module_name(name, default)
    return mapping

"""PT2E graphs: export, prepare under a quantizer, find the layers, measure them through taps.

An exported graph has no layer modules: a conv is an ``aten.conv2d`` node reading a weight
attribute. qviz finds each weighted op (conv/linear, and the addmm/mm of e.g. transformers'
Conv1D, which X86InductorQuantizer leaves float, whose weight is a ``get_attr``) and names the
layer by the float model's module owning that weight (``stem_conv.weight`` -> ``stem_conv``); a
further op of the same module (a shared module called again) is ``<module>#<k>``, k = 1, 2, ... A
layer's *group* is its op plus the epilogue the quantizer fuses with it (BN is folded by
prepare; relu, add, ...), up to the first observed node. Observers map to layers through the
node they observe (a group output, a weight, a placeholder, or another op named by its
``nn_module_stack``).

The bridge to :mod:`qviz.analysis.compare` (which hooks modules by name): after each group's
output node, :func:`insert_taps` adds a *tap* submodule called by the layer's name, taking
``(output, *group inputs)``. In the quantized graph the tap returns the output and carries the
int8 weight read back from the converted graph's dequantize of the frozen weight. In the float
reference (the observed graph with observers made Identity, so BN is folded like the quantized
one) the tap recomputes the group in float from its inputs: in place that equals the output, and
the comparator's shadow call (the reference layer fed the quantized model's inputs) gives
``local_sqnr``. Taps sit before the output's quantize node, where torchao's numeric debugger logs
the same node: the output's own rounding shows in the next layer's numbers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import traceback

import torch
import torch.utils._pytree as pytree
from torch import nn

from qviz.errors import ConfigError, ModelError
from qviz.flows.base import (
    QuantPoint,
    split_batch,
)
from qviz.flows.layers import is_quant_point
from qviz.flows.torchao.flow import quiet_torchao
from qviz.flows.tracing import one_trace_at_a_time

INSTALL_HINT = 'flow="pt2e" needs torchao (PT2E lives in torchao.quantization.pt2e): pip install "qviz[torchao]"'
_EPILOGUE = (
    "relu",
    "relu_",
    "add",
    "add_",
    "hardtanh",
    "hardtanh_",
    "relu6",
    "gelu",
    "silu",
    "silu_",
    "hardswish",
    "hardswish_",
    "sigmoid",
)


def torchao_pt2e():
    """(quantize_pt2e module, x86_inductor_quantizer module), or ConfigError saying what to install."""
    try:
        with quiet_torchao():
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc
    return quantize_pt2e, x86_inductor_quantizer


def default_quantizer(layer_configs: dict | None = None):
    """X86InductorQuantizer with the default static config; ``layer_configs`` maps module names to
    "float" (left float: a None config) or the reduce_range flag, set with ``set_module_name_qconfig``."""
    _, x86 = torchao_pt2e()
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config()
    )
    for name, choice in (layer_configs or {}).items():
        config = (
            None
            if choice == "float"
            else x86.get_default_x86_inductor_quantization_config(reduce_range=choice)
        )
        quantizer.set_module_name_qconfig(name, config)
    return quantizer


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict):
    """``dynamic_shapes`` with dim 0 of every tensor input dynamic, keyed by the parameter names of
    ``model.forward`` (torch.export matches the signature: a ``*args`` parameter takes a tuple)."""

    def spec(a):
        return {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None

    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # no Python signature, or one that takes no positional inputs
        if kwargs:
            raise
        return tuple(spec(a) for a in args)
    kinds = {name: signature.parameters[name].kind for name in bound}
    return {
        name: tuple(spec(a) for a in value) if kinds[name] is inspect.Parameter.VAR_POSITIONAL
        else {k: spec(v) for k, v in value.items()} if kinds[name] is inspect.Parameter.VAR_KEYWORD
        else spec(value)
        for name, value in bound.items()
    }


def _check_names(model: nn.Module) -> None:
    """torch.export's code generation writes attribute names into double-quoted strings unescaped:
    a name holding ``"``, a backslash or a line break fails deep inside export; say so first."""
    names = [
        n
        for named in (model.named_modules(), model.named_parameters(), model.named_buffers())
        for n, _ in named
        if '"' in n or "\\" in n or not n.isprintable()
    ]
    if names:
        raise ModelError(
            f"torch.export cannot export {type(model).__name__}: the names {', '.join(map(repr, names[:5]))} "
            "hold characters its generated code cannot quote (\", \\, line breaks). Rename them "
            "(add_module / register_parameter with letters, digits and _), or use flow='torchao', "
            "which does not generate code"
        )


@one_trace_at_a_time
def export_model(model: nn.Module, example) -> torch.fx.GraphModule:
    """``torch.export`` of a deep copy with dim 0 of every tensor input dynamic; the unlifted module,
    dead code removed (an unused output such as BertModel's pooler would leave torchao's
    X86InductorQuantizer a fusion pattern without output and an IndexError). ``example`` is a
    batch (tensor, tuple, or mapping of keyword inputs)."""
    _check_names(model)
    args, kwargs = split_batch(example)

    def double(a):  # a batch of 1 would be specialised
        return torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 else a

    args, kwargs = tuple(map(double, args)), {k: double(v) for k, v in kwargs.items()}
    copied = copy.deepcopy(model).eval()
    if getattr(getattr(copied, "config", None), "use_cache", False):
        copied.config.use_cache = False  # a Hugging Face KV cache (DynamicCache) is not exportable
    try:
        with quiet_torchao():
            exported = torch.export.export(
                copied, args, kwargs=kwargs, dynamic_shapes=_dynamic_batch(model, args, kwargs)
            ).module()
    except Exception as exc:  # noqa: BLE001 - export fails with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"torch.export could not export {type(model).__name__}: {type(exc).__name__}: {first}. "
            "Data-dependent control flow, non-tensor outputs and Python side effects stop export: "
            "rewrite that code with torch.cond / tensor ops (see torch.export's error above), or "
            "use flow='fx' or flow='eager'"
        ) from exc
    exported.graph.eliminate_dead_code()
    exported.recompile()
    return exported


def reused_modules(graph: torch.fx.Graph, model: nn.Module) -> dict[str, int]:
    """Modules without parameters that the exported graph calls more than once: {path: calls}
    (torch.export marks the k-th further call of a module ``@k`` in ``nn_module_stack``)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            _, at, k = key.rpartition("@")
            calls[path] = max(calls.get(path, 1), int(k) + 1 if at and k.isdigit() else 1)
    reused = {}
    for path, n in calls.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if n > 1 and path and next(module.parameters(), None) is None:
            reused[path] = n
    return reused


def prepare_graph(exported: torch.fx.GraphModule, quantizer, model: nn.Module) -> torch.fx.GraphModule:
    """``prepare_pt2e`` on a copy of ``exported``; a quantizer failing inside torchao becomes a
    ModelError saying what happened and what to change (plain prepare_pt2e fails the same way)."""
    quantize_pt2e, _ = torchao_pt2e()
    try:
        with quiet_torchao():
            return quantize_pt2e.prepare_pt2e(copy.deepcopy(exported), quantizer)
    except Exception as exc:  # noqa: BLE001 - torchao's annotators raise ValueError, IndexError, ...
        frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
        where = next((f for f in reversed(frames) if f.startswith("_annotate")), frames[-1])
        what = f"{type(quantizer).__name__} failed on {type(model).__name__} ({type(exc).__name__} in {where}: {exc})"
        reused = reused_modules(exported.graph, model)
        if "more than one output node" in str(exc) and reused:
            listed = ", ".join(
                f"{p!r} ({type(model.get_submodule(p)).__name__}, {n} calls)" for p, n in reused.items()
            )
            raise ModelError(
                f"{what}: its fusion patterns (conv/linear + add + relu, ...) take one call per module, "
                f"and {listed} is used more than once. Give each use its own module (e.g. "
                "self.relu2 = nn.ReLU()) or call torch.relu / F.relu there; plain prepare_pt2e fails "
                "the same way"
            ) from exc
        raise ModelError(
            f"{what}. Plain prepare_pt2e fails the same way on this model: leave the failing layers "
            "float (an X86InductorQuantizer with set_module_name_qconfig(name, None), passed as "
            "Session(..., quantizer=...)), or use flow='torchao'"
        ) from exc


def _name(node) -> str:
    """The op a call_function node runs: "conv2d" for aten.conv2d.default, "getitem" for
    operator.getitem (chunk/split/unbind outputs), "" for other node kinds."""
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def _weight_node(node):
    """The get_attr behind a weight argument (through an observer or a dequantize), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if (
        node.op in ("call_module", "call_function")
        and node.args
        and isinstance(node.args[0], torch.fx.Node)
    ):
        if node.op == "call_function" and "dequantize" not in str(node.target):
            return None
        node = node.args[0]
    return node if node.op == "get_attr" else None


_WEIGHT_ARG = {"linear": 1, "addmm": 2, "mm": 1, "matmul": 1}  # conv*: 1
_QUANTIZABLE = ("conv", "linear")  # the ops X86InductorQuantizer quantizes (addmm/mm stay float)


def _weight_index(node) -> int | None:
    """Where a weighted op (conv, linear, or the addmm/mm of e.g. transformers' Conv1D) takes its
    weight, when that weight is a module attribute; else None."""
    op = _name(node)
    index = 1 if op.startswith("conv") else _WEIGHT_ARG.get(op)
    if index is None or len(node.args) <= index or _weight_node(node.args[index]) is None:
        return None
    return index


def _observed(node) -> bool:
    return any(
        u.op == "call_module" and "activation_post_process" in str(u.target) for u in node.users
    )


def _leaves(node) -> list:
    return pytree.tree_flatten((node.args, node.kwargs))[0]


class Group:
    """One layer in the graph: node names (anchor first, output last) and its activation inputs."""

    def __init__(self, layer: str, nodes: list, module_class: type | None, weight_index: int = 1,
                 owner: str | None = None):
        self.layer, self.module_class, self.weight_index = layer, module_class, weight_index
        self.owner = owner or layer  # the module whose weight the op reads
        self.op = _name(nodes[0])
        self.nodes = [n.name for n in nodes]
        names = set(self.nodes)
        self.inputs = []  # (node name, leaf index) of activation inputs from outside the group
        for k, node in enumerate(nodes):
            for i, leaf in enumerate(_leaves(node)):
                if (
                    not isinstance(leaf, torch.fx.Node)
                    or leaf.name in names
                    or _weight_node(leaf) is not None
                ):
                    continue
                if k == 0 and i == weight_index:  # the weight, even when it is not a plain get_attr
                    continue
                self.inputs.append((node.name, i))

    @property
    def output(self) -> str:
        return self.nodes[-1]

    @property
    def quantizable(self) -> bool:
        return self.op.startswith(_QUANTIZABLE)


def find_groups(observed: torch.fx.GraphModule, model: nn.Module) -> list[Group]:
    """Every weighted op of the prepared graph with its epilogue, in graph order. A layer is named
    by the module owning its weight; a further op of that module (a shared module called again,
    or one module running several weights) by ``<module>#<k>``, k = 1, 2, ... in graph order."""
    groups, calls = [], {}
    for node in observed.graph.nodes:
        index = _weight_index(node) if node.op == "call_function" else None
        if index is None:
            continue
        target = _weight_node(node.args[index]).target
        owner = target.rpartition(".")[0] or target
        k = calls[owner] = calls.get(owner, -1) + 1
        layer = f"{owner}#{k}" if k else owner
        nodes = [node]
        while not _observed(nodes[-1]) and len(nodes[-1].users) == 1:
            user = next(iter(nodes[-1].users))
            if user.op != "call_function" or _name(user) not in _EPILOGUE or _weight_index(user) is not None:
                break
            nodes.append(user)
        try:
            module_class = type(model.get_submodule(owner))
        except AttributeError:
            module_class = None
        groups.append(Group(layer, nodes, module_class, index, owner))
    return groups


def shared_layers(groups: list[Group]) -> tuple[tuple[str, ...], ...]:
    """Layers configured together: a module's ops ("fc", "fc#1", ...), since a quantizer sets
    configs by module name (the Plan's groups)."""
    members: dict[str, list[str]] = {}
    for g in groups:
        members.setdefault(g.owner, []).append(g.layer)
    return tuple(tuple(m) for m in members.values() if len(m) > 1)


def output_notes(observed: torch.fx.GraphModule, groups: list[Group]) -> dict[str, str]:
    """Why a layer's row has no output scale: its output observer is shared with other nodes and
    listed under another layer (``cat``'s SharedQuantizationSpec), or nothing observes its output
    because what reads it is not quantized. {layer: reason}, for those layers only."""
    nodes = {n.name: n for n in observed.graph.nodes}
    outputs = {g.output: g.layer for g in groups}
    first: dict[int, torch.fx.Node] = {}  # observer module -> the node it is named by (its first)
    for node in observed.graph.nodes:
        if node.op == "call_module" and is_quant_point(module := observed.get_submodule(node.target)):
            first.setdefault(id(module), node.args[0])
    notes = {}
    for g in groups:
        out = nodes[g.output]
        watchers = [
            u for u in out.users
            if u.op == "call_module" and is_quant_point(observed.get_submodule(u.target))
        ]
        if watchers:
            source = first[id(observed.get_submodule(watchers[0].target))]
            if source is not out:  # named as in Pt2eFlow._map_points
                ops = sorted({_name(u) or u.op for w in watchers for u in w.users})
                owner = outputs.get(source.name) or module_path(source) or source.name
                notes[g.layer] = f"shared with {'/'.join(ops)} output (observer listed under {owner!r})"
        elif all(u.op == "output" for u in out.users):
            notes[g.layer] = "not observed: model output, left float"
        else:
            ops = sorted({_name(u) or u.op for u in out.users if u.op != "output"})
            notes[g.layer] = f"not observed: output feeds a float op ({', '.join(ops)})"
    return notes


class QuantizedTap(nn.Module):
    """Marks a layer's output in the quantized graph; carries its int8 weight (a quantized tensor)."""

    def forward(self, out, *inputs):
        return out


class ReferenceTap(nn.Module):
    """The layer in float: recomputes the group from its inputs (the shadow of ``local_sqnr``)."""

    def __init__(self, group_module: nn.Module):
        super().__init__()
        self.group = group_module

    def forward(self, out, *inputs):
        return self.group(out, *inputs)


def _group_module(gm: torch.fx.GraphModule, group: Group) -> torch.fx.GraphModule:
    """The group's nodes of ``gm`` as a module of ``(out, *inputs)``, weights read from ``gm``."""
    graph, env, nodes = torch.fx.Graph(), {}, {n.name: n for n in gm.graph.nodes}
    graph.placeholder("out")
    inputs = {key: graph.placeholder(f"input_{i}") for i, key in enumerate(group.inputs)}
    for name in group.nodes:
        node = nodes[name]
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.fx.Node):
                continue
            if (name, i) in inputs:
                leaves[i] = inputs[(name, i)]
            elif leaf.name in env:
                leaves[i] = env[leaf.name]
            else:
                leaves[i] = graph.get_attr(_weight_node(leaf).target)
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        env[name] = graph.create_node(node.op, node.target, args, kwargs, name=name)
    graph.output(env[group.output])
    return torch.fx.GraphModule(gm, graph)


def _install(gm: torch.fx.GraphModule, name: str, tap: nn.Module) -> None:
    """Put ``tap`` at ``name``. Tensors the graph reads there (get_attr ``name.weight``, also read
    by a tied embedding, or ``name`` itself: a weight of the root module) move to attributes of
    ``gm`` first, so the tap cannot shadow them; the submodules of a module there stay under it."""
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name)
    old = parent._modules.get(attr)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target == name:
            value = getattr(parent, attr)
        elif old is not None and node.target.startswith(f"{name}.") and "." not in node.target[len(name) + 1:]:
            value = getattr(old, node.target[len(name) + 1:])
        else:
            continue
        if not isinstance(value, torch.Tensor):
            continue
        moved = "_qviz_" + node.target.replace(".", "_")
        while hasattr(gm, moved):
            moved += "_"
        if isinstance(value, nn.Parameter):
            gm.register_parameter(moved, value)
        else:
            gm.register_buffer(moved, value)
        node.target = moved
    if old is not None:
        for key, value in old._modules.items():
            tap.add_module(key, value)
    elif isinstance(getattr(parent, attr, None), torch.Tensor):  # read from its new place now
        delattr(parent, attr)
    gm.add_submodule(name, tap)


def fetch(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _quantized_weight(gm: torch.fx.GraphModule, dq) -> torch.Tensor | None:
    """The converted graph's int8 weight behind argument ``dq`` as a torch quantized tensor, or
    None (float)."""
    if not (
        isinstance(dq, torch.fx.Node)
        and dq.op == "call_function"
        and "dequantize" in str(dq.target)
    ):
        return None
    values = fetch(gm, dq.args[0].target)
    arg = [fetch(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in dq.args[1:]]
    if "per_channel" in str(dq.target):
        return torch._make_per_channel_quantized_tensor(
            values, arg[0].double(), arg[1].long(), arg[2]
        )
    return torch._make_per_tensor_quantized_tensor(values, float(arg[0]), int(arg[1]))


def insert_taps(
    gm: torch.fx.GraphModule, groups: list[Group], reference: bool, notes: dict | None = None
) -> torch.fx.GraphModule:
    """A tap after each group's output (see the module docstring); ``notes`` (quantized graph):
    why a layer has no output quantization of its own, kept as the tap's ``output_note``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for group in groups:
        if group.output not in nodes:
            raise ModelError(
                f"layer {group.layer!r}: node {group.output!r} is not in the converted graph"
            )
        leaves = {name: _leaves(nodes[name]) for name in group.nodes}
        inputs = [leaves[name][i] for name, i in group.inputs]
        tap = ReferenceTap(_group_module(gm, group)) if reference else QuantizedTap()
        _install(gm, group.layer, tap)
        weight_arg = nodes[group.nodes[0]].args[group.weight_index]
        weight = None if reference else _quantized_weight(gm, weight_arg)
        if not reference:
            tap.quantized = weight is not None
            tap.dtype = weight.dtype if weight is not None else torch.float32
            tap.output_note = (notes or {}).get(group.layer, "")
        if weight is None:
            weight = fetch(gm, _weight_node(weight_arg).target)
        tap.weight = weight.detach()
        tap.layer_type = group.module_class.__name__ if group.module_class else group.op
        tap.layer_class = group.module_class
        with gm.graph.inserting_after(nodes[group.output]):
            gm.graph.call_module(group.layer, (nodes[group.output], *inputs))
    gm.recompile()
    return gm


def is_pt2e_prepared(model: nn.Module) -> bool:
    """A GraphModule from prepare_pt2e / prepare_qat_pt2e (torch.export graph with observers)."""
    return (
        isinstance(model, torch.fx.GraphModule)
        and any(
            n.op == "call_function" and str(n.target).startswith("aten.") for n in model.graph.nodes
        )
        and any(is_quant_point(m) for m in model.modules())
    )


_ANCHORS = ("conv1d", "conv2d", "conv3d", "linear")


def module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def qat_points(model: torch.fx.GraphModule) -> list[QuantPoint]:
    """Fake-quants of a prepare_qat_pt2e model (BN kept, weights scaled), mapped to the float
    model's module names: a weight's by the conv/linear using it, an output's by walking back
    through the epilogue (relu, add, batch_norm, ...) to the conv/linear that produced it."""
    points, seen = [], set()
    for node in model.graph.nodes:
        if node.op != "call_module" or not is_quant_point(
            module := model.get_submodule(node.target)
        ):
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        source = node.args[0]
        weighted = [
            u for u in node.users if _name(u) in _ANCHORS and len(u.args) > 1 and u.args[1] is node
        ]
        if weighted:
            layer, role = module_path(weighted[0]) or weighted[0].name, "weight"
        elif source.op == "placeholder":
            layer, role = source.name, "input"
        else:
            walk = source
            while (
                _name(walk) not in _ANCHORS
                and walk.op == "call_function"
                and (
                    _name(walk)
                    in (
                        *_EPILOGUE,
                        "batch_norm",
                        "_native_batch_norm_legit",
                        "getitem",
                        "div",
                        "mul",
                    )
                )
                and walk.args
                and isinstance(walk.args[0], torch.fx.Node)
            ):
                walk = walk.args[0]
            anchor = walk if _name(walk) in _ANCHORS else source
            layer, role = module_path(anchor) or source.name, "output"
        points.append(QuantPoint(node.target, module, layer, role))
    return points

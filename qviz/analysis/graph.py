"""The model's graph at the level of the session's layers, and a layered layout to draw it.

:func:`trace_graph` reads a torch.fx graph: the session's float reference when it is a
``GraphModule`` (FX and PT2E sessions: the graph the flow traced or exported, read as is),
otherwise a ``torch.fx.symbolic_trace`` of a deep copy (the session's model is never touched).
Each graph node becomes

- a *layer*: a node of a session row (``session.to_dataframe().index``): a ``call_module`` of the
  row's module or a module inside it (a fused group's parts), or an op whose ``nn_module_stack``
  lies in it (PT2E's aten ops); every node of one row is one graph node;
- an *add* or *cat*: a residual ``add`` (``operator.add``, ``torch.add``, ``+=``, ``aten.add``) or a
  ``cat`` / ``concat`` / ``concatenate`` of at least two values computed from the inputs, named
  ``<module>.add#<i>`` after the module whose forward runs it (``add#0`` in the model's own);
- an *input* (``(input x)``) or the *output* (``(output)``);
- or plumbing (activations, pooling, reshapes, ``getattr``/``getitem``, observers), dropped:
  an edge joins each visible node to the nearest visible nodes upstream of it.

:meth:`ModelGraph.collapse` groups nodes by module prefix, :meth:`ModelGraph.layout` places them
in levels (longest path from the inputs, top to bottom) ordered by barycentres, long edges routed
through one bend point per level they cross (Sugiyama's dummy nodes).
"""

from __future__ import annotations

import copy
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from qviz.errors import ModelError, QvizError
from qviz.flows.tracing import TRACE_LOCK

#: What a node is: a session row, a merge of branches, a collapsed module, an end of the graph.
KINDS = ("layer", "add", "cat", "group", "input", "output")
#: The figures a node can be coloured by: (label, True when a lower value is worse).
FIGURES = {
    "output_sqnr": ("output SQNR (dB)", True),
    "local_sqnr": ("local SQNR (dB)", True),
    "weight_sqnr": ("weight SQNR (dB)", True),
    "clip_frac": ("clipped fraction", False),
    "sensitivity": ("sensitivity", False),
}
_ADDS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_,
         torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_CATS = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default, torch.ops.aten.concat.default}
_METHOD_KINDS = {"add": "add", "add_": "add", "__add__": "add", "__iadd__": "add"}
_SWEEPS = 8  # ordering and straightening passes (alternately downward and upward)


@dataclass(frozen=True)
class ModelGraph:
    """The graph as plain data. ``nodes``: indexed by name, columns ``kind`` (see KINDS), ``path``
    (the module path it is grouped by), ``members`` (the session rows it stands for), ``order``
    (first appearance in the traced graph), then the figures once :meth:`with_figures` added
    them and ``level``, ``x``, ``y`` once laid out. ``edges``: ``source``, ``target`` (and
    ``xs``, ``ys``, the drawn route, once laid out). ``missing``: rows not found in the graph."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    source: str
    missing: tuple[str, ...] = ()
    depth: int | None = None
    max_depth: int = field(default=1)  # the longest module path: deeper depths change nothing

    def inputs_of(self, name: str) -> list[str]:
        """The nodes with an edge into ``name``."""
        return list(self.edges.loc[self.edges["target"] == name, "source"])

    def collapse(self, depth: int | None) -> ModelGraph:
        """Nodes whose module path is deeper than ``depth`` merged into one *group* per prefix of
        ``depth`` parts (``layer1.0.conv1`` and ``layer1.0.add#0`` become ``layer1.0`` at depth 2);
        a prefix with one node keeps that node. ``None`` (or ``max_depth`` and over): every layer."""
        if depth is None or depth >= self.max_depth:
            return replace(self, depth=None)
        if depth < 1:
            raise QvizError(f"the grouping depth must be 1 or more (or None for every layer), not {depth}")
        key = {n: ".".join(p[:depth]) if len(p) > depth else n for n, p in self.nodes["path"].items()}
        sizes = pd.Series(list(key.values())).value_counts()
        key = {n: k if sizes[k] > 1 else n for n, k in key.items()}
        rows = {}
        for name, node in self.nodes.iterrows():
            k = key[name]
            if k == name:
                rows[k] = node.to_dict()
            elif k in rows:
                rows[k]["members"] += node["members"]
                rows[k]["order"] = min(rows[k]["order"], node["order"])
            else:
                rows[k] = {"kind": "group", "path": tuple(k.split(".")), "members": node["members"],
                           "order": node["order"]}
        nodes = pd.DataFrame.from_dict(rows, orient="index").sort_values("order", kind="stable")
        nodes = nodes[["kind", "path", "members", "order"]]
        pairs = [(key[s], key[t]) for s, t in zip(self.edges["source"], self.edges["target"], strict=True)]
        edges = _edge_frame(dict.fromkeys(p for p in pairs if p[0] != p[1]))
        return replace(self, nodes=nodes, edges=edges, depth=depth)

    def default_depth(self, max_nodes: int = 120) -> int | None:
        """The deepest grouping with at most ``max_nodes`` nodes (None: every layer fits)."""
        if len(self.nodes) <= max_nodes or self.max_depth == 1:
            return None
        for depth in range(self.max_depth - 1, 0, -1):
            if len(self.collapse(depth).nodes) <= max_nodes:
                return depth
        return 1

    def with_figures(self, table: pd.DataFrame, sensitivity: pd.DataFrame | None = None) -> ModelGraph:
        """The nodes with the session's figures (FIGURES present in ``table``, plus ``sensitivity``
        from a sweep's frame), ``type`` and ``dtype``: a layer's are its row's, a group's the worst
        of its members' (the lowest SQNR, the highest clipped fraction or sensitivity)."""
        frame = table.copy()
        if sensitivity is not None and "sensitivity" in sensitivity:
            frame["sensitivity"] = sensitivity["sensitivity"].reindex(frame.index).astype(float)
        figures = [f for f in FIGURES if f in frame]
        values = {f: [] for f in [*figures, "type", "dtype"]}
        for members in self.nodes["members"]:
            rows = frame.loc[[m for m in members if m in frame.index]]
            for f in figures:
                column = rows[f].astype(float).dropna()
                worst = column.min() if FIGURES[f][1] else column.max()
                values[f].append(float(worst) if len(column) else math.nan)
            for f in ("type", "dtype"):
                seen = list(dict.fromkeys(str(v) for v in rows[f])) if f in rows else []
                values[f].append(seen[0] if len(seen) == 1 else ", ".join(seen[:3]) + (" ..." if len(seen) > 3 else ""))
        nodes = self.nodes.drop(columns=[c for c in values if c in self.nodes]).assign(**values)
        return replace(self, nodes=nodes)

    def layout(self) -> ModelGraph:
        """Levels top to bottom (y = -level), x by barycentre ordering then straightened; each
        edge's route in ``xs``/``ys``. Edges against the graph order (a module called twice) do
        not count for levels and are drawn straight."""
        names = list(self.nodes.index)
        index = {n: i for i, n in enumerate(names)}
        order = self.nodes["order"].to_numpy()
        pairs = [(index[s], index[t]) for s, t in zip(self.edges["source"], self.edges["target"], strict=True)]
        forward = [(s, t) for s, t in pairs if order[s] < order[t]]
        level = np.zeros(len(names), dtype=np.int64)
        preds = defaultdict(list)
        for s, t in forward:
            preds[t].append(s)
        for v in np.argsort(order, kind="stable"):
            if preds[v]:
                level[v] = max(level[u] for u in preds[v]) + 1
        # dummy nodes: one per level a long edge crosses
        node_level = list(level)
        chains = {}
        for s, t in forward:
            chain = [s]
            for lv in range(level[s] + 1, level[t]):
                node_level.append(lv)
                chain.append(len(node_level) - 1)
            chains[(s, t)] = [*chain, t]
        x = _place(node_level, [c for chain in chains.values() for c in zip(chain, chain[1:], strict=False)],
                   [order[s] for s in range(len(names))] + [order[c[0]] for c in chains.values() for _ in c[1:-1]])
        y = -np.asarray(node_level, dtype=np.float64)
        nodes = self.nodes.assign(level=level, x=x[:len(names)], y=y[:len(names)])
        routes = [chains.get((s, t), [s, t]) for s, t in pairs]
        edges = self.edges.assign(xs=[[float(x[i]) for i in r] for r in routes],
                                  ys=[[float(y[i]) for i in r] for r in routes])
        return replace(self, nodes=nodes, edges=edges)


def trace_graph(model: nn.Module, rows) -> ModelGraph:
    """The layer-level graph of ``model`` (see the module docstring) for the session rows ``rows``.
    A ``GraphModule`` is read as is; any other model is traced from a deep copy. Raises
    ModelError, saying what to do, when torch.fx cannot trace it."""
    if isinstance(model, torch.fx.GraphModule):
        graph = model.graph
        exported = any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes)
        source = "the session's exported graph (torch.export)" if exported else "the session's FX graph"
    else:
        graph, source = _symbolic_trace(model).graph, "torch.fx.symbolic_trace of the float model"
    return _from_fx(graph, list(rows), source)


def session_graph(session) -> ModelGraph:
    """:func:`trace_graph` of a live session's float reference and rows; QvizError otherwise."""
    if not getattr(session, "is_live", False):
        raise QvizError("this session was loaded from a file: it holds results, not the model, so it has no "
                        "graph to draw. Re-create it from the model (qviz.Session(model, data, ...).run()) "
                        "to see its graph")
    return trace_graph(session.float_model(), session.to_dataframe().index)


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        with TRACE_LOCK.tracing():
            return torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # noqa: BLE001 - any tracer failure means the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"qviz cannot draw the graph of {type(model).__name__}: torch.fx could not trace it "
            f"({type(exc).__name__}: {first}). The graph view needs a model torch.fx can trace "
            "(no data-dependent Python control flow); a session with flow='pt2e' draws the "
            "torch.export graph instead, which takes most models torch.fx cannot") from exc


def _stack(node) -> list[str]:
    """The module paths of ``node``'s ``nn_module_stack``, innermost first."""
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()][::-1]


def _merge_kind(node) -> str | None:
    if node.op == "call_function":
        return "add" if node.target in _ADDS else "cat" if node.target in _CATS else None
    return _METHOD_KINDS.get(node.target) if node.op == "call_method" else None


def _from_fx(graph: torch.fx.Graph, rows: list[str], source: str) -> ModelGraph:
    known = set(rows)

    def row(path: str) -> str | None:
        while path:
            if path in known:
                return path
            path = path.rpartition(".")[0]
        return None

    order = list(graph.nodes)
    reached = set()  # computed from the inputs (not constants) ...
    for n in order:
        if n.op == "placeholder" or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    used = set()  # ... and reaching the output (not probes, guards, dead code)
    for n in reversed(order):
        if n.op == "output" or any(u in used for u in n.users):
            used.add(n)
    live = reached & used
    nodes, sources, edges, counts = {}, {}, {}, defaultdict(int)
    for position, n in enumerate(order):
        if n not in live:
            continue
        inputs = [a for a in n.all_input_nodes if a in live]
        name = kind = None
        if n.op == "placeholder":
            name, kind, path = f"(input {n.target})", "input", None
        elif n.op == "output":
            name, kind, path = "(output)", "output", None
        else:
            candidates = ([n.target] if n.op == "call_module" else []) + _stack(n)
            name = next((r for r in map(row, candidates) if r is not None), None)
            if name is not None:
                kind, path = "layer", tuple(name.split("."))
            elif (merge := _merge_kind(n)) is not None and len(inputs) >= 2:
                owner = next(iter(_stack(n)), "")
                kind, label = merge, f"{merge}#{counts[(owner, merge)]}"
                counts[(owner, merge)] += 1
                name, path = f"{owner}.{label}".lstrip("."), (*filter(None, owner.split(".")), label)
        upstream = set().union(*(sources[a] for a in inputs)) if inputs else set()
        if name is None:
            sources[n] = upstream
            continue
        if name not in nodes:
            nodes[name] = {"kind": kind, "path": path or (name,), "members": (name,) if kind == "layer" else (),
                           "order": position}
        for s in sorted(upstream, key=lambda s: nodes[s]["order"]):
            if s != name:
                edges[(s, name)] = None
        sources[n] = {name}
    frame = pd.DataFrame.from_dict(nodes, orient="index", columns=["kind", "path", "members", "order"])
    return ModelGraph(frame, _edge_frame(edges), source, tuple(r for r in rows if r not in nodes),
                      max_depth=max((len(p) for p in frame["path"]), default=1))


def _edge_frame(pairs) -> pd.DataFrame:
    return pd.DataFrame(list(pairs), columns=["source", "target"])


def _place(levels: list[int], links: list[tuple[int, int]], keys: list) -> np.ndarray:
    """x of every node (dummies included) given its level, the links between adjacent levels and
    a key for the first ordering (graph order): barycentre ordering sweeps, then positions at
    least 1 apart, each as close as it can be to the mean of its neighbours' (isotonic regression)."""
    n = len(levels)
    up, down = defaultdict(list), defaultdict(list)
    for s, t in links:
        down[s].append(t)
        up[t].append(s)
    by_level = defaultdict(list)
    for v in sorted(range(n), key=lambda v: keys[v]):
        by_level[levels[v]].append(v)
    rank = np.zeros(n)
    for members in by_level.values():
        rank[members] = np.arange(len(members))
    top = max(by_level, default=0)
    for sweep in range(_SWEEPS):
        neighbours, span = (up, range(1, top + 1)) if sweep % 2 == 0 else (down, range(top - 1, -1, -1))
        for lv in span:
            members = by_level[lv]
            key = {v: np.mean(rank[neighbours[v]]) if neighbours[v] else rank[v] for v in members}
            members.sort(key=key.__getitem__)
            rank[members] = np.arange(len(members))
    x = np.zeros(n)
    for members in by_level.values():
        x[members] = np.arange(len(members)) - (len(members) - 1) / 2
    for sweep in range(_SWEEPS):
        neighbours, span = (up, range(1, top + 1)) if sweep % 2 == 0 else (down, range(top - 1, -1, -1))
        for lv in span:
            members = by_level[lv]
            wanted = [np.mean(x[neighbours[v]]) if neighbours[v] else x[v] for v in members]
            x[members] = _spaced(wanted)
    return x - (x.min() if n else 0)


def _spaced(wanted: list[float]) -> np.ndarray:
    """Positions p (in the given order, p[i+1] >= p[i] + 1) minimising sum (p - wanted)^2: the
    pool-adjacent-violators algorithm on wanted[i] - i."""
    blocks = []  # [sum, count]
    for i, w in enumerate(wanted):
        blocks.append([w - i, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    q = np.concatenate([np.full(c, s / c) for s, c in blocks]) if blocks else np.zeros(0)
    return q + np.arange(len(q))

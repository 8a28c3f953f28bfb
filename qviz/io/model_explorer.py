"""qviz's per-layer figures as node data for Google's Model Explorer (``ai-edge-model-explorer``).

Model Explorer draws a ``torch.export`` ExportedProgram (``model_explorer.visualize_pytorch``)
and overlays node data files: ``{graph id: {"results": {node id: {"value": v}}, "gradient": ...}}``
where the PyTorch adapter names its one graph ``"graph"`` and each node by its FX node name.
Each node that computes inside a layer (``node.meta["nn_module_stack"]``'s innermost module is
the layer or one of its children) gets that layer's figure, so the overlay colours the convs,
linears and their fused BN/ReLU by e.g. output SQNR.
"""

from __future__ import annotations

import json
import math
import pathlib

import pandas as pd
import torch

from qviz.errors import ConfigError, ModelError
from qviz.flows.base import split_batch
from qviz.io.atomic import atomic_write

GRAPH_ID = "graph"  # the id Model Explorer's PyTorch adapter gives the exported graph
# low SQNR is bad: red at the minimum, through yellow, to green at the maximum
GRADIENT = [{"stop": 0, "bgColor": "#d62728"}, {"stop": 0.5, "bgColor": "#ffdd57"}, {"stop": 1, "bgColor": "#2ca02c"}]


def export_float(model: torch.nn.Module, batch) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the float model on one batch: the program the node ids refer to."""
    args, kwargs = split_batch(batch)
    try:
        return torch.export.export(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - export fails with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"torch.export could not export {type(model).__name__} for Model Explorer: "
            f"{type(exc).__name__}: {first}. Export it yourself and pass exported_program="
        ) from exc


def layer_of(node, layers: set[str]) -> str | None:
    """The layer a node computes in: its innermost module on the stack that is a layer, or under one."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        name = _module_path(path)
        while name:
            if name in layers:
                return name
            name = name.rpartition(".")[0]
    return None


def _module_path(path: str) -> str:
    """nn_module_stack spells paths as named_modules() does (``L['self'].`` prefixes dropped)."""
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def node_data(program: torch.export.ExportedProgram, table: pd.DataFrame, figure: str) -> dict:
    """The node data dict: every graph node inside a layer with a finite ``figure``."""
    if figure not in table.columns:
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        raise ConfigError(f"unknown figure {figure!r}: choose one of {', '.join(numeric)}")
    values = {n: float(v) for n, v in table[figure].items() if v is not None and math.isfinite(float(v))}
    results = {}
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        layer = layer_of(node, set(values))
        if layer is not None:
            results[node.name] = {"value": values[layer]}
    return {GRAPH_ID: {"results": results, "gradient": GRADIENT}}


def write_node_data(path, data: dict) -> pathlib.Path:
    """Write the node data JSON atomically."""
    with atomic_write(path, what="the Model Explorer node data") as fh:
        fh.write(json.dumps(data).encode())
    return pathlib.Path(path)

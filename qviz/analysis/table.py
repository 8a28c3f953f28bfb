"""The per-layer table of a run: one row per layer from its errors, its weight quantization and
its output activation point, gathered with the point records into :class:`~qviz.results.Results`."""

from __future__ import annotations

import math

import pandas as pd

from qviz.capture.stats import ActivationStats
from qviz.plan import observer_name
from qviz.results import LEADING_COLUMNS, PointRecord, Results, clip_fraction, output_record, scalar


def weight_point(layer: str, rec: dict) -> PointRecord:
    """A converted layer's weight as a point: float weight histogram, the qparams it got."""
    stats = ActivationStats()
    stats.update(rec["float_weight"])
    info = {
        "observer": "converted weight",
        "dtype": rec.get("weight_dtype", ""),
        "qscheme": rec.get("weight_qscheme", ""),
        "saw_data": True,
    }
    if info["dtype"] == "qint8":
        info["quant_min"], info["quant_max"] = -128, 127
    arrays = {k: rec[f"weight_{k}"] for k in ("scale", "zero_point") if f"weight_{k}" in rec}
    if "channel_absmax" in rec:  # abs-max of each output channel of the float weight
        arrays["channel_absmax"] = rec["channel_absmax"]
    return PointRecord(f"{layer}.weight", layer, "weight", stats, info, arrays)


def build_results(*, meta, records, per_layer, weights, order, left_float, summary, types,
                  simulated=()) -> Results:
    """The results of a run: ``records`` plus a weight point per converted layer, and the table
    (``order``'s layers; ``per_layer`` their errors, ``weights`` their weight records)."""
    records = dict(records)
    for layer, rec in weights.items():
        if "float_weight" in rec:
            if "point" not in rec:  # the float weight's histogram is the same after each apply
                rec["point"] = weight_point(layer, rec)
            records[rec["point"].name] = rec["point"]
    rows = []
    for depth, name in enumerate(order):
        row = _row(name, depth, types[name], name not in left_float,
                   per_layer[name], weights.get(name, {}), records)
        row["simulated"] = name in simulated
        rows.append(row)
    table = pd.DataFrame(rows).set_index("layer")
    first = [c for c in LEADING_COLUMNS if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    return Results(meta=meta, summary=summary, table=table, records=records)


def _row(name, depth, type_name, quantized, errors, weight, records) -> dict:
    """One layer's row: errors, weight quantization, and its output activation point."""
    point = output_record(records, name)
    row = {"layer": name, "depth": depth, "type": type_name, "quantized": quantized}
    info = point.info if point is not None else {}
    if not quantized:
        dtype, observer = "float", ""
    elif point is not None and point.role == "dynamic":
        mode = weight.get("activation_mode", "dynamic")  # torchao weight-only layers: "weight-only"
        dtype, observer = f"{weight.get('weight_dtype', '')} ({mode})", mode
    else:
        dtype, observer = info.get("dtype", ""), observer_name(info.get("observer", ""))
    if not quantized:
        point = None  # a float layer has no output quantization of its own
    stats = point.stats if point is not None else None
    row.update({
        "dtype": dtype,
        "qscheme": info.get("qscheme", ""),
        "observer": observer,
        "scale": scalar(point.arrays.get("scale")) if point else math.nan,
        "zero_point": scalar(point.arrays.get("zero_point")) if point else math.nan,
        "min": stats.min if stats else math.nan,
        "max": stats.max if stats else math.nan,
        "clip_frac": clip_fraction(point) if point else math.nan,
        "nonfinite": stats.nonfinite if stats else 0,
        "saw_data": stats.saw_data if stats else False,
        "weight_dtype": weight.get("weight_dtype", "float"),
        "weight_qscheme": weight.get("weight_qscheme", ""),
        "weight_sqnr": weight.get("weight_sqnr", math.nan),
    })
    row.update(errors)
    return row

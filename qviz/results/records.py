"""Point records: what one quantization point saw and ended with, as plain data.

``stats`` is the point's :class:`~qviz.capture.stats.ActivationStats` (histogram, per-call
min/max); this module only reads it (``min``, ``max``, ``saw_data``, ``clip_fraction``), so
results never depend on the capture code that fills it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

PER_TENSOR = ("per_tensor_affine", "per_tensor_symmetric")
#: The roles of a layer's output activation point, in the order :func:`output_record` prefers
#: them: "output" (a static observer or fake-quant on the layer's output), else "dynamic" (a
#: dynamically quantized layer's input, recorded where the layer quantizes its activation).
OUTPUT_ROLES = ("output", "dynamic")


@dataclass
class PointRecord:
    """What one quantization point saw and ended with; plain data once the run has described it."""

    name: str
    layer: str
    role: str  # "output", "dynamic", "weight", ... (see qviz.flows.base.QuantPoint)
    stats: object  # an ActivationStats
    info: dict = field(default_factory=dict)  # observer, dtype, qscheme, quant_min/max, flags
    arrays: dict = field(default_factory=dict)  # scale, zero_point, min_val, max_val (numpy)

    @property
    def per_channel(self) -> bool:
        return np.asarray(self.arrays.get("scale", np.zeros(1))).size > 1


def output_record(records: Mapping[str, PointRecord], layer: str) -> PointRecord | None:
    """The record of ``layer``'s output activation: its first "output" point, else its first
    "dynamic" one, else None. The table's scale / clip columns, the dashboard's histogram and
    the report all read this one point; a caller that needs static qparams (a scale to rebuild
    the layer with, an output range) checks ``.role == "output"`` itself."""
    found = {}
    for record in records.values():
        if record.layer == layer and record.role in OUTPUT_ROLES:
            found.setdefault(record.role, record)
            if record.role == OUTPUT_ROLES[0]:
                break
    return next((found[role] for role in OUTPUT_ROLES if role in found), None)


def scalar(values) -> float:
    """A per-tensor value as a float; NaN when absent or per-channel."""
    arr = np.asarray(values if values is not None else [], dtype=np.float64).reshape(-1)
    return float(arr[0]) if arr.size == 1 else math.nan


def clip_fraction(record: PointRecord) -> float:
    """Share of the values seen that fall outside the final per-tensor quantization range."""
    scale, zp = scalar(record.arrays.get("scale")), scalar(record.arrays.get("zero_point"))
    info = record.info
    if info.get("qscheme") not in PER_TENSOR or not math.isfinite(scale) or not record.stats.saw_data:
        return math.nan
    return record.stats.clip_fraction(scale, int(zp), info["quant_min"], info["quant_max"])

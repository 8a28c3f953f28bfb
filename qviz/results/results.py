"""Results: everything a session found, as plain data.

The table (one row per layer), the model-level summary, and one :class:`PointRecord` per
quantization point (statistics with histogram, final qparams); once measured, the sensitivity
sweep, the QAT :class:`~qviz.results.timeline.Timeline` and the activation outliers' channel
statistics. No torch modules: results outlive the models and load from a session file alone
(:mod:`qviz.io.results_file` writes and reads them; :mod:`qviz.analysis.table` builds them).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from qviz.errors import QvizError
from qviz.results.records import PointRecord, clip_fraction, scalar
from qviz.results.timeline import Timeline

#: The figures users come for lead the table (and so the dashboard's and the report's tables).
LEADING_COLUMNS = ("type", "dtype", "output_sqnr", "local_sqnr", "weight_sqnr", "quantized")


@dataclass
class Results:
    meta: dict
    summary: dict
    table: pd.DataFrame
    records: dict[str, PointRecord]
    sensitivity: pd.DataFrame | None = None  # Session.sensitivity()'s frame, metric in .attrs
    timeline: Timeline | None = None  # Session.from_qat()'s QAT timeline
    outliers: dict | None = None  # layer -> ChannelStats of Session.outliers(), once measured

    def record(self, point: str) -> PointRecord:
        if point not in self.records:
            raise QvizError(f"no quantization point named {point!r}; see session.points() for the names")
        return self.records[point]

    def points_frame(self) -> pd.DataFrame:
        rows = []
        for r in self.records.values():
            st = r.stats
            rows.append({
                "point": r.name, "layer": r.layer, "role": r.role,
                "observer": r.info.get("observer", ""), "dtype": r.info.get("dtype", ""),
                "qscheme": r.info.get("qscheme", ""),
                "scale": scalar(r.arrays.get("scale")), "zero_point": scalar(r.arrays.get("zero_point")),
                "per_channel": r.per_channel, "min": st.min, "max": st.max,
                "calls": st.calls, "count": st.count, "nonfinite": st.nonfinite,
                "saw_data": st.saw_data, "clip_frac": clip_fraction(r),
                "fake_quant_enabled": r.info.get("fake_quant_enabled"),
                "observer_enabled": r.info.get("observer_enabled"),
            })
        return pd.DataFrame(rows).set_index("point")

"""The QAT timeline: a recorded QAT run as plain data (see :func:`qviz.watch`).

``meta`` (strides, bins, steps, world size), one dict per point (name, layer, role, observer,
dtype, qscheme, quant range, channels), ``arrays`` keyed ``steps``, ``hist_steps``,
``<i>/<quantity>`` (steps x channels), ``<i>/flags``, ``<i>/weight_int``, ``<i>/hist/<k>`` and
``scalars/<j>/steps|values``, the events and the BatchNorms. :mod:`qviz.capture.qat` records it,
:mod:`qviz.analysis.qat_detectors` diagnoses it, :mod:`qviz.io.results_file` writes and reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from qviz.errors import QvizError

QUANTITIES = ("scale", "zero_point", "min", "max")
FLAGS = ("fake_quant_enabled", "observer_enabled")
#: The arrays of one recorded histogram (a StreamingHistogram's to_arrays()).
HISTOGRAM_ARRAYS = ("counts", "lo", "width", "min", "max")


@dataclass
class Timeline:
    """A QAT run as plain data: snapshots, histograms, events, scalars (see :func:`qviz.watch`)."""

    meta: dict
    points: list[dict]
    arrays: dict[str, np.ndarray]
    events: list[list]
    scalar_names: list[str]
    batchnorms: list[dict]

    # -- frames --------------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """Long form: step, layer, point, role, quantity, channel, value (clip_frac at histogram steps)."""
        parts = []
        steps, hsteps = self.arrays["steps"], self.arrays["hist_steps"]

        def part(p, quantity, at, values):
            s, k = values.shape
            parts.append(pd.DataFrame({
                "step": np.repeat(at, k), "layer": p["layer"], "point": p["name"], "role": p["role"],
                "quantity": quantity, "channel": np.tile(np.arange(k), s), "value": values.reshape(-1).astype(np.float64)}))

        for i, p in enumerate(self.points):
            if f"{i}/scale" in self.arrays:
                for q in QUANTITIES:
                    part(p, q, steps, self.arrays[f"{i}/{q}"])
                if p["has_flags"]:
                    for j, q in enumerate(FLAGS):
                        part(p, q, steps, self.arrays[f"{i}/flags"][:, j : j + 1])
            if f"{i}/hist/clip_frac" in self.arrays:
                part(p, "clip_frac", hsteps, self.arrays[f"{i}/hist/clip_frac"][:, None])
        columns = ["step", "layer", "point", "role", "quantity", "channel", "value"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    def events_frame(self) -> pd.DataFrame:
        """One row per event: step, layer, point, kind, detail."""
        return pd.DataFrame(self.events, columns=["step", "layer", "point", "kind", "detail"])

    def scalars(self) -> pd.DataFrame:
        """Logged scalars, one column each, indexed by step."""
        series = {name: pd.Series(self.arrays[f"scalars/{j}/values"], index=self.arrays[f"scalars/{j}/steps"])
                  for j, name in enumerate(self.scalar_names)}
        return pd.DataFrame(series).rename_axis("step")

    def points_frame(self) -> pd.DataFrame:
        """One row per point: layer, role, observer, dtype, qscheme, quant range, channels."""
        return pd.DataFrame(self.points).set_index("name")

    # -- arrays --------------------------------------------------------------------------------
    def _index(self, point: str) -> int:
        for i, p in enumerate(self.points):
            if p["name"] == point:
                return i
        raise QvizError(f"no quantization point named {point!r}; see timeline.points_frame() for the names")

    def series(self, point: str, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values): scale / zero_point / min / max (steps x channels), flags (steps x 2),
        weight_int (steps x samples), or clip_frac (histogram steps)."""
        i = self._index(point)
        if quantity == "clip_frac":
            return self.arrays["hist_steps"], self.arrays.get(f"{i}/hist/clip_frac", np.zeros(0))
        key = f"{i}/{quantity}"
        if key not in self.arrays:
            return self.arrays["steps"][:0], np.zeros((0, 0))
        return self.arrays["steps"], self.arrays[key]

    def histogram_arrays(self, point: str, step: int) -> dict[str, np.ndarray]:
        """The arrays of the histogram of what ``point`` saw at histogram step ``step`` (a
        :class:`~qviz.capture.histogram.StreamingHistogram`'s ``to_arrays()``; see
        :func:`qviz.capture.qat.timeline_histogram` for the histogram itself)."""
        i, hsteps = self._index(point), self.arrays["hist_steps"]
        rows = np.flatnonzero(hsteps == step)
        if not rows.size or f"{i}/hist/counts" not in self.arrays:
            raise QvizError(f"no histogram at step {step}; histogram steps: {hsteps.tolist()}")
        return {k: self.arrays[f"{i}/hist/{k}"][rows[0]] for k in HISTOGRAM_ARRAYS}

    # -- exchange (a session file's section; what ranks send each other) -------------------------
    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        manifest = {"meta": self.meta, "points": self.points, "events": self.events,
                    "scalar_names": self.scalar_names, "batchnorms": self.batchnorms}
        return manifest, dict(self.arrays)

    @classmethod
    def from_arrays(cls, manifest: dict, arrays: dict[str, np.ndarray]) -> Timeline:
        return cls(meta=manifest["meta"], points=manifest["points"], arrays=dict(arrays),
                   events=[list(e) for e in manifest["events"]], scalar_names=list(manifest["scalar_names"]),
                   batchnorms=manifest["batchnorms"])

"""The session file's encoding of :class:`~qviz.results.Results` and of a QAT
:class:`~qviz.results.Timeline`: what goes in the manifest and the arrays, and every check a
file from a stranger must pass before anything reads it.

The container (a zip of one JSON manifest and ``.npy`` arrays, read safely) is
:mod:`qviz.io.session_file`. Sections added after version 1 of the file format (the sweep, the QAT
timeline, the outliers) are optional top-level keys that older readers ignore, so they need no new
format version: a file without one loads without it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from qviz.analysis.outliers import ChannelStats
from qviz.capture.histogram import StreamingHistogram
from qviz.capture.stats import ActivationStats
from qviz.errors import QvizError, SessionFileError
from qviz.io.schema import (
    NULL,
    REAL,
    SCALAR,
    AnyOf,
    DictOf,
    Fields,
    ListOf,
    OneOf,
    Row,
    fail,
    validate,
)
from qviz.io.session_file import read_session_file, write_session_file
from qviz.results import PER_TENSOR, PointRecord, Results, Timeline

# -- what a session file's manifest must look like (checked before anything uses it) ------------
_TEXT, _INT, _FLOAT, _BOOL = ("str", "object"), ("int64", "int32"), ("float64", "float32"), ("bool",)
#: A frame column's values by its dtype (null in a float column stands for NaN).
_VALUES = {"str": (str, NULL), "object": SCALAR, "int64": int, "int32": int, "float64": REAL,
           "float32": REAL, "bool": bool}
#: Columns the report and the dashboard read, and the dtypes they need.
TABLE_COLUMNS = {
    **dict.fromkeys(("type", "dtype", "qscheme", "observer", "weight_dtype", "weight_qscheme"), _TEXT),
    **dict.fromkeys(("depth", "nonfinite"), _INT),
    **dict.fromkeys(("quantized", "saw_data", "simulated"), _BOOL),
    **dict.fromkeys(("scale", "zero_point", "min", "max", "clip_frac", "weight_sqnr", "output_sqnr",
                     "mse", "cosine", "max_abs_err", "local_sqnr"), _FLOAT),
}
SENSITIVITY_COLUMNS = {"rank": _INT, **dict.fromkeys(
    ("quantize_only", "skip_only", "weight_only", "activation_only", "sensitivity", "float_metric"), _FLOAT)}
_FRAME = {"index": ListOf(str), "columns": ListOf(str), "dtypes": ListOf(OneOf(*_VALUES)),
          "data": DictOf(ListOf(SCALAR))}
_QRANGE = {"quant_min": int, "quant_max": int}
TIMELINE_SCHEMA = Fields(required={
    "meta": Fields(optional={**dict.fromkeys(("every", "bins", "steps", "snapshot_stride", "histogram_stride",
                                              "events_dropped", "world_size"), int),
                             "histograms_every": (int, NULL)}, extra=SCALAR),
    "points": ListOf(Fields(required={"name": str, "layer": str, "role": str},
                            optional={**_QRANGE, **dict.fromkeys(("channels", "ch_axis"), int),
                                      **dict.fromkeys(("observer", "dtype", "qscheme"), str),
                                      "has_flags": bool}, extra=SCALAR)),
    "events": ListOf(Row(int, str, str, str, str)),
    "scalar_names": ListOf(str),
    "batchnorms": ListOf(Fields(required={"name": str, "layer": str, "updating": bool}, extra=SCALAR)),
}, extra=None)
SCHEMA = Fields(
    required={
        "meta": Fields(optional=dict.fromkeys(("flow", "backend", "torch", "qviz", "sensitivity_metric"), str),
                       extra=SCALAR),
        "summary": Fields(optional={**dict.fromkeys(("output_sqnr", "output_mse", "top1_agreement",
                                                     "latency_ms", "float_latency_ms"), REAL),
                                    **dict.fromkeys(("size_bytes", "float_size_bytes", "weight_bytes",
                                                     "float_weight_bytes", "nonfinite"), (int, NULL)),
                                    "left_float": ListOf(str)},
                          extra=AnyOf(SCALAR, ListOf(SCALAR))),
        "points": ListOf(Fields(
            required={"name": str, "layer": str, "role": str,
                      "info": Fields(optional={**dict.fromkeys(("observer", "dtype", "qscheme"), str), **_QRANGE,
                                               "saw_data": bool, "fake_quant_enabled": (bool, NULL),
                                               "observer_enabled": (bool, NULL)}, extra=SCALAR)},
            extra=None)),
        "table": Fields(required=_FRAME, extra=None),
    },
    optional={
        "sensitivity": Fields(required={**_FRAME, "metric": (str, NULL)}, extra=None),
        "timeline": TIMELINE_SCHEMA,
        # one entry per linear layer with channel statistics, arrays under outliers/<i>/
        "outliers": ListOf(Fields(required={"layer": str}, extra=None)),
    },
)
_OUTLIER_ARRAYS = ("absmax", "exceed", "moments", "tokens")


def check_manifest(manifest: dict, arrays: dict[str, np.ndarray], path) -> None:
    """``manifest`` against :data:`SCHEMA`, then what a schema cannot say: frames whose parts
    agree, the columns the report and dashboard read with the dtypes they need, points named
    once with the qparams range a per-tensor point needs, numeric point and timeline arrays
    aligned with their steps. Raises :class:`SessionFileError` naming the field."""
    validate(manifest, SCHEMA, path)
    table = manifest["table"]
    _check_frame(table, TABLE_COLUMNS, path, "manifest.table")
    if "sensitivity" in manifest:
        _check_frame(manifest["sensitivity"], SENSITIVITY_COLUMNS, path, "manifest.sensitivity")
        unknown = sorted(set(manifest["sensitivity"]["index"]) - set(table["index"]))
        if unknown:
            raise fail(path, "manifest.sensitivity.index", f"names layers the table lacks: {unknown[:5]}")
    names = [p["name"] for p in manifest["points"]]
    if len(set(names)) != len(names):
        raise fail(path, "manifest.points", "names a point twice")
    for i, p in enumerate(manifest["points"]):
        if p["info"].get("qscheme") in PER_TENSOR and not all(k in p["info"] for k in _QRANGE):
            raise fail(path, f"manifest.points[{i}].info", "has a per-tensor qscheme but no quant_min/quant_max")
    _check_numeric(arrays, path)
    if "outliers" in manifest:
        _check_outliers(manifest["outliers"], arrays, path)
    if "timeline" in manifest:
        check_timeline(manifest["timeline"], arrays, path, prefix="timeline/")


def _check_outliers(entries: list, arrays: dict[str, np.ndarray], path) -> None:
    layers = [e["layer"] for e in entries]
    if len(set(layers)) != len(layers):
        raise fail(path, "manifest.outliers", "names a layer twice")
    for i in range(len(entries)):
        missing = [k for k in _OUTLIER_ARRAYS if f"outliers/{i}/{k}" not in arrays]
        if missing:
            raise fail(path, f"manifest.outliers[{i}]", f"has no arrays {missing}")
        try:
            ChannelStats.from_arrays({k: arrays[f"outliers/{i}/{k}"] for k in _OUTLIER_ARRAYS})
        except ValueError as exc:
            raise fail(path, f"array 'outliers/{i}'", str(exc)) from None


def _check_numeric(arrays: dict[str, np.ndarray], path) -> None:
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise fail(path, f"array {key!r}", f"is {arr.dtype}, expected numbers")


def _check_frame(doc: dict, known: dict, path, where: str) -> None:
    columns, dtypes, data, index = doc["columns"], doc["dtypes"], doc["data"], doc["index"]
    if len(set(columns)) != len(columns) or len(dtypes) != len(columns) or set(data) != set(columns):
        raise fail(path, where, "has columns, dtypes and data that do not match")
    if len(set(index)) != len(index):
        raise fail(path, f"{where}.index", "names a layer twice")
    missing = [c for c in known if c not in columns]
    if missing:
        raise fail(path, f"{where}.columns", f"lacks {missing}")
    for column, dtype in zip(columns, dtypes, strict=True):
        if column in known and dtype not in known[column]:
            raise fail(path, f"{where}.dtypes", f"gives {column!r} the dtype {dtype!r}, expected {known[column]}")
        if len(data[column]) != len(index):
            raise fail(path, f"{where}.data.{column}", f"has {len(data[column])} values for {len(index)} rows")
        validate(data[column], ListOf(_VALUES[dtype]), path, f"{where}.data.{column}")


def check_timeline(doc, arrays: dict[str, np.ndarray], path, *, prefix: str = "") -> None:
    """A QAT timeline's manifest against :data:`TIMELINE_SCHEMA`, and its arrays (keys under
    ``prefix``): steps, a row per step (or histogram step) for every point, possible histograms."""
    validate(doc, TIMELINE_SCHEMA, path, f"manifest.{prefix.rstrip('/') or 'qat_timeline'}")
    _check_numeric({k: v for k, v in arrays.items() if k.startswith(prefix)}, path)

    def need(key: str, ndim: int, rows: int | None = None) -> np.ndarray:
        arr = arrays.get(f"{prefix}{key}")
        if arr is None or arr.ndim != ndim or (rows is not None and arr.shape[0] != rows):
            raise fail(path, f"array '{prefix}{key}'", f"is missing or not {ndim}-d with {rows} rows")
        return arr

    steps, hsteps = len(need("steps", 1)), len(need("hist_steps", 1))
    for j in range(len(doc["scalar_names"])):
        need(f"scalars/{j}/values", 1, len(need(f"scalars/{j}/steps", 1)))
    own: dict[int, list[str]] = {}  # point index -> the tails of its array keys
    for key in arrays:
        head, _, tail = key[len(prefix):].partition("/")
        if key.startswith(prefix) and head.isdigit():
            own.setdefault(int(head), []).append(tail)
    for i in range(len(doc["points"])):
        for tail in own.get(i, []):
            if tail == "weight_index":
                need(f"{i}/{tail}", 1)
            elif tail.startswith("hist/"):
                need(f"{i}/{tail}", 2 if tail == "hist/counts" else 1, hsteps)
            else:
                need(f"{i}/{tail}", 2, steps)
        if f"{prefix}{i}/hist/counts" not in arrays:
            continue
        hist = {k: need(f"{i}/hist/{k}", 1, hsteps) for k in ("lo", "width", "min", "max")}
        hist["counts"] = arrays[f"{prefix}{i}/hist/counts"]
        try:
            for row in range(hsteps):
                StreamingHistogram.from_arrays({k: v[row] for k, v in hist.items()})
        except ValueError as exc:
            raise fail(path, f"array '{prefix}{i}/hist'", f"holds an impossible histogram ({exc})") from None


def save_results(results: Results, path) -> None:
    """Write ``results`` to the session file ``path`` (atomically)."""
    arrays, points = {}, []
    for i, r in enumerate(results.records.values()):
        points.append({"name": r.name, "layer": r.layer, "role": r.role, "info": r.info})
        for k, v in r.stats.to_arrays().items():
            arrays[f"points/{i}/stats/{k}"] = v
        for k, v in r.arrays.items():
            arrays[f"points/{i}/{k}"] = np.asarray(v)
    manifest = {"meta": results.meta, "summary": results.summary, "points": points,
                "table": _frame_json(results.table)}
    if results.sensitivity is not None:
        manifest["sensitivity"] = {"metric": results.sensitivity.attrs.get("metric"), **_frame_json(results.sensitivity)}
    if results.timeline is not None:
        manifest["timeline"], timeline_arrays = results.timeline.to_arrays()
        arrays.update({f"timeline/{k}": v for k, v in timeline_arrays.items()})
    if results.outliers is not None:
        measured = [(layer, s) for layer, s in results.outliers.items() if s.saw_data]
        manifest["outliers"] = [{"layer": layer} for layer, _ in measured]
        for i, (_, stats) in enumerate(measured):
            arrays.update({f"outliers/{i}/{k}": v for k, v in stats.to_arrays().items()})
    write_session_file(path, manifest, arrays)


def load_results(path, *, max_bytes: int | None = None) -> Results:
    """Read a session file (safe with files from strangers: see :func:`read_session_file`
    for ``max_bytes`` and :func:`check_manifest` for what is checked)."""
    manifest, arrays = read_session_file(path, max_bytes=max_bytes)
    check_manifest(manifest, arrays, path)
    try:
        table = _json_frame(manifest["table"])
        records = {}
        for i, p in enumerate(manifest["points"]):
            prefix = f"points/{i}/"
            stats = ActivationStats.from_arrays(
                {k[len(prefix) + 6:]: v for k, v in arrays.items() if k.startswith(prefix + "stats/")})
            own = {k[len(prefix):]: v for k, v in arrays.items()
                   if k.startswith(prefix) and not k.startswith(prefix + "stats/")}
            records[p["name"]] = PointRecord(p["name"], p["layer"], p["role"], stats, p["info"], own)
        sensitivity = None
        if "sensitivity" in manifest:
            sensitivity = _json_frame(manifest["sensitivity"])
            sensitivity.attrs["metric"] = manifest["sensitivity"]["metric"]
        timeline = Timeline.from_arrays(manifest["timeline"], {
            k[len("timeline/"):]: v for k, v in arrays.items() if k.startswith("timeline/")
        }) if "timeline" in manifest else None
        outliers = {e["layer"]: ChannelStats.from_arrays({k: arrays[f"outliers/{i}/{k}"] for k in _OUTLIER_ARRAYS})
                    for i, e in enumerate(manifest["outliers"])} if "outliers" in manifest else None
        return Results(meta=manifest["meta"], summary=manifest["summary"], table=table, records=records,
                       sensitivity=sensitivity, timeline=timeline, outliers=outliers)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SessionFileError(
            f"{path} is a qviz session file but its content is inconsistent ({type(exc).__name__}: "
            f"{exc}); it was damaged or written by another tool: re-create it with session.save()"
        ) from exc


def save_timeline(timeline: Timeline, path) -> bool:
    """Write a QAT timeline alone to ``path``; in a ``torch.distributed`` job only rank 0 writes
    (gather it with ``rec.timeline()`` on every rank first). Returns whether this process wrote."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return False
    manifest, arrays = timeline.to_arrays()
    write_session_file(path, {"qat_timeline": manifest}, arrays)
    return True


def load_timeline(path, *, max_bytes: int | None = None) -> Timeline:
    """Read a file of :func:`save_timeline` (checked as ``qviz.load`` checks session files)."""
    manifest, arrays = read_session_file(path, max_bytes=max_bytes)
    if "qat_timeline" not in manifest:
        raise QvizError(f"{path} holds no QAT timeline: was it written by save_timeline()?")
    check_timeline(manifest["qat_timeline"], arrays, path)
    return Timeline.from_arrays(manifest["qat_timeline"], arrays)


def _frame_json(frame: pd.DataFrame) -> dict:
    """A frame indexed by layer as manifest JSON (its dtypes kept)."""
    return {
        "index": [str(i) for i in frame.index],
        "columns": list(frame.columns),
        "dtypes": [str(t) for t in frame.dtypes],
        "data": {c: [_json_value(v) for v in frame[c]] for c in frame.columns},
    }


def _json_frame(doc: dict) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(doc["data"][c], dtype=d)
                          for c, d in zip(doc["columns"], doc["dtypes"], strict=True)})
    frame.index = pd.Index(doc["index"], name="layer")
    return frame


def _json_value(v):
    return v.item() if isinstance(v, np.generic) else v

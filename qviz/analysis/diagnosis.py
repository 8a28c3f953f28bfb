"""Diagnosis: why layers lose accuracy when quantized, and what to try, from plain results.

:func:`diagnose` reads :class:`~qviz.results.Results` only (a loaded session file is enough)
and returns one row per finding: ``layer``, ``cause``, ``evidence`` (the numbers), ``fix``,
``severity`` ("high", "medium", "low"), sorted by severity, then sensitivity rank, then model order.

Precision rules, on quantized layers:

- ``activation_outliers``: the output's range (max - min) exceeds ``outlier_ratio`` times its
  central range (the ``outlier_percentile`` two-sided range of the recorded histogram).
- ``per_tensor_weight_spread``: per-tensor weights whose output channels' abs-max (of the float
  weight, BN folded) reach ``channel_spread`` times their median.
- ``heavy_clipping``: more than ``clip_frac`` of the calibration outputs fall outside the range
  by more than half a quantization step (closer ones round to the range's end like any value).
- ``dead_or_constant_channels``: output channels whose folded float weights are all ~0 (abs-max
  at most ``dead_channel`` times the layer's largest): whatever the input, such a channel outputs
  its bias, a constant (zero after a ReLU when the bias is not positive). The weights show this
  exactly and cost nothing to check, unlike per-channel activation statistics.

- ``outlier_channels``: systematic outlier channels in the layer's input (large in most tokens,
  ``kind == "systematic"`` in ``Session.outliers()``), named with the fix to try: SmoothQuant's
  migration (``Session.algorithms``), int8 or float for the layer, per-channel weights. Only
  when the outlier frame is given (``Session.diagnose`` passes it once ``outliers()`` has run).

Integrity rules, on every quantization point: ``nonfinite`` (NaN/Inf seen at calibration) and
``no_data`` (an observer that saw no finite value: its layer never ran).

With a sensitivity frame (``Session.sensitivity()``), the precision rules look only at the layers
flagged sensitive (the top ``sensitive_fraction`` by rank), where a fix pays off, with severity
raised; each of them also gets a ``sensitive`` row with its sweep figures.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from qviz.errors import ConfigError
from qviz.results import output_record

COLUMNS = ("layer", "cause", "evidence", "fix", "severity")
SEVERITIES = ("high", "medium", "low")
CAUSES = ("sensitive", "activation_outliers", "outlier_channels", "per_tensor_weight_spread", "heavy_clipping",
          "dead_or_constant_channels", "nonfinite", "no_data")


@dataclass(frozen=True)
class Thresholds:
    """When a rule fires; change any of them (``Thresholds(clip_frac=0.05)``)."""

    outlier_ratio: float = 8.0  # output range / central range
    outlier_percentile: float = 99.99  # the central range: [100 - p, p] percentiles
    channel_spread: float = 8.0  # largest / median output-channel weight abs-max (per-tensor)
    clip_frac: float = 0.01  # share of calibration outputs outside the quantization range
    dead_channel: float = 1e-6  # channel weight abs-max / the layer's largest, at most
    sensitive_fraction: float = 0.25  # share of the ranked layers flagged sensitive (at least 1)

    def __post_init__(self):
        bounds = {"outlier_ratio": (1, math.inf), "outlier_percentile": (50, 100),
                  "channel_spread": (1, math.inf), "clip_frac": (0, 1), "dead_channel": (0, 1),
                  "sensitive_fraction": (0, 1)}
        for f in fields(self):
            value, (lo, hi) = getattr(self, f.name), bounds[f.name]
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not lo <= value <= hi or (f.name != "dead_channel" and value == lo):
                raise ConfigError(f"Thresholds.{f.name} must be a number in ({lo}, {hi}], got {value!r}; "
                                  f"the default is {f.default}")


def diagnose(results, sensitivity: pd.DataFrame | None = None,
             thresholds: Thresholds | None = None, outliers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Findings for ``results`` (see the module docstring); ``sensitivity`` is the sweep's frame,
    ``outliers`` the activation outlier frame (:func:`qviz.analysis.outliers.outlier_frame`)."""
    t = thresholds or Thresholds()
    table = results.table
    order = {name: i for i, name in enumerate(table.index)}
    ranks = {} if sensitivity is None else sensitivity["rank"].to_dict()
    flagged = None if sensitivity is None else _sensitive(sensitivity, t)
    found = []
    for record in results.records.values():
        found += _integrity(record)
    for layer, row in table.iterrows():
        if not row["quantized"] or (flagged is not None and layer not in flagged):
            continue
        if flagged is not None:
            found.append(_sensitive_row(layer, sensitivity, results.summary.get("output_sqnr")))
        point = output_record(results.records, layer)
        point = point if point is not None and point.role == "output" else None  # a static output range
        weight = results.records.get(f"{layer}.weight")
        absmax = None if weight is None else weight.arrays.get("channel_absmax")
        for finding in (_outliers(layer, point, row, t), _outlier_channels(layer, outliers, row),
                        _spread(layer, row, absmax, t),
                        _clipping(layer, point, row, t), _dead(layer, absmax, t)):
            if finding is not None:
                if flagged is not None:  # a sensitive layer: its causes matter most
                    finding["severity"] = SEVERITIES[max(SEVERITIES.index(finding["severity"]) - 1, 0)]
                found.append(finding)
    frame = pd.DataFrame(found, columns=list(COLUMNS))
    if frame.empty:
        return frame
    keys = pd.DataFrame({
        "s": frame["severity"].map(SEVERITIES.index),
        "r": frame["layer"].map(lambda n: ranks.get(n, math.inf)),
        "o": frame["layer"].map(lambda n: order.get(n, -1)),
        "c": frame["cause"].map(CAUSES.index),
    })
    return frame.loc[keys.sort_values(["s", "r", "o", "c"], kind="stable").index].reset_index(drop=True)


def _finding(layer, cause, evidence, fix, severity) -> dict:
    return {"layer": layer, "cause": cause, "evidence": evidence, "fix": fix, "severity": severity}


def _apply(layer: str, **change) -> str:
    return f"s.apply({ {layer: change}!r})"


def _sensitive(frame: pd.DataFrame, t: Thresholds) -> set[str]:
    ranked = frame[np.isfinite(frame["sensitivity"].astype(float))].sort_values("rank")
    count = max(1, math.ceil(t.sensitive_fraction * len(ranked))) if len(ranked) else 0
    return set(ranked.index[:count])


def _sensitive_row(layer: str, frame: pd.DataFrame, model_sqnr: float | None) -> dict:
    row, metric = frame.loc[layer], frame.attrs.get("metric", "output_sqnr")
    unit = " dB" if metric == "output_sqnr" else ""

    def v(col):
        return f"{row[col]:.4g}{unit}"

    evidence = (f"rank {int(row['rank'])} of {len(frame)} by {metric}: quantizing only this layer gives "
                f"{v('quantize_only')} (weight only {v('weight_only')}, output activation only "
                f"{v('activation_only')}")
    evidence += f"; float model {v('float_metric')})" if math.isfinite(row["float_metric"]) else ")"
    evidence += f"; every other layer quantized and this one float gives {v('skip_only')}"
    if metric == "output_sqnr" and model_sqnr is not None:
        evidence += f" (all layers quantized: {model_sqnr:.4g} dB)"
    fix = f"keep this layer in higher precision ({_apply(layer, dtype='float')}) unless a fix below helps"
    w, a = row["weight_only"], row["activation_only"]
    if not (math.isnan(w) or math.isnan(a)) and w != a:
        worse, better = ("weights", "output activation") if w < a else ("output activation", "weights")
        fix += f"; its {worse} cost more than its {better}"
    return _finding(layer, "sensitive", evidence, fix, "medium")


def _outliers(layer, point, row, t: Thresholds) -> dict | None:
    if point is None or not point.stats.saw_data:
        return None
    stats, p = point.stats, t.outlier_percentile
    lo, hi = stats.histogram.quantile(np.array([1 - p / 100, p / 100]))
    span, core = stats.max - stats.min, hi - lo
    ratio = span / core if core > 0 else math.inf
    if not (span > 0 and ratio > t.outlier_ratio):
        return None
    central = f"{2 * p - 100:g}% [{lo:.4g}, {hi:.4g}]"
    evidence = (f"output range [{stats.min:.4g}, {stats.max:.4g}] is {ratio:.3g}x its central "
                f"{central}: a few extreme values stretch the range")
    if math.isfinite(row["scale"]) and row["scale"] > 0:
        evidence += f"; at scale {row['scale']:.3g} the central values get ~{core / row['scale']:.0f} levels"
    fix = (f"clip the extremes: set activation 'histogram' or 'percentile' "
           f"({_apply(layer, activation='percentile', percentile=99.99)}), or keep the layer float")
    return _finding(layer, "activation_outliers", evidence, fix, "medium")


def _outlier_channels(layer, outliers: pd.DataFrame | None, row) -> dict | None:
    if outliers is None or outliers.empty:
        return None
    found = outliers[(outliers["layer"] == layer) & (outliers["kind"] == "systematic")]
    if found.empty:
        return None
    found = found.sort_values("ratio_to_median", ascending=False)
    shown = ", ".join(f"{int(r.channel)} ({r.ratio_to_median:.3g}x the median channel, in "
                      f"{r.persistence:.0%} of tokens)" for r in found.head(4).itertuples())
    evidence = (f"{len(found)} systematic outlier channel(s) in this layer's input: {shown}"
                f"{', ...' if len(found) > 4 else ''}; one activation scale set by them leaves the "
                "other channels a few levels")
    keep = "int8" if "4" in str(row.get("weight_dtype", "")) else "float"  # int4 weights: int8 first
    fix = (f"migrate them into the weights with SmoothQuant: s.algorithms(layers={layer!r}, alpha=0.5) "
           f"shows its gain vs RTN (alpha 0.75 for stronger outliers); else keep the layer {keep} "
           f"({_apply(layer, dtype=keep)})")
    if str(row.get("weight_qscheme", "")).startswith("per_tensor"):  # migrated outliers need per-channel weights
        fix += f", and quantize its weights per channel ({_apply(layer, weight='per_channel')})"
    return _finding(layer, "outlier_channels", evidence, fix, "medium")


def _spread(layer, row, absmax, t: Thresholds) -> dict | None:
    if absmax is None or not str(row["weight_qscheme"]).startswith("per_tensor") or len(absmax) < 2:
        return None
    median = float(np.median(absmax))
    ratio = float(absmax.max()) / median if median > 0 else math.inf
    if not ratio > t.channel_spread:
        return None
    evidence = (f"per-tensor weights over {len(absmax)} output channels whose abs-max runs from "
                f"{absmax.min():.3g} to {absmax.max():.3g}, the largest {ratio:.3g}x the median: "
                f"one scale leaves the median channel ~{127 / ratio:.0f} of 127 levels")
    fix = f"quantize the weights per channel: {_apply(layer, weight='per_channel')}"
    return _finding(layer, "per_tensor_weight_spread", evidence, fix, "medium")


def _clipping(layer, point, row, t: Thresholds) -> dict | None:
    clip = row["clip_frac"]
    if point is None or not point.stats.saw_data or not clip > t.clip_frac:
        return None
    scale, zp = row["scale"], row["zero_point"]
    lo, hi = (point.info["quant_min"] - zp) * scale, (point.info["quant_max"] - zp) * scale
    # values within half a step of the range round to its end, as any value rounds to its
    # nearest level: they lose no more than rounding (a minmax range whose zero point was
    # rounded can end just below the max, and a tensor may hold many values at its max)
    beyond = point.stats.histogram.fraction_outside(lo - scale / 2, hi + scale / 2)
    if not beyond > t.clip_frac:
        return None
    evidence = (f"{clip:.2%} of the output values seen at calibration fall outside the quantization "
                f"range [{lo:.4g}, {hi:.4g}] (observer {row['observer']}, values "
                f"[{row['min']:.4g}, {row['max']:.4g}]) and are clipped")
    if beyond < clip:
        evidence += f"; {beyond:.2%} by more than half a step ({scale / 2:.3g})"
    fix = (f"widen the range: activation 'minmax' or a higher 'percentile' "
           f"({_apply(layer, activation='minmax')}); if a few outliers force the clipping, see "
           "activation_outliers")
    return _finding(layer, "heavy_clipping", evidence, fix, "medium")


def _dead(layer, absmax, t: Thresholds) -> dict | None:
    if absmax is None or not len(absmax):
        return None
    dead = np.flatnonzero(absmax <= t.dead_channel * absmax.max())
    if not len(dead):
        return None
    shown = ", ".join(str(i) for i in dead[:8]) + (", ..." if len(dead) > 8 else "")
    evidence = (f"{len(dead)} of {len(absmax)} output channels ({shown}) have weights ~0 (abs-max at most "
                f"{t.dead_channel:g}x the largest channel's): they output a constant, their bias, "
                "whatever the input")
    fix = ("prune these channels, or check the training or BN folding that zeroed them (a BN with "
           "weight ~0); they carry no signal and cost size, not accuracy")
    return _finding(layer, "dead_or_constant_channels", evidence, fix, "low")


def _integrity(record) -> list[dict]:
    stats, where = record.stats, f"{record.name} ({record.role})"
    found = []
    if stats.nonfinite:
        found.append(_finding(
            record.layer, "nonfinite",
            f"{stats.nonfinite:,} NaN/Inf values among the {stats.count:,} seen at {where} during "
            "calibration; qviz replaced them (NaN by 0, +-Inf by the finite max/min) so the "
            "observer saw finite values",
            "fix the model or the data that produce them (inputs, divisions, logs, overflowing "
            "exp): quantized tensors cannot hold NaN/Inf", "high"))
    if record.role != "weight" and not stats.saw_data:
        seen = (f"was called {stats.calls} time(s) but saw only NaN/Inf" if stats.calls
                else "was never called")
        found.append(_finding(
            record.layer, "no_data",
            f"the observer at {where} {seen} during calibration: its qparams are torch's "
            "defaults (scale 1, zero point 0), not the data's",
            "make sure the calibration data runs this branch of the model (the layer never ran), "
            "or leave the layer float", "high"))
    return found

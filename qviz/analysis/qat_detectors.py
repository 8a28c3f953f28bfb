"""Diagnose a QAT :class:`~qviz.results.Timeline`: what went wrong, where, when, and what to do.

Each detector reads the timeline only (no model) and yields rows: layer, point, detector, start and
end step, evidence, fix, score (how far past its threshold, for sorting). Thresholds live in
:class:`Thresholds`; change them with ``Thresholds(weight_osc_share=0.3)``. Rates are per snapshot
interval, so they depend on ``watch(every=...)``: ``every=1`` measures per training step.

- ``scale_oscillation`` / ``zero_point_oscillation``: successive changes keep reversing direction
  with a large amplitude (the range jumps back and forth instead of settling).
- ``weight_oscillation``: sampled integer weights ``round(w / s) + zp`` flip back and forth across
  rounding boundaries (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training").
- ``range_moving_at_freeze``: an observer was disabled while its range was still moving, or the
  range kept moving after it was disabled.
- ``bn_not_frozen``: BatchNorm running statistics were still updated late in training.
- ``saturation``: a large share of the values a point sees is clipped at many histogram steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from qviz.errors import ConfigError

COLUMNS = ["layer", "point", "detector", "start", "end", "evidence", "fix", "score"]


@dataclass(frozen=True)
class Thresholds:
    """When a detector fires. Shares and fractions are in (0, 1]."""

    min_snapshots: int = 6  # fewer changes than this: no verdict on oscillation
    scale_reversals: float = 0.6  # share of successive scale changes that reverse direction
    scale_amplitude: float = 0.02  # mean back-and-forth per snapshot / mean scale (see _undone)
    zero_point_amplitude: float = 2.0  # mean back-and-forth per snapshot, in integer levels
    channel_share: float = 0.25  # per-channel points: share of channels that must oscillate
    weight_flip_rate: float = 0.2  # direction reversals per snapshot interval for one weight
    weight_osc_share: float = 0.5  # share of sampled weights oscillating to flag a layer
    freeze_window: int = 5  # snapshots looked at before an observer was disabled
    freeze_change: float = 0.05  # relative scale change over that window that is "still moving"
    bn_late: float = 0.8  # BN statistics still updated past this share of the run
    clip_share: float = 0.01  # share of clipped values that counts as saturated
    clip_steps: float = 0.5  # share of histogram steps saturated to flag a point

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"Thresholds.{f.name} must be an int >= 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"Thresholds.{f.name} must be a positive number, got {value!r}")
            elif f.name not in ("scale_amplitude", "zero_point_amplitude", "freeze_change") and value > 1:
                raise ConfigError(f"Thresholds.{f.name} is a share: give a value in (0, 1], got {value!r}")


_FIX = {
    "scale_oscillation": "the range jumps back and forth: lower the learning rate, give the observer a "
                         "smaller averaging_constant, or disable observers (torch.ao.quantization."
                         "disable_observer) once ranges settle",
    "weight_jumps": "integer weights jump several levels back and forth: the learning rate is too high "
                    "for the quantization grid; lower it",
    "weight_flips": "weights flip across rounding boundaries (Nagel et al. 2022): lower the learning rate "
                    "late in training, freeze BN statistics, or freeze/dampen oscillating weights",
    "range_moving_at_freeze": "the range had not settled: disable observers later, or lower the learning "
                              "rate before freezing them",
    "range_moving_after_freeze": "the scale still changes with the observer disabled (a learnable or "
                                 "custom fake-quant?): freeze it too, or expect the converted model to differ",
    "bn_not_frozen": "freeze BN statistics for the last part of training: model.apply(torch.ao.nn."
                     "intrinsic.qat.freeze_bn_stats), as PyTorch's QAT recipe does after a few epochs",
    "saturation": "the range is too narrow for what the layer sees: keep its observer enabled longer, "
                  "widen it (MinMaxObserver, larger averaging_constant) or look for outliers in the data",
}


def diagnose(timeline, thresholds: Thresholds | None = None) -> pd.DataFrame:
    """Every finding of every detector on ``timeline``, one row each (see the module docstring)."""
    t = thresholds if thresholds is not None else Thresholds()
    if not isinstance(t, Thresholds):
        raise ConfigError(f"thresholds must be a qviz.analysis.qat_detectors.Thresholds, not {type(t).__name__}")
    rows = [*_oscillations(timeline, t), *_weight_oscillation(timeline, t), *_range_at_freeze(timeline, t),
            *_bn_not_frozen(timeline, t), *_saturation(timeline, t)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(point: dict, detector: str, start, end, evidence: str, fix: str, score: float) -> dict:
    return {"layer": point["layer"], "point": point["name"], "detector": detector, "start": int(start),
            "end": int(end), "evidence": evidence, "fix": fix, "score": float(score)}


def _reversals(changes: np.ndarray) -> int:
    """How often the non-zero changes of one series switch sign."""
    signs = np.sign(changes[changes != 0])
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def _undone(changes: np.ndarray) -> float:
    """Mean over successive pairs of non-zero changes of what the second undoes of the first: the
    amplitude of a back-and-forth (a ramp with small dips has almost none)."""
    a, b = changes[:-1], changes[1:]
    return float(np.mean(np.where(np.sign(a) != np.sign(b), np.minimum(np.abs(a), np.abs(b)), 0.0)))


def _oscillations(timeline, t: Thresholds):
    for p in timeline.points:
        steps, scale = timeline.series(p["name"], "scale")
        _, zp = timeline.series(p["name"], "zero_point")
        for detector, values, limit in (("scale_oscillation", scale, t.scale_amplitude),
                                        ("zero_point_oscillation", zp, t.zero_point_amplitude)):
            if len(steps) < 2:
                continue
            values = values.astype(np.float64)
            changes = np.diff(values, axis=0)
            hits, first, last = [], [], []
            for c in range(values.shape[1]):
                d = changes[:, c]
                moved = np.flatnonzero(np.nan_to_num(d) != 0)
                if len(moved) < t.min_snapshots:
                    continue
                share = _reversals(d[moved]) / (len(moved) - 1)
                amplitude = _undone(d[moved])
                if detector == "scale_oscillation":
                    amplitude /= np.mean(np.abs(values[:, c]))
                if share >= t.scale_reversals and amplitude >= limit:
                    hits.append((share, amplitude))
                    first.append(steps[moved[0]])
                    last.append(steps[moved[-1] + 1])
            k = values.shape[1]
            if not hits or len(hits) / k < (t.channel_share if k > 1 else 1):
                continue
            share, amplitude = np.mean(hits, axis=0)
            unit = f"{amplitude:.1%} of its value" if detector == "scale_oscillation" else f"{amplitude:.1f} levels"
            where = f"{len(hits)} of {k} channels: " if k > 1 else ""
            evidence = (f"{where}{detector.split('_osc')[0]} reversed direction at {share:.0%} of its changes, "
                        f"going back and forth by {unit} per snapshot on average")
            yield _row(p, detector, min(first), max(last), evidence, _FIX["scale_oscillation"], amplitude / limit)


def _weight_oscillation(timeline, t: Thresholds):
    for p in timeline.points:
        steps, ints = timeline.series(p["name"], "weight_int")
        _, flags = timeline.series(p["name"], "flags")
        if len(steps) < 2 or ints.size == 0:
            continue
        on = flags[:, 0] != 0  # integer weights matter while fake-quant is on
        steps, ints = steps[on], ints[on].astype(np.int64)
        intervals = len(steps) - 1
        if intervals < t.min_snapshots:
            continue
        changes = np.diff(ints, axis=0)
        rates = np.array([_reversals(changes[:, j]) for j in range(changes.shape[1])]) / intervals
        oscillating = rates >= t.weight_flip_rate
        share = oscillating.mean()
        if share < t.weight_osc_share:
            continue
        moved = changes[:, oscillating]
        jump = np.abs(moved[moved != 0]).mean()
        active = np.flatnonzero((moved != 0).any(axis=1))
        evidence = (f"{share:.0%} of {len(rates)} sampled integer weights reversed direction in at least "
                    f"{t.weight_flip_rate:.0%} of {intervals} snapshot intervals (mean jump {jump:.1f} levels)")
        fix = _FIX["weight_jumps"] if jump >= 1.5 else _FIX["weight_flips"]
        yield _row(p, "weight_oscillation", steps[active[0]], steps[active[-1] + 1], evidence, fix,
                   share / t.weight_osc_share)


def _relative_change(values: np.ndarray) -> float:
    """Median over channels of the largest relative distance from the first row."""
    ref = np.abs(values[0]) + 1e-30
    return float(np.nanmedian(np.max(np.abs(values - values[0]), axis=0) / ref))


def _range_at_freeze(timeline, t: Thresholds):
    points = {p["name"]: p for p in timeline.points}
    for step, _, name, kind, _ in timeline.events:
        if kind != "observer_disabled" or name not in points:
            continue
        steps, scale = timeline.series(name, "scale")
        scale = scale.astype(np.float64)
        before = np.flatnonzero(steps < step)[-(t.freeze_window + 1):]
        if len(before) >= 2:
            change = _relative_change(scale[before])
            if change >= t.freeze_change:
                evidence = (f"observer disabled at step {step} while its scale still moved {change:.1%} over "
                            f"the {len(before)} snapshots before (steps {steps[before[0]]}-{steps[before[-1]]})")
                yield _row(points[name], "range_moving_at_freeze", steps[before[0]], step, evidence,
                           _FIX["range_moving_at_freeze"], change / t.freeze_change)
        later = [e[0] for e in timeline.events if e[2] == name and e[3] == "observer_enabled" and e[0] > step]
        after = np.flatnonzero((steps >= step) & (steps < min(later, default=np.iinfo(np.int64).max)))
        if len(after) >= 2:
            change = _relative_change(scale[after])
            if change >= t.freeze_change:
                evidence = f"scale moved {change:.1%} after the observer was disabled at step {step}"
                yield _row(points[name], "range_moving_at_freeze", step, steps[after[-1]], evidence,
                           _FIX["range_moving_after_freeze"], change / t.freeze_change)


def _bn_not_frozen(timeline, t: Thresholds):
    total = int(timeline.meta["steps"])
    late = int(np.ceil(t.bn_late * total))
    for bn in timeline.batchnorms:
        if bn["updating"] is None:
            continue
        changes = [(e[0], e[3]) for e in timeline.events if e[2] == bn["name"] and e[3] in ("bn_frozen", "bn_unfrozen")]
        frozen_at = changes[-1][0] if changes and changes[-1][1] == "bn_frozen" else None
        if bn["updating"]:
            since = changes[-1][0] if changes else 0
            evidence = (f"running statistics still updated at the last step ({total - 1}), "
                        + (f"again since step {since}" if changes else "never frozen"))
        elif frozen_at is not None and frozen_at > late:
            evidence = f"running statistics frozen only at step {frozen_at}, {frozen_at / total:.0%} into the run"
        else:
            continue
        point = {"layer": bn["layer"], "name": bn["name"]}
        yield _row(point, "bn_not_frozen", late, total - 1, evidence, _FIX["bn_not_frozen"],
                   (frozen_at if frozen_at is not None else total) / max(late, 1))


def _saturation(timeline, t: Thresholds):
    for p in timeline.points:
        steps, clip = timeline.series(p["name"], "clip_frac")
        seen = np.isfinite(clip) if clip.size else np.zeros(0, dtype=bool)
        if not seen.any():
            continue
        steps, clip = steps[seen], clip[seen]
        saturated = clip > t.clip_share
        if saturated.mean() < t.clip_steps:
            continue
        evidence = (f"{clip.mean():.1%} of values clipped on average (max {clip.max():.1%}); over "
                    f"{t.clip_share:.0%} at {saturated.sum()} of {len(clip)} histogram steps")
        yield _row(p, "saturation", steps[saturated][0], steps[saturated][-1], evidence, _FIX["saturation"],
                   clip.mean() / t.clip_share)

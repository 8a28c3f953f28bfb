"""Probes: forward pre-hooks on every quantization point that record what it sees.

A probe sees exactly the tensor its observer or fake-quant sees and feeds it to an
:class:`~qviz.capture.stats.ActivationStats` (fixed memory per point). NaN/Inf values are
counted and replaced by 0 (NaN) or the finite max/min of that tensor (+Inf/-Inf) before the
observer runs, so one bad batch cannot poison the qparams and the run completes; the counts
appear in the ``nonfinite`` column. Hooks are removed in ``finally``, whatever happens.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import numpy as np
import torch
from torch import nn

from qviz.capture.stats import ActivationStats
from qviz.errors import ModelError
from qviz.flows.base import QuantPoint
from qviz.flows.layers import is_fake_quant
from qviz.results import PointRecord


def _sanitize(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x with NaN -> 0, +Inf -> its finite max, -Inf -> its finite min; count of those values).

    The observer then sees the same range the statistics record (which skip non-finite values).
    """
    if not x.is_floating_point():
        return x, 0
    finite = torch.isfinite(x)
    bad = int(x.numel() - finite.sum())
    if bad == 0:
        return x, 0
    values = x[finite]
    lo, hi = (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)
    return torch.nan_to_num(x, nan=0.0, posinf=hi, neginf=lo), bad


@contextlib.contextmanager
def probing(points: list[QuantPoint]):
    """Attach a recording probe to every point for the duration of the ``with`` block."""
    records = {p.name: PointRecord(p.name, p.layer, p.role, ActivationStats()) for p in points}
    handles = []

    def make_hook(record: PointRecord, point: QuantPoint):
        def hook(module, args):
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return None
            if not (x.is_floating_point() or x.is_quantized):
                raise _integer_input(point, x.dtype)
            x = x.detach()
            seen = record.stats.nonfinite
            record.stats.update(x)  # one min/max pass; it counts NaN/Inf when there are any
            if record.stats.nonfinite == seen:
                return None
            clean, _ = _sanitize(x)
            return (clean, *args[1:])

        return hook

    try:
        for p in points:
            handles.append(p.module.register_forward_pre_hook(make_hook(records[p.name], p)))
        yield records
    finally:
        for h in handles:
            h.remove()


def _integer_input(point: QuantPoint, dtype: torch.dtype) -> ModelError:
    """An integer tensor (a mask, token ids) met an observer: torch can quantize floats only."""
    where = point.origin or f"the {point.role} of {point.layer!r}"
    fix = f"`{point.leave_float}`" if point.leave_float else "a qconfig of None for that op"
    return ModelError(
        f"an integer tensor ({str(dtype).replace('torch.', '')}) reaches the quantization point "
        f"{point.name!r}, {where}: torch's observers and quantize ops take floating-point tensors "
        f"only (HistogramObserver fails in histc, the converted model in quantize_per_tensor). Leave "
        f"that op float with {fix} in the QConfigMapping you pass as qviz.Session(..., "
        "qconfig_mapping=...), or cast the tensor to float in the model (e.g. mask.to(x.dtype))"
    )


def _numpy(value) -> np.ndarray:
    return value.detach().double().cpu().numpy().reshape(-1) if isinstance(value, torch.Tensor) else np.asarray([value], dtype=np.float64)


def _histogram_state(observer) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().clone() for t in (observer.histogram, observer.min_val, observer.max_val))


def _kept_qparams(observer):
    """The qparams :func:`_qparams_kept` computed, while the observer's state is the same."""
    state, (scale, zero_point) = observer._qviz_qparams
    if all(torch.equal(a, b) for a, b in zip(state, _histogram_state(observer), strict=True)):
        return scale.clone(), zero_point.clone()
    return type(observer).calculate_qparams(observer)


def _qparams_kept(module: nn.Module):
    """``module.calculate_qparams()``; a HistogramObserver keeps the result for convert to reuse
    while its histogram and range are unchanged (a copy keeps it too): its search over 2048 bins
    is slow, and convert would run it a second time for the same answer."""
    result = module.calculate_qparams()
    if isinstance(getattr(module, "histogram", None), torch.Tensor) and "_qviz_qparams" not in vars(module):
        module._qviz_qparams = (_histogram_state(module), tuple(t.clone() for t in result))
        module.calculate_qparams = types.MethodType(_kept_qparams, module)
    return result


def describe(record: PointRecord, module: nn.Module) -> PointRecord:
    """Fill ``record.info`` / ``record.arrays`` from the point's final state (duck typed)."""
    observer = getattr(module, "activation_post_process", module)
    kind = type(module).__name__
    if observer is not module:
        kind = f"{kind}({type(observer).__name__})"
    info = {
        "observer": kind,
        "dtype": str(getattr(module, "dtype", getattr(observer, "dtype", ""))).replace("torch.", ""),
        "qscheme": str(getattr(module, "qscheme", getattr(observer, "qscheme", ""))).replace("torch.", ""),
        "quant_min": int(getattr(module, "quant_min", getattr(observer, "quant_min", 0)) or 0),
        "quant_max": int(getattr(module, "quant_max", getattr(observer, "quant_max", 255)) or 0),
        "saw_data": record.stats.saw_data,
    }
    if is_fake_quant(module):
        info["fake_quant_enabled"] = bool(module.fake_quant_enabled[0])
        info["observer_enabled"] = bool(module.observer_enabled[0])
    arrays = {}
    for attr in ("min_val", "max_val"):
        value = getattr(observer, attr, None)
        if isinstance(value, torch.Tensor) and value.numel():
            arrays[attr] = _numpy(value)
    if record.stats.saw_data or is_fake_quant(module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                scale, zero_point = _qparams_kept(module)
                arrays["scale"], arrays["zero_point"] = _numpy(scale), _numpy(zero_point)
            except Exception:  # noqa: BLE001 - an observer with odd state must not stop the run
                pass
    record.info, record.arrays = info, arrays
    return record

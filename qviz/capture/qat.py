"""The QAT timeline: ``qviz.watch(qat_model)`` records every fake-quant and observer across training.

A **step** is one forward call of the watched model in training mode (eval-mode calls, e.g.
validation, are not steps; with gradient accumulation every forward is a step). Steps count from 0
when recording starts; ``rec.log(loss=...)`` attaches scalars to the latest step.

- Every step, cheaply: enable flags and BatchNorm running-stat updates are checked through tensor
  version counters, so events (observer / fake-quant disabled or enabled, BN stats frozen or
  unfrozen) are dated by the first step that ran with the new state.
- Every ``every`` steps (a forward hook on the root model, after the step): each point's scale,
  zero_point, observed min/max and flags, read straight from its buffers into preallocated numpy
  buffers, and the integer values ``round(w / s) + zp`` of ``weight_samples`` fixed weights per
  weight fake-quant (what Nagel et al. 2022 track to find oscillating weights).
- Every ``histograms_every`` steps: forward pre-hooks on the points, for that step only, feed a
  :class:`~qviz.capture.histogram.StreamingHistogram` of the values each point sees and its clipped
  share under the step's qparams (values more than half a step beyond the grid's ends).

Storage is bounded: snapshot buffers hold ``max_snapshots`` rows; when full every second row is
dropped and the stride doubles (same for histograms and logged scalars). Per point and snapshot:
``16 * K + 2`` bytes (K channels, 1 per tensor) plus ``2 * weight_samples`` for weight
fake-quants; per point and histogram: ``8 * bins + 56`` bytes; 8 bytes per row for the steps.
With the defaults a weight point never holds more than ``256 * (16K + 2 + 128) + 32 * 2104``
bytes and a per-tensor activation point 72 KB, however long training runs. :meth:`Recorder.max_nbytes` gives the bound.

In a ``torch.distributed`` job every rank watches its own replica; :meth:`Recorder.timeline` is a
collective that combines ranks (min of minima, max of maxima, merged activation histograms, mean
scalars; scale, flags and weights from rank 0); :func:`qviz.io.results_file.save_timeline` writes
from rank 0 only. Hooks are removed when recording stops, whatever happens; the model is not
otherwise modified.

The :class:`~qviz.results.timeline.Timeline` is plain data; :func:`qviz.analysis.qat_detectors.diagnose`
reads it (``diagnose(rec.timeline())``); ``Session.from_qat(model, rec, calib)`` converts the QAT model and compares it with its fake-quantized self
(:func:`fake_quant_vs_int8`); :class:`QvizCallback` drives a recorder from a Lightning ``Trainer``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from qviz.analysis.metrics import ErrorAccumulator
from qviz.capture.histogram import StreamingHistogram
from qviz.errors import ConfigError, QvizError
from qviz.flows.base import BACKENDS, QuantPoint, call_model, positional
from qviz.flows.layers import is_fake_quant
from qviz.flows.torch_ao.eager import EagerFlow
from qviz.flows.torch_ao.fx import FxFlow, is_fx_prepared
from qviz.flows.torchao.flow import fake_quantizer_range, is_torchao_fake_quantizer
from qviz.results.timeline import HISTOGRAM_ARRAYS, QUANTITIES, Timeline

_STEP_BYTES = 8  # the shared step column, per row
_NAN = torch.full((1,), math.nan)  # a min/max an observer does not have


def _unwrap(model: nn.Module) -> nn.Module:
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def _quant_points(model: nn.Module):
    """Points named and mapped to layers as the flows do (FX via the observed node)."""
    from qviz.flows.pt2e.graph import is_pt2e_prepared, qat_points

    if is_pt2e_prepared(model):  # prepare_qat_pt2e: aten graph, layers named by nn_module_stack
        return qat_points(model)
    backend = next(b for b in BACKENDS if b in torch.backends.quantized.supported_engines)
    flow = FxFlow(backend) if is_fx_prepared(model) else EagerFlow(backend)
    return flow.quant_points(model) + _torchao_points(model)


def _torchao_points(model: nn.Module) -> list[QuantPoint]:
    """torchao QAT fake quantizers (``quantize_(model, QATConfig(...))``): scale/zero_point are plain
    attributes set by their first forward; the activation one quantizes the Linear's input."""
    roles = {"weight_fake_quantizer": "weight", "activation_fake_quantizer": "input"}
    points = []
    for name, module in model.named_modules():
        if is_torchao_fake_quantizer(module):
            layer, _, attr = name.rpartition(".")
            points.append(QuantPoint(name, module, layer, roles.get(attr, "output")))
    return points


def _host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """1-d numpy arrays of the tensors, to be read at once: views on the CPU, else one transfer."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is None:
        return [np.ravel(t.detach().numpy() if t.requires_grad else t.numpy()) for t in tensors]
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors]).cpu().numpy()
    return np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])


def _dist():
    """(rank, world size) of an initialised torch.distributed job, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


class _Rows:
    """Which rows a bounded buffer keeps: every ``stride`` steps, the stride doubling (and every
    second row dropped) each time the buffer is full."""

    def __init__(self, stride: int, capacity: int):
        self.capacity, self.n, self.stride = capacity, 0, stride
        self.steps = np.zeros(capacity, dtype=np.int64)

    def takes(self, step: int) -> bool:
        return step % self.stride == 0

    def claim(self, step: int, arrays) -> int:
        """The row for ``step`` (a step :meth:`takes`), dropping every 2nd row when full."""
        if self.n == self.capacity:
            for a in (self.steps, *arrays):
                a[: (self.n + 1) // 2] = a[: self.n : 2]
            self.n = (self.n + 1) // 2
            self.stride *= 2  # the capacity is even: ``step`` is a multiple of the new stride
        self.steps[self.n] = step
        self.n += 1
        return self.n - 1


class _Point:
    """One quantization point: where its buffers are and what was recorded of it."""

    def __init__(self, qp, weight_samples: int):
        self.name, self.layer, self.role, self.module = qp.name, qp.layer, qp.role, qp.module
        self.observer = getattr(qp.module, "activation_post_process", qp.module)
        self.flag_tensors = (qp.module.fake_quant_enabled, qp.module.observer_enabled) if is_fake_quant(qp.module) else ()
        self.flags = tuple(int(t.reshape(-1)[0]) for t in self.flag_tensors)
        self.samples = weight_samples if self.role == "weight" and self.flag_tensors else 0
        self.quant_min = int(getattr(qp.module, "quant_min", getattr(self.observer, "quant_min", 0)))
        self.quant_max = int(getattr(qp.module, "quant_max", getattr(self.observer, "quant_max", 255)))
        self.ch_axis = int(getattr(qp.module, "ch_axis", getattr(self.observer, "ch_axis", 0)))
        if fake_quantizer_range(qp.module) is not None:  # torchao: the range of its config's dtype
            self.quant_min, self.quant_max = fake_quantizer_range(qp.module)
        self.k = 0  # channels, known after the first step
        self.data: dict[str, np.ndarray] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.index = self.chan = self.index_t = None  # sampled weights: flat index, channel of each
        self.pending_hist: StreamingHistogram | None = None
        self.pending_weight: torch.Tensor | None = None

    def info(self) -> dict:
        m = self.module
        return {
            "name": self.name, "layer": self.layer, "role": self.role,
            "observer": type(m).__name__ if self.observer is m else f"{type(m).__name__}({type(self.observer).__name__})",
            "dtype": str(getattr(m, "dtype", getattr(self.observer, "dtype", ""))).replace("torch.", ""),
            "qscheme": str(getattr(m, "qscheme", getattr(self.observer, "qscheme", ""))).replace("torch.", ""),
            "quant_min": self.quant_min, "quant_max": self.quant_max, "channels": self.k,
            "ch_axis": self.ch_axis, "has_flags": bool(self.flag_tensors),
        }

    def tensors(self) -> list[torch.Tensor]:
        """scale, zero_point, min, max, flags: the buffers a snapshot reads."""
        scale, zp = getattr(self.module, "scale", None), getattr(self.module, "zero_point", None)
        if not (isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor)):
            if not hasattr(self.module, "calculate_qparams"):  # torchao: not computed yet (disabled)
                scale, zp = _NAN, _NAN
            else:
                scale, zp = self.module.calculate_qparams()  # a plain observer keeps no qparams
        lo, hi = (getattr(self.observer, a, None) for a in ("min_val", "max_val"))
        lo, hi = (t if isinstance(t, torch.Tensor) and t.numel() else _NAN for t in (lo, hi))
        return [scale, zp, lo, hi, *self.flag_tensors]

    def allocate(self, values: list[np.ndarray], capacity: int) -> None:
        self.k = max(v.size for v in values[:4])
        for q in QUANTITIES:
            self.data[q] = np.full((capacity, self.k), np.nan, dtype=np.float32)
        self.data["flags"] = np.full((capacity, 2), -1, dtype=np.int8)
        if self.index is not None:
            self.samples = self.index.size  # a weight smaller than weight_samples
        if self.samples:
            wide = self.quant_min < -(2**15) or self.quant_max >= 2**15
            self.data["weight_int"] = np.zeros((capacity, self.samples), dtype=np.int32 if wide else np.int16)

    def store(self, row: int, values: list[np.ndarray]) -> None:
        for q, v in zip(QUANTITIES, values, strict=False):
            self.data[q][row] = v if v.size == self.k else np.nan  # a buffer that changed shape
        if self.flag_tensors:
            self.data["flags"][row] = [values[4][0], values[5][0]]
        if self.pending_weight is not None:
            w = _host([self.pending_weight])[0]
            scale = self.data["scale"][row][self.chan] if self.k > 1 else self.data["scale"][row][0]
            zp = self.data["zero_point"][row][self.chan] if self.k > 1 else self.data["zero_point"][row][0]
            q = np.rint(w.astype(np.float32) * (1 / scale.astype(np.float32))) + zp
            self.data["weight_int"][row, : q.size] = np.clip(np.nan_to_num(q), self.quant_min, self.quant_max)
            self.pending_weight = None

    def sample(self, x: torch.Tensor, rng: np.random.Generator) -> None:
        if self.index is None:
            n = min(self.samples, x.numel())
            flat = np.sort(rng.choice(x.numel(), size=n, replace=False))
            self.index = flat
            self.chan = np.unravel_index(flat, tuple(x.shape))[self.ch_axis % x.dim()] if x.dim() else flat * 0
            self.index_t = torch.as_tensor(flat, device=x.device)
        self.pending_weight = x.detach().reshape(-1)[self.index_t]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.data.values(), *self.hist.values()))


class Recorder:
    """Records a QAT run; made by :func:`watch`. Use it as a context manager around training."""

    def __init__(self, model: nn.Module, *, every: int = 10, histograms_every: int | None = 100,
                 bins: int = 256, max_snapshots: int = 256, max_histograms: int = 32,
                 weight_samples: int = 64, max_scalars: int = 4096, max_events: int = 10_000,
                 seed: int = 0):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"watch() needs the QAT model (a torch.nn.Module), got {type(model).__name__}")
        _check_int("every", every, 1)
        _check_int("weight_samples", weight_samples, 0)
        _check_int("max_events", max_events, 0)
        for name, value in (("max_snapshots", max_snapshots), ("max_histograms", max_histograms),
                            ("max_scalars", max_scalars)):
            _check_int(name, value, 2, even=True)
        if histograms_every is not None:
            _check_int("histograms_every", histograms_every, 1)
        StreamingHistogram(bins)  # validates bins
        self.model = _unwrap(model)
        points = _quant_points(self.model)
        if not points:
            raise ConfigError(
                f"{type(self.model).__name__} has no fake-quants or observers: watch a model prepared "
                "with torch.ao.quantization.prepare_qat or quantize_fx.prepare_qat_fx"
            )
        self.every, self.histograms_every, self.bins = every, histograms_every, bins
        self.max_scalars, self.max_events = max_scalars, max_events
        self._points = [_Point(p, weight_samples) for p in points]
        self._modules: dict[int, list[_Point]] = {}  # FX may share one module between points
        for p in self._points:
            self._modules.setdefault(id(p.module), []).append(p)
        self._flag_tensors = [t for p in self._points for t in p.flag_tensors]
        self._versions = [t._version for t in self._flag_tensors]
        self._bns = _batchnorms(self.model)
        self._snap = _Rows(every, max_snapshots)
        self._hrows = _Rows(histograms_every or 1, max_histograms)
        self._scalars: dict[str, tuple[_Rows, np.ndarray]] = {}
        self._scalar_calls: dict[str, int] = {}
        self._events: list[tuple] = []
        self.events_dropped = 0
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._handles: list = []
        self._point_handles: list = []
        self._live = None  # (snapshot?, histogram?) of the step running now

    # -- starting and stopping -----------------------------------------------------------------
    def start(self) -> Recorder:
        """Attach the two root hooks (recording resumes where it stopped)."""
        if self._handles:
            raise QvizError("this recorder is already recording: stop() it first")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._before))
            self._handles.append(self.model.register_forward_hook(self._after))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove every hook qviz put on the model."""
        self._detach_points()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._live = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def step(self) -> int:
        """Steps recorded so far (the next step's index)."""
        return self._step

    # -- per step ------------------------------------------------------------------------------
    def _before(self, module, args):
        self._detach_points()  # left over when the previous forward raised
        self._live = None
        if not module.training:
            return
        step = self._step
        self._check_flags(step)
        for bn in self._bns:
            bn.before = bn.version()
        snapshot = self._snap.takes(step)
        histogram = self.histograms_every is not None and self._hrows.takes(step)
        self._live = (snapshot, histogram)
        for points in self._modules.values():
            sampled = [p for p in points if p.samples] if snapshot else []
            if histogram:
                shared = StreamingHistogram(self.bins)
                for p in points:
                    p.pending_hist = shared
            if histogram or sampled:
                hook = self._point_hook(shared if histogram else None, sampled)
                self._point_handles.append(points[0].module.register_forward_pre_hook(hook))

    def _point_hook(self, hist: StreamingHistogram | None, sampled: list[_Point]):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return
            if hist is not None:
                hist.update(x)
            if x.numel():
                for p in sampled:
                    p.sample(x, self._rng)

        return hook

    def _after(self, module, args, output):
        if self._live is None:
            return
        snapshot, histogram = self._live
        step = self._step
        try:
            self._check_bn(step)
            if snapshot:
                self._snapshot(step)
            if histogram:
                self._store_histograms(step)
        finally:
            self._detach_points()
            self._live = None
            self._step += 1

    def _detach_points(self) -> None:
        for h in self._point_handles:
            h.remove()
        self._point_handles = []
        for p in self._points:
            p.pending_hist = p.pending_weight = None

    def _event(self, step: int, layer: str, point: str, kind: str, detail: str) -> None:
        if len(self._events) < self.max_events:
            self._events.append((step, layer, point, kind, detail))
        else:
            self.events_dropped += 1

    def _check_flags(self, step: int) -> None:
        versions = [t._version for t in self._flag_tensors]  # in-place writes move them
        if versions == self._versions:
            return
        self._versions = versions
        for p in self._points:
            if not p.flag_tensors:
                continue
            flags = tuple(int(t.reshape(-1)[0]) for t in p.flag_tensors)
            for what, old, new in zip(("fake_quant", "observer"), p.flags, flags, strict=True):
                if bool(old) != bool(new):
                    self._event(step, p.layer, p.name, f"{what}_{'enabled' if new else 'disabled'}",
                                f"{what}_enabled: {old} -> {new}")
            p.flags = flags

    def _check_bn(self, step: int) -> None:
        for bn in self._bns:
            updating = bn.before is not None and bn.version() != bn.before and bn.module.momentum != 0
            if bn.updating is not None and updating != bn.updating:
                self._event(step, bn.layer, bn.name, "bn_unfrozen" if updating else "bn_frozen", bn.detail())
            bn.updating = updating

    def _snapshot(self, step: int) -> None:
        tensors = [p.tensors() for p in self._points]
        flat = _host([t for ts in tensors for t in ts])
        if not self._points[0].data:
            at = 0
            for p, ts in zip(self._points, tensors, strict=True):
                p.allocate(flat[at : at + len(ts)], self._snap.capacity)
                at += len(ts)
        row = self._snap.claim(step, [a for p in self._points for a in p.data.values()])
        at = 0
        for p, ts in zip(self._points, tensors, strict=True):
            p.store(row, flat[at : at + len(ts)])
            at += len(ts)

    def _store_histograms(self, step: int) -> None:
        if not self._points[0].hist:
            n = self._hrows.capacity
            for p in self._points:
                p.hist = {"counts": np.zeros((n, self.bins), dtype=np.int64),
                          **{k: np.full(n, np.nan) for k in ("lo", "width", "min", "max", "clip_frac", "scale", "zero_point")}}
        row = self._hrows.claim(step, [a for p in self._points for a in p.hist.values()])
        tensors = [p.tensors()[:2] for p in self._points]
        flat = _host([t for ts in tensors for t in ts])
        for i, p in enumerate(self._points):
            h, scale, zp = p.pending_hist, flat[2 * i], flat[2 * i + 1]
            for k, v in h.to_arrays().items():
                p.hist[k][row] = v
            if scale.size == 1:
                p.hist["scale"][row], p.hist["zero_point"][row] = scale[0], zp[0]
                p.hist["clip_frac"][row] = _clip(h, scale[0], zp[0], p.quant_min, p.quant_max)

    # -- scalars -------------------------------------------------------------------------------
    def log(self, **scalars) -> None:
        """Attach scalars (loss, lr, ...) to the latest step (step 0 before the first forward)."""
        step = max(self._step - 1, 0)
        for name, value in scalars.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            if name not in self._scalars:
                rows = _Rows(1, self.max_scalars)
                self._scalars[name] = (rows, np.zeros(self.max_scalars))
                self._scalar_calls[name] = 0
            rows, values = self._scalars[name]
            if rows.n and rows.steps[rows.n - 1] == step:
                values[rows.n - 1] = value  # logged twice in a step: keep the last
                continue
            calls = self._scalar_calls[name]  # scalars thin out by call count, not by step
            self._scalar_calls[name] = calls + 1
            if rows.takes(calls):
                row = rows.claim(calls, [values])
                rows.steps[row], values[row] = step, value

    # -- results -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the recorded arrays now (events aside: at most ``max_events`` of them)."""
        scalars = sum(r.steps.nbytes + v.nbytes for r, v in self._scalars.values())
        return sum(p.nbytes() for p in self._points) + self._snap.steps.nbytes + self._hrows.steps.nbytes + scalars

    def max_nbytes(self) -> int:
        """What :meth:`nbytes` can never exceed, however long training runs (channels as seen so far)."""
        c, h = self._snap.capacity, self._hrows.capacity
        per_point = sum(c * (16 * max(p.k, 1) + 2 + 2 * p.samples) + h * (8 * self.bins + 56) for p in self._points)
        return per_point + _STEP_BYTES * (c + h) + len(self._scalars) * self.max_scalars * 16

    def _local(self) -> Timeline:
        arrays = {"steps": self._snap.steps[: self._snap.n].copy(), "hist_steps": self._hrows.steps[: self._hrows.n].copy()}
        for i, p in enumerate(self._points):
            for k, a in p.data.items():
                arrays[f"{i}/{k}"] = a[: self._snap.n].copy()
            for k, a in p.hist.items():
                arrays[f"{i}/hist/{k}"] = a[: self._hrows.n].copy()
            if p.index is not None:
                arrays[f"{i}/weight_index"] = p.index.copy()
                arrays[f"{i}/weight_int"] = arrays[f"{i}/weight_int"][:, : p.index.size]
            else:
                arrays.pop(f"{i}/weight_int", None)  # its fake-quant never ran on a snapshot step
        names = list(self._scalars)
        for j, name in enumerate(names):
            rows, values = self._scalars[name]
            arrays[f"scalars/{j}/steps"], arrays[f"scalars/{j}/values"] = rows.steps[: rows.n].copy(), values[: rows.n].copy()
        meta = {"every": self.every, "histograms_every": self.histograms_every, "bins": self.bins,
                "steps": self._step, "snapshot_stride": self._snap.stride, "histogram_stride": self._hrows.stride,
                "events_dropped": self.events_dropped, "world_size": 1}
        return Timeline(meta=meta, points=[p.info() for p in self._points], arrays=arrays,
                        events=[list(e) for e in self._events], scalar_names=names,
                        batchnorms=[{"name": b.name, "layer": b.layer, "updating": b.updating} for b in self._bns])

    def timeline(self) -> Timeline:
        """What was recorded, as plain data; a collective in a distributed job (call it on every rank)."""
        local = self._local()
        world = _dist()[1]
        if world == 1:
            return local
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, local.to_arrays())
        return combine([Timeline.from_arrays(*g) for g in gathered])


def _check_int(name: str, value, low: int, even: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (even and value % 2):
        kind = "an even int" if even else "an int"
        raise ConfigError(f"{name} must be {kind} >= {low}, got {value!r}")


def watch(model: nn.Module, every: int = 10, histograms_every: int | None = 100, **options) -> Recorder:
    """A :class:`Recorder` of ``model`` (prepared with prepare_qat or prepare_qat_fx, DDP-wrapped or
    not); ``with qviz.watch(model) as rec:`` records while the block runs. Options: ``bins``,
    ``max_snapshots``, ``max_histograms``, ``weight_samples``, ``max_scalars``, ``max_events``, ``seed``."""
    return Recorder(model, every=every, histograms_every=histograms_every, **options)


def _clip(h: StreamingHistogram, scale: float, zp: float, qmin: int, qmax: int) -> float:
    """Share of values clipped: beyond the grid's ends by more than half a step (rounding)."""
    if h.total == 0 or not (np.isfinite(scale) and scale > 0):
        return math.nan
    return h.fraction_outside((qmin - 0.5 - zp) * scale, (qmax + 0.5 - zp) * scale)


class _BatchNorm:
    """A BatchNorm whose running statistics are updated in a step when ``num_batches_tracked`` is
    written (its version counter moves) and momentum is not 0."""

    def __init__(self, name: str, module: nn.Module, owner: nn.Module | None):
        self.name, self.module, self.owner = name, module, owner  # owner: a QAT ConvBn (freeze_bn)
        self.layer = name.rpartition(".")[0] if owner is not None else name
        self.before = None
        self.updating: bool | None = None  # in the latest step

    def version(self) -> int | None:
        counter = self.module.num_batches_tracked
        return counter._version if counter is not None else None

    def detail(self) -> str:
        bn = self.module
        text = f"training={bn.training}, track_running_stats={bn.track_running_stats}, momentum={bn.momentum}"
        return f"freeze_bn={self.owner.freeze_bn}, {text}" if self.owner is not None else text


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parent = modules.get(name.rpartition(".")[0])
            out.append(_BatchNorm(name, m, parent if hasattr(parent, "freeze_bn") else None))
    return out


def combine(timelines: list[Timeline]) -> Timeline:
    """One timeline from every rank's (rank 0 first): min of minima, max of maxima, merged activation
    histograms (clip share recomputed under rank 0's qparams), mean scalars; scale, flags and
    everything about weights (replicas, not shards) from rank 0."""
    first = timelines[0]
    arrays = dict(first.arrays)
    steps = _common([t.arrays["steps"] for t in timelines])
    hsteps = _common([t.arrays["hist_steps"] for t in timelines])
    rows = [np.searchsorted(t.arrays["steps"], steps) for t in timelines]
    hrows = [np.searchsorted(t.arrays["hist_steps"], hsteps) for t in timelines]
    arrays["steps"], arrays["hist_steps"] = steps, hsteps
    for key in first.arrays:
        head, _, tail = key.rpartition("/")
        if key.startswith("scalars/") or tail == "weight_index" or key in ("steps", "hist_steps"):
            continue
        if head.endswith("/hist"):
            arrays[key] = first.arrays[key][hrows[0]]
        else:
            arrays[key] = first.arrays[key][rows[0]]
            if tail in ("min", "max"):
                pick = np.fmin if tail == "min" else np.fmax
                arrays[key] = pick.reduce([t.arrays[key][r] for t, r in zip(timelines, rows, strict=True)])
    for i, p in enumerate(first.points):
        if f"{i}/hist/counts" not in first.arrays or p["role"] == "weight":
            continue
        for row in range(len(hsteps)):
            merged = StreamingHistogram(first.meta["bins"])
            for t, r in zip(timelines, hrows, strict=True):
                merged.merge(StreamingHistogram.from_arrays({k: t.arrays[f"{i}/hist/{k}"][r[row]] for k in HISTOGRAM_ARRAYS}))
            for k, v in merged.to_arrays().items():
                arrays[f"{i}/hist/{k}"][row] = v
            scale, zp = arrays[f"{i}/hist/scale"][row], arrays[f"{i}/hist/zero_point"][row]
            arrays[f"{i}/hist/clip_frac"][row] = _clip(merged, scale, zp, p["quant_min"], p["quant_max"])
    for j, name in enumerate(first.scalar_names):
        frames = [t.scalars()[name].dropna() for t in timelines if name in t.scalar_names]
        mean = pd.concat(frames, axis=1).dropna().mean(axis=1)
        arrays[f"scalars/{j}/steps"], arrays[f"scalars/{j}/values"] = mean.index.to_numpy(np.int64), mean.to_numpy(np.float64)
    events = sorted({tuple(e) for t in timelines for e in t.events}, key=lambda e: (e[0], e[2], e[3]))
    meta = dict(first.meta, world_size=len(timelines), events_dropped=sum(t.meta["events_dropped"] for t in timelines))
    return Timeline(meta=meta, points=first.points, arrays=arrays, events=[list(e) for e in events],
                    scalar_names=first.scalar_names, batchnorms=first.batchnorms)


def timeline_histogram(timeline: Timeline, point: str, step: int) -> StreamingHistogram:
    """The values ``point`` saw at histogram step ``step`` of ``timeline``."""
    return StreamingHistogram.from_arrays(timeline.histogram_arrays(point, step))


def _common(arrays: list[np.ndarray]) -> np.ndarray:
    out = arrays[0]
    for a in arrays[1:]:
        out = np.intersect1d(out, a)
    return out.astype(np.int64)


# -- fake-quant vs converted ---------------------------------------------------------------------
def frozen_qat_copy(qat_model: nn.Module) -> tuple[nn.Module, str]:
    """(a copy of the QAT model with every observer disabled, its flow): converting it uses the
    qparams training ended with, not ones moved by another calibration pass."""
    model = copy.deepcopy(_unwrap(qat_model))
    for m in model.modules():
        if is_fake_quant(m):
            m.observer_enabled.fill_(0)
    return model, "fx" if is_fx_prepared(model) else "eager"


class _NodeOutputs(torch.fx.Interpreter):
    """Runs an FX graph module, keeping the outputs of some call_module nodes (by target): FX may
    share one fake-quant module between nodes, so hooks on the module cannot tell them apart."""

    def __init__(self, module: nn.Module, wanted: dict[str, str]):
        super().__init__(module)
        self.wanted, self.outputs = wanted, {}

    def run_node(self, n):
        result = super().run_node(n)
        if n.op == "call_module" and n.target in self.wanted:  # a copy, as in fake_quant_vs_int8
            self.outputs[self.wanted[n.target]] = result.clone()
        return result


def fake_quant_vs_int8(fq_model: nn.Module, quantized: nn.Module, points, layers, batches) -> dict[str, float]:
    """SQNR (dB) per layer of the converted model's output vs the fake-quantized model's (eval mode,
    fake-quant on: the output of the layer's output fake-quant), both run on the same batches."""
    fq_model = fq_model.eval()
    wanted = {p.name: p.layer for p in points if p.role == "output" and p.layer in layers}
    accs = {n: ErrorAccumulator() for n in wanted.values()}
    fq_out: dict[str, torch.Tensor] = {}
    handles = []

    def keep(store, name):
        def hook(module, args, output):  # a copy: in-place activations downstream overwrite outputs
            store[name] = output.dequantize() if output.is_quantized else output.clone()

        return hook

    int8_out: dict[str, torch.Tensor] = {}
    try:
        for name in accs:
            handles.append(quantized.get_submodule(name).register_forward_hook(keep(int8_out, name)))
        if not is_fx_prepared(fq_model):
            for point, name in wanted.items():
                handles.append(fq_model.get_submodule(point).register_forward_hook(keep(fq_out, name)))
        with torch.no_grad():
            for batch in batches:
                if is_fx_prepared(fq_model):
                    run = _NodeOutputs(fq_model, wanted)
                    run.run(*positional(fq_model, batch))
                    fq_out.update(run.outputs)
                else:
                    call_model(fq_model, batch)
                call_model(quantized, batch)
                for name in fq_out.keys() & int8_out.keys():
                    accs[name].add(fq_out[name], int8_out[name])
                fq_out.clear()
                int8_out.clear()
    finally:
        for h in handles:
            h.remove()
    return {n: a.result()["sqnr"] for n, a in accs.items()}


def timeline_of(recorder) -> Timeline | None:
    """The timeline of a :class:`Recorder` (a collective in a distributed job), a Timeline, or None."""
    if recorder is None or isinstance(recorder, Timeline):
        return recorder
    if isinstance(recorder, Recorder):
        return recorder.timeline()
    raise ConfigError(f"recorder must be what qviz.watch() returned (or its Timeline), not {type(recorder).__name__}")


# -- Lightning ---------------------------------------------------------------------------------
def _lightning_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise QvizError("QvizCallback needs Lightning: pip install lightning") from None
    return Callback


class QvizCallback:
    """A Lightning callback that records with ``recorder`` (from :func:`watch`, not started) from
    the start to the end of ``fit`` and logs the training loss; the recorder stays yours."""

    _classes: dict = {}

    def __new__(cls, *args, **kwargs):
        base = _lightning_base()
        if not issubclass(cls, base):
            if base not in QvizCallback._classes:
                QvizCallback._classes[base] = type("QvizCallback", (cls, base), {})
            cls = QvizCallback._classes[base]
        return object.__new__(cls)

    def __init__(self, recorder: Recorder, log_loss: bool = True):
        if not isinstance(recorder, Recorder):
            raise ConfigError(f"QvizCallback needs what qviz.watch() returned, not {type(recorder).__name__}")
        self.recorder, self.log_loss = recorder, log_loss

    def on_train_start(self, trainer, pl_module) -> None:
        self.recorder.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.log_loss and isinstance(loss, torch.Tensor):
            self.recorder.log(loss=loss.detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self.recorder.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.recorder.stop()

"""What one calibration pass records per activation point, so that any observer's qparams can be
computed later without seeing the data again ("calibrate once, convert many").

Per point, :class:`ActivationStats` keeps the per-call finite min/max (to replay
``MovingAverageMinMaxObserver`` for any ``averaging_constant``) and a
:class:`~qviz.capture.histogram.StreamingHistogram` of the finite values (for
``HistogramObserver`` and percentile clipping). Qparams always come out of a real
``torch.ao.quantization`` observer whose buffers are set from these statistics, so torch's own
formulas (eps, zero-point rounding and clamping, 4-bit ranges, ...) apply unchanged.

NaN/Inf values are counted and left out: the replayed observer is the one that saw only the finite
values of each call (a call with none is skipped, as an observer skips an empty tensor).
"""

from __future__ import annotations

import math
import warnings
from array import array

import numpy as np
import torch
from torch.ao.quantization import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

from qviz.capture.histogram import StreamingHistogram
from qviz.errors import ConfigError
from qviz.options import ACTIVATIONS

# HistogramObserver searches on 2048 equal bins over [min, max]; our dyadic grid spans at least a
# quarter of its bins, so 16384 gives >= 2 of ours per torch bin. Measured against the real
# observer: SQNR mean |difference| ~0.005 dB; fewer bins do worse (2048: ~0.03 dB, some > 1 dB),
# more do no better (the rest is torch's own batch-order sensitivity)
DEFAULT_BINS = 16384
OBSERVERS = ACTIVATIONS  # the observers a plan names (qviz.options)


class ActivationStats:
    """Statistics of every tensor one activation observer sees, in bounded memory.

    Memory (:attr:`nbytes`): the histogram (``8 * bins + 64`` bytes, 128 KiB at the default
    16384 bins) plus 16 bytes per call for the min/max trajectory, which stops growing after
    ``max_calls`` calls (1.6 MB at the default 100 000). Past that, :attr:`truncated` is set and
    only the moving-average replay, which needs every call, refuses to answer.
    """

    def __init__(self, bins: int = DEFAULT_BINS, max_calls: int = 100_000):
        if (
            isinstance(max_calls, bool)
            or not isinstance(max_calls, (int, np.integer))
            or max_calls < 1
        ):
            raise ValueError(f"max_calls must be a positive int, got {max_calls!r}")
        self._hist = StreamingHistogram(bins)
        self.max_calls = int(max_calls)
        self.truncated = False
        self._call_min = array("d")
        self._call_max = array("d")
        self._calls = 0
        self._count = 0
        self._nonfinite = 0

    # -- recording -----------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Record one observer call with exactly the tensor the observer sees."""
        x = x.detach().reshape(-1)
        self._calls += 1
        self._count += x.numel()
        if x.numel() == 0:
            return
        mn, mx = _aminmax(x)  # NaN propagates, so both finite means every value is
        if not (math.isfinite(mn) and math.isfinite(mx)):
            finite = x[torch.isfinite(x)]
            self._nonfinite += x.numel() - finite.numel()
            if finite.numel() == 0:
                return
            x = finite
            mn, mx = _aminmax(x)
        self._hist.update(x, (mn, mx))
        if len(self._call_min) < self.max_calls:
            self._call_min.append(mn)
            self._call_max.append(mx)
        else:
            self.truncated = True

    def merge(self, other: ActivationStats) -> None:
        """Add ``other`` (another rank or pass); the trajectory becomes ours followed by theirs."""
        if not isinstance(other, ActivationStats):
            raise TypeError(f"can only merge ActivationStats, got {type(other).__name__}")
        self._hist.merge(other._hist)
        room = self.max_calls - len(self._call_min)
        self._call_min.extend(other._call_min[:room])
        self._call_max.extend(other._call_max[:room])
        self.truncated = self.truncated or other.truncated or len(other._call_min) > room
        self._calls += other._calls
        self._count += other._count
        self._nonfinite += other._nonfinite

    # -- state ---------------------------------------------------------------------------------
    @property
    def histogram(self) -> StreamingHistogram:
        return self._hist

    @property
    def min(self) -> float:
        """Smallest finite value seen (NaN before any)."""
        return self._hist.min

    @property
    def max(self) -> float:
        """Largest finite value seen (NaN before any)."""
        return self._hist.max

    @property
    def calls(self) -> int:
        """Number of :meth:`update` calls, empty or non-finite ones included."""
        return self._calls

    @property
    def count(self) -> int:
        """Number of values seen, NaN/Inf included."""
        return self._count

    @property
    def nonfinite(self) -> int:
        """Number of NaN/Inf values seen (left out of every statistic)."""
        return self._nonfinite

    @property
    def saw_data(self) -> bool:
        """True once a finite value was recorded."""
        return self._hist.total > 0

    @property
    def call_min(self) -> np.ndarray:
        """Per-call finite minimum (float64), one entry per call that had finite values."""
        return np.array(self._call_min, dtype=np.float64)

    @property
    def call_max(self) -> np.ndarray:
        """Per-call finite maximum (float64), aligned with :attr:`call_min`."""
        return np.array(self._call_max, dtype=np.float64)

    @property
    def nbytes(self) -> int:
        """Memory the state holds: histogram plus 16 bytes per recorded call."""
        return self._hist.nbytes + 8 * (len(self._call_min) + len(self._call_max))

    def __repr__(self) -> str:
        return (
            f"ActivationStats(calls={self._calls}, count={self._count}, min={self.min}, "
            f"max={self.max}, nonfinite={self._nonfinite}, truncated={self.truncated})"
        )

    # -- qparams -------------------------------------------------------------------------------
    def qparams(
        self,
        observer: str,
        *,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        averaging_constant: float = 0.01,
        percentile: float = 99.99,
    ) -> tuple[float, int]:
        """(scale, zero_point) that ``observer`` would have produced after the recorded calls.

        ``"minmax"`` and ``"moving_average"`` are bit-exact (MinMaxObserver and
        MovingAverageMinMaxObserver). ``"histogram"`` runs HistogramObserver's own search on our
        histogram re-binned onto its grid: usually the same qparams; its greedy search can jump,
        so ~1% of cases differ by more than 0.1 dB of SQNR, as torch's own result does when the
        same data arrives in other batches. ``"percentile"`` is MinMaxObserver over the
        ``[100 - p, p]`` percentile range (torch widens it to include 0). With no data: torch's
        defaults for an observer that saw nothing (scale 1.0, zero point 0).
        """
        if observer not in OBSERVERS:
            raise ConfigError(
                f"unknown observer {observer!r}: choose one of {', '.join(OBSERVERS)}"
            )
        if observer == "percentile":
            _check_percentile(percentile)
        kwargs = dict(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
        )
        if observer == "moving_average":
            obs = _observer(
                MovingAverageMinMaxObserver, kwargs, averaging_constant=averaging_constant
            )
        elif observer == "histogram":
            obs = _observer(HistogramObserver, kwargs)
        else:
            obs = _observer(MinMaxObserver, kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "must run observer first" on no data
            if self.saw_data:
                if observer == "moving_average":
                    lo, hi = self._moving_average(averaging_constant)
                elif observer == "percentile":
                    lo, hi = self._hist.quantile(
                        np.array([(100 - percentile) / 100, percentile / 100])
                    )
                else:
                    lo, hi = self.min, self.max
                obs.min_val.fill_(float(lo))
                obs.max_val.fill_(float(hi))
                if observer == "histogram":
                    counts = self._rebin(obs.min_val.item(), obs.max_val.item(), obs.bins)
                    obs.histogram.copy_(torch.from_numpy(counts))
            scale, zero_point = obs.calculate_qparams()
        return float(scale), int(zero_point)

    def _moving_average(self, c: float) -> tuple[float, float]:
        """MovingAverageMinMaxObserver's min/max after the recorded calls, in its float32."""
        if self.truncated:
            raise ConfigError(
                f"calibration was too long to replay a moving average: only the first "
                f"{self.max_calls} calls were kept; calibrate with fewer batches or a larger "
                "max_calls, or choose another observer"
            )
        # torch: first call sets the buffers, later ones do m = m + c * (batch - m) on float32
        # 0-d tensors (the Python float c is rounded to float32); numpy float32 scalars round the
        # same way, one operation at a time
        c32 = np.float32(c)
        mins = np.asarray(self._call_min, dtype=np.float32)
        maxs = np.asarray(self._call_max, dtype=np.float32)
        lo, hi = mins[0], maxs[0]
        for a, b in zip(mins[1:], maxs[1:], strict=True):
            lo = lo + c32 * (a - lo)
            hi = hi + c32 * (b - hi)
        return float(lo), float(hi)

    def _rebin(self, lo: float, hi: float, bins: int) -> np.ndarray:
        """Counts on ``bins`` equal bins over [lo, hi], density uniform inside each of our bins.

        Our edges are clipped to [min, max] first: no value lies outside, so the end bins'
        mass is spread over the part of them that holds data.
        """
        cdf = np.concatenate([[0.0], np.cumsum(self._hist.counts, dtype=np.float64)])
        edges = np.clip(self._hist.edges, self.min, self.max)
        if edges[0] == edges[-1]:  # a constant: torch.histc puts it in the middle bin
            out = np.zeros(bins)
            out[bins // 2] = cdf[-1]
        else:
            out = np.diff(np.interp(np.linspace(lo, hi, bins + 1), edges, cdf))
        return out.astype(np.float32)

    def clip_fraction(self, scale: float, zero_point: int, quant_min: int, quant_max: int) -> float:
        """Share of the recorded finite values outside ``[(qmin - zp) * scale, (qmax - zp) * scale]``."""
        lo, hi = (quant_min - zero_point) * scale, (quant_max - zero_point) * scale
        return self._hist.fraction_outside(lo, hi)

    # -- persistence ---------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no pickle) that :meth:`from_arrays` rebuilds exactly."""
        out = {f"hist.{k}": v for k, v in self._hist.to_arrays().items()}
        out["call_min"] = self.call_min
        out["call_max"] = self.call_max
        scalars = {
            "calls": self._calls,
            "count": self._count,
            "nonfinite": self._nonfinite,
            "max_calls": self.max_calls,
            "truncated": int(self.truncated),
        }
        out.update({k: np.array(v, dtype=np.int64) for k, v in scalars.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays) -> ActivationStats:
        """Rebuild from :meth:`to_arrays`; raises ValueError on arrays that could not come from it."""
        hist = StreamingHistogram.from_arrays(
            {k[len("hist.") :]: v for k, v in arrays.items() if k.startswith("hist.")}
        )
        call_min = np.asarray(arrays["call_min"], dtype=np.float64)
        call_max = np.asarray(arrays["call_max"], dtype=np.float64)
        calls, count, nonfinite, max_calls, truncated = (
            int(np.asarray(arrays[k]).item())
            for k in ("calls", "count", "nonfinite", "max_calls", "truncated")
        )
        stats = cls(hist.bins, max_calls)
        consistent = (
            call_min.ndim == call_max.ndim == 1
            and len(call_min) == len(call_max) <= min(max_calls, calls)
            and np.all(call_min <= call_max)
            and (len(call_min) > 0) == (hist.total > 0)
            and (not truncated or len(call_min) == max_calls)
            and 0 <= nonfinite <= count - hist.total
        )
        if not consistent:
            raise ValueError("activation stats arrays are inconsistent with each other")
        stats._hist = hist
        stats._call_min.extend(call_min.tolist())
        stats._call_max.extend(call_max.tolist())
        stats._calls, stats._count, stats._nonfinite = calls, count, nonfinite
        stats.truncated = bool(truncated)
        return stats


def _aminmax(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor as Python floats, with one device sync."""
    return tuple(torch.stack(torch.aminmax(x)).cpu().double().tolist())


def _check_percentile(p) -> None:
    ok = isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool)
    if not (ok and 50 < p <= 100):
        raise ConfigError(
            f"percentile must be a number in (50, 100] (e.g. 99.9, 99.99 or 100), got {p!r}"
        )


def _observer(cls, kwargs: dict, **extra):
    """A fresh torch observer; torch's refusals of a configuration become a ConfigError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reduce_range's deprecation notice
            return cls(**kwargs, **extra)
    except (AssertionError, NotImplementedError, ValueError, TypeError) as e:
        raise ConfigError(f"torch's {cls.__name__} refuses {kwargs | extra}: {e}") from e

"""A fixed-memory streaming histogram whose range grows without losing or misplacing counts.

Every tensor an observer sees during calibration goes through :meth:`StreamingHistogram.update`,
so qparams for other observer choices (percentile clipping, MSE search, ...) can be computed
later from the histogram alone, without re-running calibration.

The grid is dyadic: the bin width is ``w = 2**e`` and ``lo = n * w`` for an integer ``n``, so
every edge ``(n + k) * w`` is an exact float64 and 0 is an edge whenever it is in range. The
bin of ``x`` is ``floor(x * 2**-e) - n``, where scaling by a power of two is exact (float32
arithmetic when that is enough, else float64): counts agree exactly with ``np.histogram`` over
:attr:`edges` (values on an edge go to the bin above it). The range ``[lo, lo + bins * w)`` is open at the top, so the top edge
never holds a value. Growing the range doubles ``w`` and sums adjacent bin pairs, which is
exact because the new edges are a subset of the old ones. Exact for finite float16/bfloat16/
float32/integer inputs; float64 subnormals may land one bin off.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MAX_BINS = 2**20
CHUNK = 2**22  # values binned at a time: the temporaries stay 32 MiB for a layer of any size


class StreamingHistogram:
    """Counts of finite values on a dyadic grid of ``bins`` bins; about ``8 * bins + 64`` bytes."""

    def __init__(self, bins: int = 2048):
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
            raise ValueError(f"bins must be an int, got {bins!r}")
        if not 2 <= bins <= _MAX_BINS or bins % 2:
            raise ValueError(
                f"bins must be even and in [2, {_MAX_BINS}] (a power of two is best), got {bins}"
            )
        self.bins = int(bins)
        self._counts = np.zeros(self.bins, dtype=np.int64)
        self._n = 0  # lo = n * 2**e; meaningless while empty
        self._e = 0
        self._min = math.nan
        self._max = math.nan

    # -- state ---------------------------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        return self._counts.copy()

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self._e) if self.total else math.nan

    @property
    def edges(self) -> np.ndarray:
        """``bins + 1`` exact float64 edges (all NaN while empty)."""
        k = self._n + np.arange(self.bins + 1, dtype=np.float64)
        return k * self.width

    @property
    def total(self) -> int:
        return int(self._counts.sum())

    @property
    def min(self) -> float:
        return self._min

    @property
    def max(self) -> float:
        return self._max

    @property
    def nbytes(self) -> int:
        """Memory the state holds: the int64 counts plus a few scalars (``8 * bins + 64``)."""
        return self._counts.nbytes + 64

    def __repr__(self) -> str:
        return f"StreamingHistogram(bins={self.bins}, total={self.total}, min={self._min}, max={self._max})"

    # -- building ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, minmax: tuple[float, float] | None = None) -> None:
        """Add the finite values of ``x`` (NaN/inf are skipped; the caller counts them).
        ``minmax``: x's finite (min, max) when the caller has them already (one pass fewer)."""
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        if x.device.type == "mps":  # no float64 there
            x = x.cpu()
        mn, mx = minmax if minmax is not None else torch.stack(torch.aminmax(x)).double().tolist()  # one sync
        if not (math.isfinite(mn) and math.isfinite(mx)):
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return
            mn, mx = torch.stack(torch.aminmax(x)).double().tolist()
        self._cover(mn, mx)
        # bin = floor(x / w) - n, exact: x / w scales by a power of two; float32 is enough (and
        # twice as fast) when 2**-100 <= w <= 1 (no under/overflow) and |n| + bins < 2**24
        small = -100 <= self._e <= 0 and abs(self._n) + self.bins < 2**24
        dtype = torch.float32 if small and x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
        for part in x.split(CHUNK):
            t = part.to(dtype).mul(math.ldexp(1.0, -self._e))
            idx = t.floor_().sub_(self._n).clamp_(0, self.bins - 1).int()
            self._counts += torch.bincount(idx, minlength=self.bins).cpu().numpy()

    def _cover(self, mn: float, mx: float, min_e: int | None = None) -> None:
        """Set up (first data) or grow the grid so that it holds [mn, mx]; track min/max."""
        if math.isnan(self._min):
            self._init_grid(mn, mx)
            self._min, self._max = mn, mx
        self._grow(mn, mx, min_e)
        self._min, self._max = min(self._min, mn), max(self._max, mx)

    def _init_grid(self, mn: float, mx: float) -> None:
        """Smallest dyadic width with bins * w > mx - mn, lo <= mn (a constant gets a tiny one)."""
        m = max(abs(mn), abs(mx))
        span = mx - mn or (m * 2.0**-10 if m else 2.0**-30)  # constant: ~0.1% of |v| around it
        span = max(span, m * self.bins * 2.0**-40)  # keeps |n| below ~2**40: exact in int64/float64
        self._e = max(math.frexp(span / self.bins)[1], -1000)  # 2**e > span / bins
        self._n = math.floor(mn / math.ldexp(1.0, self._e))  # at most one growth will follow

    def _grow(self, mn: float, mx: float, min_e: int | None = None) -> None:
        """Double the width (towards the side that needs it) until [mn, mx] fits and e >= min_e."""
        while True:
            w = math.ldexp(1.0, self._e)
            if mn < self._n * w:  # left: the old range becomes (about) the upper half
                m = -((self.bins - self._n) // 2)  # ceil((n - bins) / 2), new lo in units of 2w
            elif mx >= (self._n + self.bins) * w or (min_e is not None and self._e < min_e):
                m = self._n // 2  # right: lo stays (or moves one old bin left to stay aligned)
            else:
                return
            shift = self._n - 2 * m  # where old bin 0 lands, in old bins from the new lo
            padded = np.zeros(2 * self.bins, dtype=np.int64)
            padded[shift : shift + self.bins] = self._counts
            self._counts = padded.reshape(self.bins, 2).sum(1)
            self._n, self._e = m, self._e + 1

    def merge(self, other: StreamingHistogram) -> None:
        """Add ``other``'s counts (e.g. from another rank), growing this range as needed."""
        if not isinstance(other, StreamingHistogram) or other.bins != self.bins:
            raise ValueError(f"can only merge a StreamingHistogram with bins={self.bins}")
        if other.total == 0:
            return
        counts, n, e, mn, mx = other._counts.copy(), other._n, other._e, other._min, other._max
        if self.total == 0:
            self._counts, self._n, self._e, self._min, self._max = counts, n, e, mn, mx
            return
        self._cover(mn, mx, min_e=e)
        k = np.flatnonzero(counts)  # other's bins nest inside ours: both grids are dyadic
        np.add.at(self._counts, ((n + k) >> (self._e - e)) - self._n, counts[k])

    # -- reading -------------------------------------------------------------------------------
    def quantile(self, q: float | np.ndarray) -> float | np.ndarray:
        """Quantile at rank ``(total - 1) * q`` (numpy's default), interpolated inside a bin.

        Within one bin width of ``np.quantile`` where the data is dense; q=0/1 give min/max.
        """
        qa = np.asarray(q, dtype=np.float64)
        if np.any((qa < 0) | (qa > 1) | np.isnan(qa)):
            raise ValueError(f"quantiles must be in [0, 1], got {q!r}")
        if self.total == 0:
            out = np.full(qa.shape, np.nan)
        else:
            cum = np.cumsum(self._counts)
            r = qa * (self.total - 1) + 0.5  # sample i sits at the middle of its share of the cdf
            idx = np.searchsorted(cum, r, side="left").clip(0, self.bins - 1)
            c = self._counts[idx]
            frac = (r - (cum[idx] - c)) / np.maximum(c, 1)
            out = np.clip((self._n + idx + frac) * self.width, self._min, self._max)
            out = np.where(qa == 0, self._min, np.where(qa == 1, self._max, out))  # exact ends
        return float(out) if out.ndim == 0 else out

    def fraction_outside(self, lo: float, hi: float) -> float:
        """Share of values ``< lo`` or ``> hi``, assuming uniform density inside a bin (0 if empty)."""
        if not lo <= hi:
            raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
        if self.total == 0:
            return 0.0
        cdf = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.float64)
        n = float(self.total)
        below = 0.0 if lo <= self._min else n if lo > self._max else np.interp(lo, self.edges, cdf)
        upto = n if hi >= self._max else 0.0 if hi < self._min else np.interp(hi, self.edges, cdf)
        return float((below + n - upto) / n)

    # -- persistence ---------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild exactly: counts, lo, width, min, max (0-d float64)."""
        scalars = {
            "lo": self._n * self.width,
            "width": self.width,
            "min": self._min,
            "max": self._max,
        }
        out = {k: np.array(v, dtype=np.float64) for k, v in scalars.items()}
        return {"counts": self._counts.copy(), **out}

    @classmethod
    def from_arrays(cls, arrays) -> StreamingHistogram:
        """Rebuild from :meth:`to_arrays`; raises ValueError on arrays that could not come from it."""
        counts = np.asarray(arrays["counts"])
        if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise ValueError("histogram counts must be a 1-d array of non-negative integers")
        h = cls(len(counts))
        if not counts.any():
            return h
        lo, w, mn, mx = (float(np.asarray(arrays[k]).item()) for k in ("lo", "width", "min", "max"))
        frac, e = math.frexp(w)
        if frac != 0.5 or not math.isfinite(lo) or not (lo / w).is_integer() or abs(lo / w) > 2**50:
            raise ValueError(f"histogram width must be a power of two dividing lo, got {w}, {lo}")
        h._counts, h._e, h._n, h._min, h._max = counts.astype(np.int64), e - 1, int(lo / w), mn, mx
        nz = np.flatnonzero(counts)
        first, last = (math.floor(v / w) - h._n if math.isfinite(v) else -1 for v in (mn, mx))
        if not (mn <= mx and first == nz[0] and last == nz[-1]):
            raise ValueError("histogram min/max do not match its non-empty bins")
        return h

"""Error metrics between a float tensor ``x`` and its quantized counterpart ``y``.

Sums are accumulated in float64 over batches so a layer's figures cover all evaluation data.
SQNR is ``20*log10(||x|| / ||x - y||)`` dB, the formula of ``torch.ao.ns.fx.utils.compute_sqnr``
(on a single batch the two agree exactly).
"""

from __future__ import annotations

import math

import torch


class ErrorAccumulator:
    """Running sums for SQNR, MSE, cosine similarity and max absolute error."""

    def __init__(self):
        self.signal = 0.0  # sum x^2
        self.noise = 0.0  # sum (x - y)^2
        self.cross = 0.0  # sum x * y
        self.other = 0.0  # sum y^2
        self.count = 0
        self.max_abs = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach(), y.detach()
        if x.numel() != y.numel():
            raise ValueError(f"cannot compare tensors of {x.numel()} and {y.numel()} values")
        x, y = x.reshape(y.shape).float(), y.float()
        d = x - y
        # float32 norms (blocked reductions, accurate to ~1e-7 relative; a float64 norm is 20x
        # slower on CPU), squared and summed across batches in Python floats
        sx, sy, sd = (float(torch.linalg.vector_norm(t)) for t in (x, y, d))
        self.signal += sx * sx
        self.noise += sd * sd
        self.other += sy * sy
        self.cross += (sx * sx + sy * sy - sd * sd) / 2  # x.y from the polarization identity
        self.count += x.numel()
        if x.numel():
            low, high = torch.aminmax(d)  # one pass, no |d| temporary
            self.max_abs = max(self.max_abs, float(high), -float(low))

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {"sqnr": math.nan, "mse": math.nan, "cosine": math.nan, "max_abs_err": math.nan}
        return {
            "sqnr": sqnr_from_energies(self.signal, self.noise),
            "mse": self.noise / self.count,
            "cosine": self.cross / math.sqrt(self.signal * self.other) if self.signal * self.other else math.nan,
            "max_abs_err": self.max_abs,
        }


def sqnr_from_energies(signal: float, noise: float) -> float:
    """10*log10(signal / noise) with the edge cases spelled out (exact copy -> inf dB)."""
    if noise == 0:
        return math.inf if signal > 0 else math.nan
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """SQNR of ``y`` against ``x`` in dB."""
    acc = ErrorAccumulator()
    acc.add(x, y)
    return acc.result()["sqnr"]

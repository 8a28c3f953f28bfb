"""Activation outliers: which input channels of each linear layer carry the outliers.

LLM activations concentrate their largest values in a few channels (the "emergent features"
of LLM.int8(), the channels SmoothQuant migrates into the weights): a per-tensor int8 scale set
by them leaves every other channel a handful of levels. For each linear layer's input, over
the features (last) dimension, :class:`ChannelStats` keeps in one streaming pass:

- ``absmax`` per channel, and ``ratio_to_median``: that over the median channel's abs-max;
- ``persistence`` per channel: the share of tokens (rows) in which the channel exceeds 6x the
  token's median magnitude over channels (about 4 sigma for Gaussian values). A *systematic* outlier channel is large in most tokens (high
  persistence); a *spike* is one huge value (high abs-max, persistence near 0). Clipping or
  per-token scales help against spikes; SmoothQuant / per-channel scales against systematic ones;
- ``kurtosis`` of the layer's input values (excess, pooled over channels): 0 for a Gaussian,
  large when a few values dominate (the per-layer heaviness figure).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

SPIKE_FACTOR = 6.0  # a value counts towards persistence above this many times its token's median |x|
COLUMNS = ["layer", "channel", "absmax", "ratio_to_median", "persistence", "kurtosis", "kind"]


class ChannelStats:
    """Streaming per-channel statistics of one layer's input (features on the last dim)."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None
        self.exceed: torch.Tensor | None = None  # tokens in which each channel exceeded
        self.tokens = 0
        self.moments = torch.zeros(5, dtype=torch.float64)  # count, sum x, x^2, x^3, x^4

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            return
        x = x.detach().reshape(-1, x.shape[-1]).double()
        absx = x.abs()
        typical = absx.median(1, keepdim=True).values
        exceed = (absx > SPIKE_FACTOR * typical).sum(0)
        amax = absx.amax(0)
        if self.absmax is None:
            self.absmax, self.exceed = amax, exceed
        elif self.absmax.shape != amax.shape:
            return  # a layer fed inputs of another width (never for nn.Linear)
        else:
            self.absmax, self.exceed = torch.maximum(self.absmax, amax), self.exceed + exceed
        self.tokens += x.shape[0]
        self.moments += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64),
                                     x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The running state as plain arrays (a session file keeps them; :meth:`from_arrays`
        gives the same statistics back, so every frame of them is the same)."""
        if not self.saw_data:
            raise ValueError("no statistics to store: the layer saw no data")
        return {"absmax": self.absmax.numpy(), "exceed": self.exceed.numpy(), "moments": self.moments.numpy(),
                "tokens": np.array(self.tokens, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ChannelStats:
        """The statistics :meth:`to_arrays` stored; ValueError when the arrays cannot be them."""
        absmax, exceed, moments, tokens = (np.asarray(arrays[k]) for k in ("absmax", "exceed", "moments", "tokens"))
        if (absmax.ndim != 1 or absmax.size == 0 or exceed.shape != absmax.shape or moments.shape != (5,)
                or tokens.shape != () or absmax.dtype.kind != "f" or exceed.dtype.kind not in "iu"
                or moments.dtype.kind != "f" or tokens.dtype.kind not in "iu" or int(tokens) < 1):
            raise ValueError("channel statistics need 1-d absmax and exceed of one width, 5 moments and "
                             "a token count >= 1")
        stats = cls()
        stats.absmax = torch.from_numpy(absmax.astype(np.float64))
        stats.exceed = torch.from_numpy(exceed.astype(np.int64))
        stats.moments = torch.from_numpy(moments.astype(np.float64))
        stats.tokens = int(tokens)
        return stats

    @property
    def saw_data(self) -> bool:
        return self.absmax is not None and self.tokens > 0

    def kurtosis(self) -> float:
        """Excess kurtosis of all values seen (0 for a Gaussian)."""
        n, s1, s2, s3, s4 = (float(v) for v in self.moments)
        if n < 2:
            return math.nan
        mean = s1 / n
        var = s2 / n - mean**2
        if var <= 0:
            return math.nan
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
        return m4 / var**2 - 3.0

    def frame(self, layer: str) -> pd.DataFrame:
        """One row per channel of this layer (all channels), see :data:`COLUMNS`."""
        if not self.saw_data:
            return pd.DataFrame(columns=COLUMNS)
        absmax = self.absmax.numpy()
        median = float(np.median(absmax))
        ratio = absmax / median if median > 0 else np.full_like(absmax, np.inf)
        persistence = self.exceed.double().numpy() / self.tokens
        frame = pd.DataFrame({"layer": layer, "channel": np.arange(absmax.size), "absmax": absmax,
                              "ratio_to_median": ratio, "persistence": persistence,
                              "kurtosis": self.kurtosis()})
        frame["kind"] = np.where(ratio < SPIKE_FACTOR, "", np.where(persistence >= 0.5, "systematic", "spike"))
        frame.loc[(ratio >= SPIKE_FACTOR) & (persistence > 0.05) & (persistence < 0.5), "kind"] = "frequent"
        return frame


def outlier_frame(stats: dict[str, ChannelStats], top: int) -> pd.DataFrame:
    """Each layer's ``top`` channels by abs-max, most extreme (ratio to median) first."""
    parts = [s.frame(layer).nlargest(top, "absmax") for layer, s in stats.items() if s.saw_data]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["ratio_to_median", "absmax"], ascending=False, kind="stable").reset_index(drop=True)


def channel_heatmap(stats: dict[str, ChannelStats]) -> tuple[list[str], np.ndarray]:
    """(layers, matrix) of ratio_to_median, one row per layer, padded with NaN to the widest."""
    layers = [n for n, s in stats.items() if s.saw_data]
    width = max((stats[n].absmax.numel() for n in layers), default=0)
    matrix = np.full((len(layers), width), np.nan)
    for i, n in enumerate(layers):
        ratio = stats[n].frame(n)["ratio_to_median"].to_numpy(dtype=float)
        matrix[i, : ratio.size] = ratio
    return layers, matrix


def channel_matrix(frame: pd.DataFrame, value: str = "ratio_to_median", order=()) -> pd.DataFrame:
    """The rows of :func:`outlier_frame` (every channel: ``top`` wider than any layer) as a
    layer x channel matrix of ``value``: one row per layer, the layers of ``order`` first in that
    order and the others after, one column per channel index, NaN past a layer's width."""
    if value not in ("absmax", "ratio_to_median"):
        raise ValueError(f"value must be 'absmax' or 'ratio_to_median', not {value!r}")
    matrix = frame.set_index(["layer", "channel"])[value].unstack("channel")
    first = [n for n in order if n in matrix.index]
    matrix = matrix.reindex(first + [n for n in matrix.index if n not in first])
    matrix.columns = matrix.columns.astype(int)
    return matrix.astype(float)


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose input's last dim is their features: nn.Linear and Hugging
    Face's Conv1D (GPT-2's linears, weight stored transposed)."""
    return [n for n, m in model.named_modules()
            if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode for the block; every module's own flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


@torch.no_grad()
def collect(model: nn.Module, batches, run, layers: list[str] | None = None, make=ChannelStats) -> dict:
    """Statistics of each layer's input over ``batches`` (``run(model, batch)`` runs one), one
    ``make()`` per layer fed each input by its ``update(x)`` (:class:`ChannelStats` by default),
    with hooks that are always removed and the model in eval mode meanwhile (dropout off)."""
    layers = linear_layers(model) if layers is None else layers
    stats = {n: make() for n in layers}

    def hook(name):
        return lambda module, args: stats[name].update(args[0]) if args else None

    handles = []
    try:
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
        with evaluating(model):
            for batch in batches:
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats

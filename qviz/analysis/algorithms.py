"""Quantization algorithms as per-layer what-ifs: each one's error on a layer against RTN's.

For each chosen linear layer, one streaming pass over the calibration batches keeps
:class:`InputStats` of its input (abs-max and mean |x| per channel, ``H = X^T X`` and the sum of
``x``); from them each algorithm makes the layer's quantized weight and its *exact* output error
over all calibration tokens, ``||X dW^T||^2 = tr(dW H dW^T)``: no input is kept.

Implementations (torchao 0.18 on CPU; checked in the tests against independent computations):

- ``rtn``: round-to-nearest with torchao's affine primitives (``choose_qparams_affine``,
  ``quantize_affine``, ``dequantize_affine``): int8 symmetric per output channel, int4 asymmetric
  per group of ``group_size`` inputs, as the torchao flow's weight configs.
- ``smoothquant``: qviz's. ``s_j = max|X_j|^a / max|W_j|^(1-a)`` (the formula and epsilon of
  torchao's ``SmoothQuantObserver``, which keeps every input and needs a weight tensor with an
  activation pre-scale), applied as the equivalent transform ``X/s``, ``W*s`` on a copy.
- ``awq``: qviz's. AWQ's search over ``s = mean|X|^r`` (r on a grid from 0, scales normalised
  by sqrt(max*min), as torchao's ``AWQObserver``), keeping the ``s`` with the least output error,
  computed from ``H`` instead of torchao's concatenated inputs. r = 0 is RTN: no gain, no change.
- ``gptq``: qviz's (torchao's ``gptq_quantize`` asserts CUDA). GPTQ's Algorithm 1 without lazy
  batching: columns quantized one by one, each one's error spread over the later columns with
  the upper Cholesky factor of the damped inverse Hessian; group qparams taken when a group
  starts. A diagonal ``H`` (uncorrelated inputs) spreads nothing: GPTQ is then RTN, exactly.
- ``hqq``: torchao's ``_choose_qparams_and_quantize_affine_hqq`` (float32 on CPU): HQQ's
  half-quadratic solver of the zero points for an lp-norm (p = 0.7) weight error; asymmetric,
  for int8 too (one group per output channel).

An algorithm whose weight equals RTN's (or nearly) and whose error is RTN's within
``tolerance_db`` *did nothing*: ``did_nothing`` says so, and the note says why it may have.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from qviz.analysis.metrics import ErrorAccumulator, sqnr_from_energies
from qviz.analysis.outliers import collect, evaluating, linear_layers
from qviz.errors import ConfigError

METHODS = ("rtn", "smoothquant", "awq", "gptq", "hqq")
COLUMNS = ["layer", "algorithm", "sqnr", "gain_vs_rtn_db", "model_sqnr", "did_nothing", "note"]
TOLERANCE_DB = 0.05  # |gain| below this is no gain
SAME_WEIGHT = 1e-4  # ||W - W_rtn|| / ||W_rtn|| below this is RTN's weight
HESSIAN_BYTES = 256 * 2**20  # the H matrices of one calibration pass, at most (more layers: more passes)
EPS = torch.finfo(torch.float32).eps


class InputStats:
    """Streaming sums of one linear layer's input over the calibration tokens (features last)."""

    def __init__(self):
        self.hessian: torch.Tensor | None = None  # sum x x^T (float64)
        self.absmax = self.abssum = self.total = None
        self.tokens = 0

    def update(self, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            return
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.hessian is None:
            k = x.shape[1]
            self.hessian = torch.zeros(k, k, dtype=torch.float64)
            self.absmax, self.abssum, self.total = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
        self.hessian.addmm_(x.T, x)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abssum += x.abs().sum(0)
        self.total += x.sum(0)
        self.tokens += x.shape[0]

    @property
    def saw_data(self) -> bool:
        return self.tokens > 0

    def energy(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """``||X W^T + b||^2`` summed over the tokens seen (weight (out, in))."""
        w = weight.double()
        value = float(((w @ self.hessian) * w).sum())
        if bias is not None:
            b = bias.detach().double()
            value += 2 * float(b @ (w @ self.total)) + self.tokens * float(b @ b)
        return value


@dataclass(frozen=True)
class WeightFormat:
    """int8 symmetric per output channel, or int4 asymmetric per group of ``group_size`` inputs
    (None: one group per output channel)."""

    dtype: str = "int4"
    group_size: int | None = 32

    def __post_init__(self):
        if self.dtype not in ("int8", "int4"):
            raise ConfigError(f"dtype must be 'int8' or 'int4', not {self.dtype!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive int (32, 64, 128) or None, not {self.group_size!r}")

    def columns(self, in_features: int) -> int:
        return self.group_size if self.dtype == "int4" and self.group_size else in_features

    @property
    def _affine(self):
        from torchao.quantization.quant_primitives import MappingType

        if self.dtype == "int8":
            return MappingType.SYMMETRIC, torch.int8, -128, 127
        return MappingType.ASYMMETRIC, torch.uint8, 0, 15

    def qparams(self, w: torch.Tensor):
        """Scale and zero point of each row of ``w`` (one group)."""
        from torchao.quantization.quant_primitives import choose_qparams_affine

        mapping, target, lo, hi = self._affine
        return choose_qparams_affine(w.float(), mapping, (1, w.shape[1]), target, lo, hi)

    def fake(self, w: torch.Tensor, scale, zero) -> torch.Tensor:
        """``w`` (one group's columns, or some of them) quantized and dequantized with the given qparams."""
        from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

        _, target, lo, hi = self._affine
        block = (1, w.shape[1])
        return dequantize_affine(quantize_affine(w.float(), block, scale, zero, target, lo, hi),
                                 block, scale, zero, target, lo, hi)

    def rtn(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of the whole weight (out, in), group by group."""
        g = self.columns(weight.shape[1])
        return torch.cat([self.fake(w, *self.qparams(w)) for w in weight.float().split(g, dim=1)], dim=1)


@dataclass
class Quantized:
    """One algorithm's result on a layer: ``weight`` acts on the layer's own input (``X W^T``);
    with ``prescale`` it is ``stored / prescale``, run as the equivalent ``(X / s) stored^T``."""

    weight: torch.Tensor
    prescale: torch.Tensor | None = None
    stored: torch.Tensor | None = None


def _scaled(weight: torch.Tensor, s: torch.Tensor, fmt: WeightFormat) -> Quantized:
    s = s.float()
    stored = fmt.rtn(weight * s)
    return Quantized(stored / s, s, stored)


def smoothquant_scales(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``."""
    w_absmax = weight.abs().amax(0).double()
    return (absmax.double() + EPS).pow(alpha) / (w_absmax + EPS).pow(1 - alpha)


def rtn(weight, stats, fmt, **_) -> Quantized:
    return Quantized(fmt.rtn(weight))


def smoothquant(weight, stats, fmt, alpha=0.5, **_) -> Quantized:
    return _scaled(weight, smoothquant_scales(stats.absmax, weight, alpha), fmt)


def awq(weight, stats, fmt, grid=20, **_) -> Quantized:
    """AWQ's activation-aware scale search; the least error found (ties keep the smaller r)."""
    mean = (stats.abssum / stats.tokens).float()
    best, best_error = None, math.inf
    for i in range(grid):
        s = mean.pow(i / grid).clamp(min=1e-4)
        found = _scaled(weight, s / (s.max() * s.min()).sqrt(), fmt)
        error = stats.energy(weight.double() - found.weight.double())
        if error < best_error:
            best, best_error = found, error
    return best


def gptq(weight, stats, fmt, damp=0.01, block=128, **_) -> Quantized:
    """GPTQ: each column quantized in turn, its error spread over the later columns (within a
    block of columns at once, past it by one product per block: the paper's lazy batches)."""
    k = weight.shape[1]
    wt = weight.float().T.clone()  # (in, out): input column i is row i, contiguous
    h = stats.hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    g = fmt.columns(k)
    block = k if g == k else g * max(1, block // g)  # a group never straddles two blocks
    out = torch.empty_like(wt)
    scale = zero = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        part, errors = wt[b0:b1], torch.empty(b1 - b0, wt.shape[1])
        for j in range(b1 - b0):
            i = b0 + j
            if i % g == 0:  # the group's qparams from its columns as updated so far
                scale, zero = fmt.qparams(part[j:j + g].T)
            q = fmt.fake(part[j][:, None], scale, zero)[:, 0]
            out[i] = q
            errors[j] = (part[j] - q) / u[i, i]
            part[j + 1:] -= u[i, i + 1:b1][:, None] * errors[j][None, :]
        wt[b1:] -= u[b0:b1, b1:].T @ errors
    return Quantized(out.T.contiguous())


def hqq(weight, stats, fmt, **_) -> Quantized:
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    g = fmt.columns(weight.shape[1])
    q, scale, zero, shape = _choose_qparams_and_quantize_affine_hqq(
        weight.float(), nbits=4 if fmt.dtype == "int4" else 8, group_size=g, axis=1,
        compute_dtype=torch.float32, device="cpu", raw_output=True)
    groups = q.float().reshape(-1, g)
    return Quantized(((groups - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(shape))


ALGORITHMS: dict[str, Callable[..., Quantized]] = {
    "rtn": rtn, "smoothquant": smoothquant, "awq": awq, "gptq": gptq, "hqq": hqq}


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): Hugging Face's Conv1D (GPT-2) stores it transposed."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    w = weight.T if type(module).__name__ == "Conv1D" else weight
    module.weight.data = w.to(module.weight.dtype).contiguous()


class Prescaled(nn.Module):
    """``module(x / s)``: the input half of an equivalent transform (the weight holds ``W*s``)."""

    def __init__(self, module: nn.Module, s: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("inv_s", 1.0 / s)

    def forward(self, x, *args, **kwargs):
        return self.module(x * self.inv_s.to(x.dtype), *args, **kwargs)


def transformed(module: nn.Module, result: Quantized) -> nn.Module:
    """A copy of the layer ``module`` running ``result``: its weight, or ``X/s`` into ``W*s``."""
    changed = copy.deepcopy(module)
    if result.prescale is None:
        _set_weight(changed, result.weight)
        return changed
    _set_weight(changed, result.stored)
    return Prescaled(changed, result.prescale)


@contextlib.contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module):
    """``model`` with ``module`` at ``name`` for the block, the original put back after."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    original = getattr(owner, attr)
    setattr(owner, attr, module)
    try:
        yield model
    finally:
        setattr(owner, attr, original)


def _check(model: nn.Module, layers, methods, fmt: WeightFormat) -> list[str]:
    known = linear_layers(model)
    layers = known if layers is None else [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise ConfigError(f"{unknown} are not linear layers of the model; choose among {known[:8]}"
                          f"{' ...' if len(known) > 8 else ''}")
    bad = [m for m in methods if m not in ALGORITHMS]
    if bad or "rtn" not in methods:
        raise ConfigError(f"methods must include 'rtn' (the baseline) and come from {METHODS}, got {tuple(methods)}")
    for n in layers:
        k = layer_weight(model.get_submodule(n)).shape[1]
        if k % fmt.columns(k):
            raise ConfigError(f"group_size {fmt.group_size} does not divide {n!r}'s {k} input features: "
                              "choose a group_size that divides it (or None for one group per channel)")
    return layers


def _passes(model: nn.Module, layers: list[str]) -> list[list[str]]:
    """Layers split so that each calibration pass keeps at most HESSIAN_BYTES of H."""
    passes, size = [[]], 0
    for n in layers:
        k = layer_weight(model.get_submodule(n)).shape[1]
        if passes[-1] and size + 8 * k * k > HESSIAN_BYTES:
            passes.append([])
            size = 0
        passes[-1].append(n)
        size += 8 * k * k
    return passes


def _note(method, gain, same, did_nothing) -> str:
    if method == "rtn":
        return "baseline"
    if did_nothing:
        why = {"smoothquant": "its scales are uniform (alpha, or input and weight ranges alike)",
               "awq": "no activation-aware scale beat RTN (r = 0 won)",
               "gptq": "the inputs look uncorrelated (H diagonal): no error to spread",
               "hqq": "the solver kept RTN's zero points"}
        return f"DID NOTHING: same weight and error as RTN ({why.get(method, '')})"
    if same:
        return "same error as RTN with other weights"
    return f"{'better' if gain > 0 else 'worse'} than RTN by {abs(gain):.2f} dB"


def compare_algorithms(model: nn.Module, calib, run, *, layers=None, methods=METHODS, dtype="int4",
                       group_size: int | None = 32, alpha: float = 0.5, eval_batches=None,
                       output: Callable | None = None, tolerance_db: float = TOLERANCE_DB) -> pd.DataFrame:
    """One row per (layer, algorithm), see :data:`COLUMNS`; ``model`` is never modified.

    ``run(model, batch)`` runs one batch; ``sqnr`` is the layer's output (float input, quantized
    weight) vs its float output over ``calib``. With ``eval_batches`` and ``output(model, batch)``
    (the model's compared output tensor), ``model_sqnr`` is the model output's SQNR with only that
    layer changed (NaN otherwise)."""
    fmt = WeightFormat(dtype, group_size)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ConfigError(f"alpha (SmoothQuant's migration strength) must lie in [0, 1], not {alpha!r}")
    methods = tuple(methods)
    layers = _check(model, layers, methods, fmt)
    measure = None
    if eval_batches is not None and output is not None:
        with torch.no_grad(), evaluating(model):
            references = [output(model, b) for b in eval_batches]
        copied = copy.deepcopy(model).eval()  # one copy; each layer is swapped in and back out
        measure = lambda name, module: _model_sqnr(copied, name, module, eval_batches, output, references)  # noqa: E731
    rows = []
    for chunk in _passes(model, layers):
        stats = collect(model, calib, run, chunk, make=InputStats)
        for name in chunk:
            rows += _layer_rows(model, name, stats.pop(name), methods, fmt, alpha, tolerance_db, measure)
    return pd.DataFrame(rows, columns=COLUMNS)


def _layer_rows(model, name, stats, methods, fmt, alpha, tolerance_db, measure):
    module = model.get_submodule(name)
    if not stats.saw_data:
        return [dict(layer=name, algorithm=m, sqnr=math.nan, gain_vs_rtn_db=math.nan, model_sqnr=math.nan,
                     did_nothing=False, note="the layer saw no floating input in calib_data") for m in methods]
    weight = layer_weight(module).float()
    signal = stats.energy(weight, getattr(module, "bias", None))
    results = {m: ALGORITHMS[m](weight, stats, fmt, alpha=alpha) for m in methods}
    base = results["rtn"].weight
    sqnrs = {m: sqnr_from_energies(signal, stats.energy(weight.double() - r.weight.double()))
             for m, r in results.items()}
    rows = []
    for m in methods:
        gain = sqnrs[m] - sqnrs["rtn"]
        same = abs(gain) < tolerance_db or (math.isinf(sqnrs[m]) and sqnrs[m] == sqnrs["rtn"])
        close = float((results[m].weight - base).norm()) <= SAME_WEIGHT * float(base.norm())
        did_nothing = m != "rtn" and same and close
        model_sqnr = math.nan if measure is None else measure(name, transformed(module, results[m]))
        rows.append(dict(layer=name, algorithm=m, sqnr=sqnrs[m], gain_vs_rtn_db=0.0 if m == "rtn" else gain,
                         model_sqnr=model_sqnr, did_nothing=did_nothing,
                         note=_note(m, gain, same, did_nothing)))
    return rows


@torch.no_grad()
def _model_sqnr(copied: nn.Module, name: str, module: nn.Module, batches, output, references) -> float:
    """The model output's SQNR with only ``name`` replaced by ``module``."""
    acc = ErrorAccumulator()
    with swapped(copied, name, module):
        for batch, ref in zip(batches, references, strict=True):
            acc.add(ref, output(copied, batch))
    return acc.result()["sqnr"]

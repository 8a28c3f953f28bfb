"""Per-group int4 weights of a Linear layer: each (output channel, group)'s scale and error.

Group-wise int4 (torchao's ``IntxWeightOnlyConfig`` / ``Int8DynamicActivationIntxWeightConfig``
with ``PerGroup(g)``) gives every run of ``g`` input columns of every output row its own scale
(and zero point when asymmetric); one large weight in a group coarsens the other ``g - 1``.
Where torchao converted the layer, the figures are read from its weight tensor itself
(``IntxUnpackedToInt8Tensor``: ``scale``, ``zero_point``, ``block_size``, ``dequantize()``), so
they are torchao's; elsewhere (another flow, another group size: the what-if) they are computed
from the float weight with torchao's formulas (``choose_qparams_affine`` / ``quantize_affine``
for int4, re-stated in plain torch, so no torchao is needed), which the tests check against
torchao's own tensors. The error is the group's SQNR (dB) and relative error energy.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import torch
from torch import nn

from qviz.errors import ConfigError

#: The group size of the what-if when neither the caller nor the layer's plan names one
#: (the torchao flow's default, ``Session(flow="torchao", group_size=32)``).
DEFAULT_GROUP_SIZE = 32
INT4_MIN, INT4_MAX = -8, 7
COLUMNS = ("output_channel", "group", "first_input", "scale", "zero_point", "absmax", "sqnr", "rel_error")


def group_size_fits(group_size, in_features: int) -> bool:
    """True when ``group_size`` is a positive int dividing ``in_features``."""
    return (isinstance(group_size, numbers.Integral) and not isinstance(group_size, bool)
            and 0 < group_size <= in_features and in_features % group_size == 0)


def dividing_sizes(in_features: int) -> list[int]:
    """The usual group sizes (powers of two, 256 down to 8) that divide ``in_features``."""
    return [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]


def fitting_size(group_size: int, in_features: int) -> int:
    """``group_size`` if it divides ``in_features``, else the largest usual size below it that does,
    else ``in_features`` (one group per output channel)."""
    if group_size_fits(group_size, in_features):
        return group_size
    return next((g for g in dividing_sizes(in_features) if g < group_size), in_features)


def check_group_size(group_size, in_features: int, layer: str) -> int:
    """``group_size`` if it is a positive int dividing ``in_features``, else a ConfigError naming
    ``layer`` and the sizes that fit."""
    if not group_size_fits(group_size, in_features):
        fits = dividing_sizes(in_features)
        raise ConfigError(
            f"group_size {group_size!r} does not fit layer {layer!r}: it must be a positive int dividing its "
            f"in_features ({in_features}); try {', '.join(map(str, fits)) or in_features} "
            f"({in_features} is one group per output channel)")
    return int(group_size)


def is_grouped_int4(weight) -> bool:
    """True for torchao's int4 weight subclass with groups along the input dimension
    (``IntxUnpackedToInt8Tensor``, duck-typed on what this module reads)."""
    return (all(hasattr(weight, a) for a in ("qdata", "scale", "zero_point", "block_size", "dequantize"))
            and str(getattr(weight, "target_dtype", "")) == "torch.int4" and len(weight.block_size) == 2
            and weight.block_size[0] == 1)


def whatif_int4(weight: torch.Tensor, group_size: int, symmetric: bool = True):
    """(scale, zero_point, dequantized weight) of torchao's int4 grouped scheme on ``weight``
    (out x in), scale and zero point of shape (out, in / group_size): torchao 0.18's
    ``choose_qparams_affine`` (range widened to include 0; symmetric: max |w| / 7.5, zero point 0;
    asymmetric: (max - min) / 15 and zero point -8 - round(min / scale)) then ``quantize_affine``."""
    w = weight.detach().float()
    groups = w.reshape(w.shape[0], -1, group_size)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    eps = torch.finfo(w.dtype).smallest_normal
    if symmetric:
        scale = (torch.maximum(-low, high) / ((INT4_MAX - INT4_MIN) / 2)).clamp(min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((high - low) / (INT4_MAX - INT4_MIN)).clamp(min=eps)
        zero_point = (INT4_MIN - torch.round(low / scale)).clamp(INT4_MIN, INT4_MAX)
    q = (torch.round(groups * (1.0 / scale[..., None])) + zero_point[..., None]).clamp(INT4_MIN, INT4_MAX)
    dequantized = ((q - zero_point[..., None]) * scale[..., None]).reshape(w.shape)
    return scale, zero_point, dequantized


def torchao_int4(weight):
    """(scale, zero_point, dequantized weight, group size) read from torchao's own int4 tensor."""
    scale = weight.scale.detach().float().reshape(weight.shape[0], -1)
    zero_point = weight.zero_point.detach().float().reshape(scale.shape)
    return scale, zero_point, weight.dequantize().detach().float(), int(weight.block_size[1])


def group_frame(layer: str, float_weight: torch.Tensor, scale, zero_point, dequantized, group_size: int,
                source: str, symmetric: bool) -> pd.DataFrame:
    """One row per (output channel, group), output channel major: the group's scale, zero point,
    abs-max, SQNR in dB (inf where the group is exact) and relative error energy
    (||w - q||^2 / ||w||^2). ``attrs``: layer, group_size, source ("torchao": read from the
    converted layer; "what-if": computed from the float weight), symmetric."""
    w = float_weight.detach().float().reshape(float_weight.shape[0], -1, group_size)
    err = (w - dequantized.reshape(w.shape)).double()
    signal, noise = w.double().square().sum(-1), err.square().sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (noise / signal).numpy()
        sqnr = np.where(noise.numpy() == 0, np.where(signal.numpy() > 0, np.inf, np.nan), -10 * np.log10(rel))
    out, groups = scale.shape
    frame = pd.DataFrame({
        "output_channel": np.repeat(np.arange(out), groups), "group": np.tile(np.arange(groups), out),
        "first_input": np.tile(np.arange(groups) * group_size, out),
        "scale": scale.numpy().ravel(), "zero_point": zero_point.numpy().ravel().astype(int),
        "absmax": w.abs().amax(-1).numpy().ravel(), "sqnr": sqnr.ravel(), "rel_error": rel.ravel()})
    frame.attrs.update(layer=layer, group_size=group_size, source=source, symmetric=symmetric)
    return frame


def layer_groups(layer: str, float_layer: nn.Module, quantized_layer: nn.Module | None = None,
                 group_size: int | None = None, default_group_size: int = DEFAULT_GROUP_SIZE,
                 symmetric: bool = True) -> pd.DataFrame:
    """:func:`group_frame` of Linear ``layer``: torchao's own figures when ``quantized_layer``
    holds torchao's int4 weight at ``group_size`` (None: whatever it has), else the what-if
    from the float weight at ``group_size`` (None: ``default_group_size``, or the largest usual
    size below it that divides the layer's in_features)."""
    if not isinstance(float_layer, nn.Linear):
        raise ConfigError(f"{layer!r} is {type(float_layer).__name__}: weight groups are for Linear layers "
                          "(group-wise int4 groups a Linear weight's input columns); pick a Linear layer")
    in_features = float_layer.in_features
    if group_size is not None:
        check_group_size(group_size, in_features, layer)
    weight = getattr(quantized_layer, "weight", None)
    if is_grouped_int4(weight) and group_size in (None, weight.block_size[1]):
        scale, zero_point, dequantized, size = torchao_int4(weight)
        return group_frame(layer, float_layer.weight, scale, zero_point, dequantized, size, "torchao", symmetric)
    size = group_size if group_size is not None else fitting_size(default_group_size, in_features)
    scale, zero_point, dequantized = whatif_int4(float_layer.weight, size, symmetric)
    return group_frame(layer, float_layer.weight, scale, zero_point, dequantized, size, "what-if", symmetric)


def linear_rows(table: pd.DataFrame) -> list[str]:
    """The rows of a session's table (``to_dataframe()``) that are Linear layers, in its order:
    those whose weight groups there are to show."""
    types = table["type"] if "type" in table else pd.Series("", index=table.index)
    return [str(n) for n, t in types.items() if "Linear" in str(t)]


def group_matrix(frame: pd.DataFrame, value: str) -> np.ndarray:
    """``value`` of :func:`group_frame`'s rows as a (group, output channel) array."""
    return frame[value].to_numpy().reshape(-1, int(frame["group"].max()) + 1).T


def worst_groups(frame: pd.DataFrame) -> dict:
    """A layer's summary: its output channels, groups per channel, the groups' median and worst
    SQNR (dB) and where the worst one lies."""
    worst = frame.loc[frame["sqnr"].idxmin()] if frame["sqnr"].notna().any() else None
    return {"layer": frame.attrs["layer"], "group_size": frame.attrs["group_size"], "source": frame.attrs["source"],
            "output_channels": int(frame["output_channel"].max()) + 1, "groups": int(frame["group"].max()) + 1,
            "median_sqnr": float(frame["sqnr"].median()),
            "worst_sqnr": np.nan if worst is None else float(worst["sqnr"]),
            "worst_channel": -1 if worst is None else int(worst["output_channel"]),
            "worst_group": -1 if worst is None else int(worst["group"])}

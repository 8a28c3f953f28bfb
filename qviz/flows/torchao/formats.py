"""Number formats of the torchao flow: float8 (e4m3fn, e5m2), MX (mxfp8, mxfp4) and NVFP4, per layer.

Each format names torchao 0.18's own config (what the user runs, and what ``Plan.to_code``
prints). Where ``quantize_`` with that config cannot run on this machine's CPU, qviz stands
:class:`SimulatedLinear` in for the Linear: the weight is quantized by torchao's own constructor
(``Float8Tensor.from_hp``, ``MXTensor.to_mx``, ``NVFP4Tensor.to_nvfp4``, as the config's handler
calls it) and each input batch by the same function torchao's linear applies to activations; both
are dequantized and multiplied in the model's dtype. The real kernels take the same quantized
values and accumulate in float32, so outputs agree to float rounding (the tests check the values
bit for bit against torchao's own quantize-dequantize, and MX outputs against torchao's emulated
MX gemm). What runs where on CPU (torchao 0.18, torch 2.13):

- float8_e4m3fn / float8_e5m2: weight-only (``Float8WeightOnlyConfig``) real; dynamic
  (``Float8DynamicActivationFloat8WeightConfig``) simulated: quantize_ asks for CUDA sm89+ or MI300.
- mxfp8 / mxfp4: ``MXDynamicActivationMXWeightConfig`` only (torchao has no MX weight-only
  config), simulated: its gemm needs CUDA sm100+ (Blackwell), its quantize_ bfloat16 weights.
- nvfp4: weight-only (``NVFP4WeightOnlyConfig``) real; dynamic
  (``NVFP4DynamicActivationNVFP4WeightConfig``) simulated: quantize_ asks for CUDA sm100+.

Storage per weight (:data:`BITS`, the size figures): float8 8 bits; mxfp8 8 + 8/32 (one e8m0
scale per 32 elements) = 8.25; mxfp4 4 + 8/32 = 4.25; nvfp4 4 + 8/16 (one e4m3 scale per 16) =
4.5, plus one float32 scale per tensor (:data:`TENSOR_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NumberFormat:
    """One plan dtype of the torchao flow: its elements, block, storage and where it runs."""

    name: str
    family: str  # "float8", "mx" or "nvfp4": which torchao config builds it
    element: torch.dtype  # torch's element dtype
    block: int | None  # elements sharing one scale (None: per row or per tensor float32 scales)
    bits: float  # storage bits per weight, shared scales included
    tensor_bytes: int  # bytes per tensor besides (nvfp4: its float32 per-tensor scale)
    weight_only: bool  # torchao has a weight-only config for it (which runs on CPU)
    gpu: str  # what torchao's dynamic (activation + weight) kernels need


FORMATS = {
    f.name: f
    for f in (
        NumberFormat("float8_e4m3fn", "float8", torch.float8_e4m3fn, None, 8, 0, True, "CUDA sm89+ (Ada, Hopper) or MI300"),
        NumberFormat("float8_e5m2", "float8", torch.float8_e5m2, None, 8, 0, True, "CUDA sm89+ (Ada, Hopper) or MI300"),
        NumberFormat("mxfp8", "mx", torch.float8_e4m3fn, 32, 8 + 8 / 32, 0, False, "CUDA sm100+ (Blackwell)"),
        NumberFormat("mxfp4", "mx", torch.float4_e2m1fn_x2, 32, 4 + 8 / 32, 0, False, "CUDA sm100+ (Blackwell)"),
        NumberFormat("nvfp4", "nvfp4", torch.float4_e2m1fn_x2, 16, 4 + 8 / 16, 4, True, "CUDA sm100+ (Blackwell)"),
    )
}
BITS = {name: f.bits for name, f in FORMATS.items()}
TENSOR_BYTES = {name: f.tensor_bytes for name, f in FORMATS.items() if f.tensor_bytes}


def simulated(dtype: str, dynamic: bool) -> bool:
    """True when qviz simulates ``dtype`` on CPU: every format's dynamic config needs a GPU, every
    weight-only one (float8, nvfp4) runs on CPU; MX has only its dynamic config."""
    return dtype in FORMATS and (dynamic or not FORMATS[dtype].weight_only)


def needs(config) -> str:
    """What torchao's dynamic kernels for ``config`` need that this CPU lacks; MX and per-row float8
    quantize_ also take bfloat16 weights only (``model.to(torch.bfloat16)``; qviz simulates in the
    model's own dtype)."""
    fmt = FORMATS[config.dtype]
    bf16 = fmt.family == "mx" or (fmt.family == "float8" and config.weight == "per_channel")
    return fmt.gpu + (" and bfloat16 weights" if bf16 else "")


def problem(name: str, module: nn.Linear, config, dynamic: bool) -> str | None:
    """Why the torchao flow cannot run ``config`` (a format dtype) on Linear ``module``, or None."""
    fmt = FORMATS[config.dtype]
    if not dynamic and not fmt.weight_only:
        return (f"{name!r}: torchao has {config.dtype} only as dynamic activation + weight "
                "(MXDynamicActivationMXWeightConfig); use scheme='int8_dynamic', or another dtype")
    if not config.weight_symmetric:
        return f"{name!r}: {config.dtype} weights are symmetric (no zero point); set weight_symmetric=True"
    if fmt.block and config.weight == "per_tensor":
        return (f"{name!r}: {config.dtype} has one scale per block of {fmt.block} weights, not per "
                "tensor; set weight='per_channel'")
    k, n = module.in_features, module.out_features
    if fmt.block == 32 and k % 32:
        return f"{name!r}: {config.dtype} needs in_features divisible by 32, not {k}; keep it another dtype"
    if (fmt.block == 16 or (fmt.block is None and dynamic)) and (k % 16 or n % 16):
        why = "" if fmt.block else " (torchao would silently leave it float)"
        return (f"{name!r}: {config.dtype} needs in_features and out_features divisible by 16, not "
                f"{k} and {n}{why}; keep it another dtype")
    return None


# -- torchao's configs ---------------------------------------------------------------------------
def _granularity(config) -> str:
    return "PerRow" if config.weight == "per_channel" else "PerTensor"


def code(config, dynamic: bool) -> tuple[str, dict[str, set[str]]]:
    """(the torchao config expression for ``config``, {module: names it imports})."""
    fmt = FORMATS[config.dtype]
    element = f"torch.{str(fmt.element).replace('torch.', '')}"
    if fmt.family == "float8":
        g = _granularity(config)
        names = {"torchao.quantization": {g}}
        if dynamic:
            names["torchao.quantization"].add("Float8DynamicActivationFloat8WeightConfig")
            return (f"Float8DynamicActivationFloat8WeightConfig(activation_dtype={element}, weight_dtype="
                    f"{element}, granularity={g}())"), names
        names["torchao.quantization"].add("Float8WeightOnlyConfig")
        return f"Float8WeightOnlyConfig(weight_dtype={element}, granularity={g}())", names
    mx = "torchao.prototype.mx_formats"
    if fmt.family == "mx":
        return (f"MXDynamicActivationMXWeightConfig(activation_dtype={element}, weight_dtype={element})",
                {mx: {"MXDynamicActivationMXWeightConfig"}})
    if dynamic:
        return "NVFP4DynamicActivationNVFP4WeightConfig()", {mx: {"NVFP4DynamicActivationNVFP4WeightConfig"}}
    return "NVFP4WeightOnlyConfig()", {mx: {"NVFP4WeightOnlyConfig"}}


def torchao_config(ao, config, dynamic: bool):
    """torchao's config object for ``config`` (a format dtype); ``ao``: ``torchao.quantization``."""
    from torchao.prototype import mx_formats

    fmt = FORMATS[config.dtype]
    if fmt.family == "float8":
        g = getattr(ao, _granularity(config))()
        if dynamic:
            return ao.Float8DynamicActivationFloat8WeightConfig(
                activation_dtype=fmt.element, weight_dtype=fmt.element, granularity=g, set_inductor_config=False)
        return ao.Float8WeightOnlyConfig(weight_dtype=fmt.element, granularity=g, set_inductor_config=False)
    if fmt.family == "mx":
        return mx_formats.MXDynamicActivationMXWeightConfig(activation_dtype=fmt.element, weight_dtype=fmt.element)
    if dynamic:
        return mx_formats.NVFP4DynamicActivationNVFP4WeightConfig()
    return mx_formats.NVFP4WeightOnlyConfig()


# -- the CPU simulation --------------------------------------------------------------------------
def simulated_weight(weight: torch.Tensor, ao_config) -> torch.Tensor:
    """``weight`` quantized as the config's quantize_ handler quantizes it, activation kwargs
    included, by torchao's own constructors (scales kept unswizzled: a layout, not a value)."""
    from torchao.prototype.mx_formats import (
        MXDynamicActivationMXWeightConfig,
        NVFP4DynamicActivationNVFP4WeightConfig,
    )
    from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs
    from torchao.prototype.mx_formats.nvfp4_tensor import (
        NVFP4Tensor,
        QuantizeTensorToNVFP4Kwargs,
        per_tensor_amax_to_scale,
    )
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    weight = weight.detach()
    if isinstance(ao_config, MXDynamicActivationMXWeightConfig):
        c = ao_config
        kwargs = QuantizeTensorToMXKwargs(elem_dtype=c.activation_dtype, block_size=c.block_size,
                                          kernel_preference=c.kernel_preference, is_swizzled_scales=False,
                                          scaling_mode=c.scaling_mode)
        return MXTensor.to_mx(weight, c.weight_dtype, block_size=c.block_size,
                              kernel_preference=c.kernel_preference, act_quant_kwargs=kwargs,
                              is_swizzled_scales=False, scaling_mode=c.scaling_mode)
    if isinstance(ao_config, NVFP4DynamicActivationNVFP4WeightConfig):
        kwargs = QuantizeTensorToNVFP4Kwargs(use_dynamic_per_tensor_scale=True, use_triton_kernel=False)
        return NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=per_tensor_amax_to_scale(weight.abs().max()),
                                    act_quant_kwargs=kwargs)
    act, w = ao_config.granularity  # Float8DynamicActivationFloat8WeightConfig
    kwargs = QuantizeTensorToFloat8Kwargs(ao_config.activation_dtype, act,
                                          kernel_preference=ao_config.kernel_preference)
    return Float8Tensor.from_hp(weight, float8_dtype=ao_config.weight_dtype, granularity=w,
                                mm_config=ao_config.mm_config, kernel_preference=ao_config.kernel_preference,
                                act_quant_kwargs=kwargs)


def fake_quantize_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 2-D input batch quantized and dequantized as torchao's linear for ``weight`` (a
    :func:`simulated_weight`) quantizes activations before its gemm."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

    k = weight.act_quant_kwargs
    if isinstance(weight, MXTensor):
        q = MXTensor.to_mx(x, k.elem_dtype, k.block_size, k.scaling_mode, k.kernel_preference,
                           k.is_swizzled_scales)
    elif isinstance(weight, NVFP4Tensor):
        q = NVFP4Tensor.to_nvfp4(x, block_size=k.block_size, per_tensor_scale=per_tensor_amax_to_scale(x.abs().max()),
                                 is_swizzled_scales=k.is_swizzled_scales, use_triton_kernel=False)
    else:
        q = _choose_quant_func_and_quantize_tensor(x, k)
    return q.dequantize(x.dtype)


class SimulatedLinear(nn.Linear):
    """Stands in for a Linear whose torchao format cannot run on CPU: the weight is torchao's
    quantized tensor, each input is quantized and dequantized as torchao's kernel would, and
    the product is taken in the model's dtype. ``simulated`` says what the real kernel needs."""

    def __init__(self, linear: nn.Linear, ao_config, config):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(simulated_weight(linear.weight, ao_config), requires_grad=False)
        self.bias = linear.bias
        self.layer_type = "Linear"  # the type column's word: the layer the user has
        self.simulated = f"{config.dtype} simulated on CPU: torchao's kernels need {needs(config)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        w = self.weight.dequantize(x.dtype)
        y = F.linear(fake_quantize_input(x2d, self.weight), w, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.simulated}"


def format_of(weight: torch.Tensor) -> str | None:
    """The format name of a torchao quantized weight (None for integer tensors)."""
    if hasattr(weight, "elem_dtype"):  # MXTensor
        return "mxfp8" if weight.elem_dtype == torch.float8_e4m3fn else "mxfp4"
    if hasattr(weight, "per_tensor_scale"):  # NVFP4Tensor
        return "nvfp4"
    name = str(getattr(weight, "qdata", weight).dtype).replace("torch.", "")
    return name if name in FORMATS else None


def block_scales(weight: torch.Tensor) -> torch.Tensor | None:
    """A block format's scales as float32, one per block in row order (NVFP4: times its per-tensor
    scale), None for other weights."""
    if hasattr(weight, "get_hp_scales"):  # NVFP4Tensor, swizzled or not
        return weight.get_hp_scales().reshape(-1)
    if hasattr(weight, "elem_dtype"):  # MXTensor: e8m0 powers of two, unswizzled in qviz
        return weight.scale.float().reshape(-1)
    return None

"""Recognising modules by what they are: quantization points (observers, fake-quants), quantized
layers (torch.ao modules, torchao weights), and the layers of a converted model (shared by every flow)."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.intrinsic import _FusedModule


def is_quant_point(module: nn.Module) -> bool:
    """Observers and fake-quants of torch.ao and torchao alike, recognised by what they carry."""
    if not hasattr(module, "calculate_qparams"):
        return False
    carried = ("min_val", "scale", "activation_post_process", "histogram")
    return any(hasattr(module, attr) for attr in carried)


def is_fake_quant(module: nn.Module) -> bool:
    return hasattr(module, "fake_quant_enabled") and hasattr(module, "observer_enabled")


_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


def is_torchao_weight(t) -> bool:
    """A torchao quantized tensor subclass (Int8Tensor, IntxUnpackedToInt8Tensor, ...)."""
    return isinstance(t, torch.Tensor) and hasattr(type(t), "tensor_data_names") and hasattr(t, "qdata")


def is_quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_QUANTIZED_PACKAGES) or is_torchao_weight(
        getattr(module, "weight", None)
    )


def _has_weight(module: nn.Module) -> bool:
    return hasattr(module, "weight") or hasattr(module, "get_weight")


def find_layers(quantized: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
    """(quantized layers with weights, weighted layers left float), by module name.

    A layer is left float when it still has float weights in the quantized model (a type the
    backend cannot quantize, or a qconfig of None).
    """
    ref_names = dict(reference.named_modules())
    quantized_layers, left_float, fused_float = [], [], set()
    for name, module in quantized.named_modules():
        if not name or name not in ref_names or is_quant_point(module):
            continue
        if name.rpartition(".")[0] in fused_float:
            continue  # the conv inside a fused ConvReLU2d left float: the group is the layer
        if is_quantized_module(module):
            if _has_weight(module):
                quantized_layers.append(name)
        elif isinstance(module, _FusedModule) or any(
            p.is_floating_point() for p in module.parameters(recurse=False)
        ):
            left_float.append(name)
            if isinstance(module, _FusedModule):
                fused_float.add(name)
    return quantized_layers, left_float

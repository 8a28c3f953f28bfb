"""DigitsNet: a small residual CNN for 8x8 digits that every quantization flow can take.

Each conv, BN and ReLU is its own named module (so eager fusion has something to fuse and qviz
has something to show), the residual add goes through a ``FloatFunctional`` (so eager mode can
quantize it and FX can trace it), and Quant/DeQuant stubs bracket the network (identity in
float mode).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

_FUSION_GROUPS = (
    ("stem_conv", "stem_bn", "stem_relu"),
    ("block_conv1", "block_bn1", "block_relu1"),
    ("block_conv2", "block_bn2"),
    ("down_conv", "down_bn", "down_relu"),
    ("fc1", "fc1_relu"),
)


class DigitsNet(nn.Module):
    """Conv stem, one residual block, a strided conv to 4x4, pooling, two linear layers.

    Input: float32 (N, 1, 8, 8), normalised as in :func:`qviz.demo.data.preprocess`.
    Output: (N, 10) logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.quant = QuantStub()
        self.stem_conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.stem_relu = nn.ReLU()
        self.block_conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.block_bn1 = nn.BatchNorm2d(16)
        self.block_relu1 = nn.ReLU()
        self.block_conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.block_bn2 = nn.BatchNorm2d(16)
        self.skip_add = FloatFunctional()
        self.block_relu2 = nn.ReLU()
        self.down_conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(32)
        self.down_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 64)
        self.fc1_relu = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)
        self.dequant = DeQuantStub()

    @staticmethod
    def fusion_groups() -> list[list[str]]:
        """Module-name lists for ``torch.ao.quantization.fuse_modules`` (a fresh copy)."""
        return [list(group) for group in _FUSION_GROUPS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.stem_relu(self.stem_bn(self.stem_conv(x)))
        y = self.block_relu1(self.block_bn1(self.block_conv1(x)))
        y = self.block_bn2(self.block_conv2(y))
        x = self.block_relu2(self.skip_add.add(y, x))
        x = self.down_relu(self.down_bn(self.down_conv(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.fc2(self.fc1_relu(self.fc1(x)))
        return self.dequant(x)

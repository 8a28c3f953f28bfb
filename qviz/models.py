"""Small model builders for tests and benchmarks, in plain torch (no torchvision needed).

Every builder is deterministic given ``torch.manual_seed``. Models meant for static
quantization carry Quant/DeQuant stubs, do residual adds through a ``FloatFunctional`` and
list their eager fusion groups in ``fusion_groups()``, so eager, FX and dynamic flows all apply.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

__all__ = [
    "BasicBlock",
    "LSTMClassifier",
    "ResNet",
    "TinyMLP",
    "TransformerBlock",
    "resnet18",
    "tiny_lstm_classifier",
    "tiny_mlp",
    "transformer_block",
]


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, (downsample) skip add, relu.

    Unlike torchvision, which calls ``relu`` twice, the ReLU after the add is its own module
    (``relu2``) so fusing ``conv1, bn1, relu`` does not also remove it.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.skip_add = FloatFunctional()
        self.relu2 = nn.ReLU()

    def fusion_groups(self, prefix: str = "") -> list[list[str]]:
        """Eager fuse groups of this block, names prefixed with ``prefix``."""
        groups = [["conv1", "bn1", "relu"], ["conv2", "bn2"]]
        if self.downsample is not None:
            groups.append(["downsample.0", "downsample.1"])
        return [[prefix + name for name in group] for group in groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.skip_add.add(out, identity))


class ResNet(nn.Module):
    """torchvision-style ResNet of :class:`BasicBlock` s with Quant/DeQuant stubs at the ends.

    Parameter and buffer names match torchvision's, so its state dicts load unchanged.
    """

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000):
        super().__init__()
        self.quant = QuantStub()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.dequant = DeQuantStub()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def fusion_groups(self) -> list[list[str]]:
        """Module-name lists for ``torch.ao.quantization.fuse_modules``, downsamples included."""
        groups = [["conv1", "bn1", "relu"]]
        for name, module in self.named_modules():
            if isinstance(module, BasicBlock):
                groups += module.fusion_groups(prefix=name + ".")
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.fc(torch.flatten(self.avgpool(x), 1))
        return self.dequant(x)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (11.69M parameters at 1000 classes), randomly initialised like torchvision."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear between Quant/DeQuant stubs; input (N, in_features)."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 4):
        super().__init__()
        self.quant = QuantStub()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features)
        self.dequant = DeQuantStub()

    @staticmethod
    def fusion_groups() -> list[list[str]]:
        """Eager fuse groups: ``fc1`` with its ReLU."""
        return [["fc1", "relu"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


def tiny_mlp(in_features: int = 16, hidden: int = 32, out_features: int = 4) -> TinyMLP:
    """A :class:`TinyMLP`: the smallest model with a fusable pattern, for fast flow tests."""
    return TinyMLP(in_features, hidden, out_features)


class LSTMClassifier(nn.Module):
    """``nn.LSTM`` (batch first) + Linear head on the last time step; input (N, T, F)."""

    def __init__(
        self, input_size: int = 8, hidden_size: int = 16, num_classes: int = 4, num_layers: int = 1
    ):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def tiny_lstm_classifier(
    input_size: int = 8, hidden_size: int = 16, num_classes: int = 4, num_layers: int = 1
) -> LSTMClassifier:
    """An :class:`LSTMClassifier`, the target for dynamic quantization (LSTM and Linear)."""
    return LSTMClassifier(input_size, hidden_size, num_classes, num_layers)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention (``qkv`` and ``proj``
    Linear layers), LayerNorm, GELU MLP (``fc1``, ``fc2``), residual adds; input (N, T, dim).
    Written with plain tensor ops, so FX and ``torch.export`` trace it."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def transformer_block(dim: int = 64, heads: int = 4, hidden: int = 128) -> TransformerBlock:
    """A :class:`TransformerBlock`: attention + MLP + LayerNorm, the shape of an LLM layer."""
    return TransformerBlock(dim, heads, hidden)

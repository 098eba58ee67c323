"""ResNet-18 (basic blocks) and the ResNeXt-50 32x4d body (bottleneck blocks, grouped 3x3 convs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["RESNET_ZOO", "BasicBlock", "Bottleneck", "ResNeXtBody", "ResNet18"]


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same'-style padding) followed by BatchNorm2d."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, 1, stride)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, ReLU, projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.conv1(x)))
        return self.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 (stride here) -> 1x1 expanding to `c_out`."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups)
        self.conv3 = conv_bn(width, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))
        return self.relu(y + self.shortcut(x))


@dataclass(frozen=True)
class _ResNetConfig:
    image: int  # input height and width
    widths: tuple[int, int, int, int]  # output channels of layers 1-4
    blocks: tuple[int, int, int, int]  # blocks per layer
    classes: int


_RESNET18: dict[Size, _ResNetConfig] = {
    "tiny": _ResNetConfig(image=32, widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), classes=10),
    "full": _ResNetConfig(image=224, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000),
}


class ResNet18(nn.Module):
    """ResNet-18: 7x7/2 stem, max pool, 4 layers of basic blocks, global pool, classifier.

    (B, 3, H, W) float32 -> (B, classes) logits.
    """

    def __init__(self, cfg: _ResNetConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, cfg.widths[0], 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, c_in = [], cfg.widths[0]
        for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
            first = BasicBlock(c_in, width, stride=1 if i == 0 else 2)
            layers.append(nn.Sequential(first, *(BasicBlock(width, width, 1) for _ in range(n - 1))))
            c_in = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@dataclass(frozen=True)
class _ResNeXtConfig:
    c_in: int  # channels of the stem output that the body consumes
    image: int  # spatial size of that input (56 for a 224 image)
    planes: tuple[int, int, int, int]  # bottleneck base widths; the output is 4x planes
    blocks: tuple[int, int, int, int]
    groups: int  # cardinality
    group_width: int  # channels per group in layer 1, doubled by each later layer


_RESNEXT50: dict[Size, _ResNeXtConfig] = {
    "tiny": _ResNeXtConfig(
        c_in=8, image=14, planes=(8, 16, 32, 64), blocks=(1, 1, 1, 1), groups=4, group_width=4
    ),
    "full": _ResNeXtConfig(
        c_in=64, image=56, planes=(64, 128, 256, 512), blocks=(3, 4, 6, 3), groups=32, group_width=4
    ),
}


class ResNeXtBody(nn.Module):
    """Layers 1-4 of ResNeXt-50 (32x4d): (B, 64, 56, 56) stem output -> (B, 2048, 7, 7) at full size."""

    def __init__(self, cfg: _ResNeXtConfig) -> None:
        super().__init__()
        layers, c_in = [], cfg.c_in
        for i, (planes, n) in enumerate(zip(cfg.planes, cfg.blocks)):
            width = cfg.groups * cfg.group_width * 2**i  # 128, 256, 512, 1024 for 32x4d
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(c_in, width, planes * 4, stride, cfg.groups))
                c_in = planes * 4
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _resnet18_inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = _RESNET18[size].image
    return (torch.randn(batch, 3, image, image, generator=gen),)


def _resnext_inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    cfg = _RESNEXT50[size]
    return (torch.randn(batch, cfg.c_in, cfg.image, cfg.image, generator=gen),)


RESNET_ZOO = (
    ZooModel(
        name="resnet18",
        description="ResNet-18 classifier, 3x224x224 -> 1000 logits (full)",
        task="inference",
        default_batch=8,
        builder=lambda size: ResNet18(_RESNET18[size]),
        make_inputs=_resnet18_inputs,
    ),
    ZooModel(
        name="resnext50",
        description="ResNeXt-50 32x4d body (layers 1-4, grouped 3x3 convs), 64x56x56 -> 2048x7x7 (full)",
        task="inference",
        default_batch=8,
        builder=lambda size: ResNeXtBody(_RESNEXT50[size]),
        make_inputs=_resnext_inputs,
    ),
)

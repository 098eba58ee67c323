"""MobileNetV2: inverted residual blocks with depthwise 3x3 convs and ReLU6."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["MOBILENET_ZOO", "InvertedResidual", "MobileNetV2"]

# (expansion t, output channels c, repeats n, first stride s) per stage, from the MobileNetV2 paper.
_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True)
class _MobileNetConfig:
    image: int  # input height and width
    width_mult: float  # channel multiplier applied to every stage
    max_repeats: int  # caps n per stage (tiny keeps every stage, one block each)
    last_channels: int
    classes: int


_SIZES: dict[Size, _MobileNetConfig] = {
    "tiny": _MobileNetConfig(image=32, width_mult=0.25, max_repeats=1, last_channels=64, classes=10),
    "full": _MobileNetConfig(image=224, width_mult=1.0, max_repeats=4, last_channels=1280, classes=1000),
}


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU6())


def _channels(c: int, mult: float) -> int:
    """Scale `c` by `mult`, rounded to a multiple of 8 (at least 8), as MobileNet does."""
    return max(8, int(c * mult + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> depthwise 3x3 (ReLU6) -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        expand = [_conv_bn_relu6(c_in, hidden, 1)] if expansion != 1 else []
        self.body = nn.Sequential(
            *expand,
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """(B, 3, H, W) float32 -> (B, classes) logits."""

    def __init__(self, cfg: _MobileNetConfig) -> None:
        super().__init__()
        c_in = _channels(32, cfg.width_mult)
        blocks: list[nn.Module] = [_conv_bn_relu6(3, c_in, 3, 2)]
        for t, c, n, s in _STAGES:
            c_out = _channels(c, cfg.width_mult)
            for j in range(min(n, cfg.max_repeats)):
                blocks.append(InvertedResidual(c_in, c_out, s if j == 0 else 1, t))
                c_in = c_out
        blocks.append(_conv_bn_relu6(c_in, cfg.last_channels, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg.last_channels, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = _SIZES[size].image
    return (torch.randn(batch, 3, image, image, generator=gen),)


MOBILENET_ZOO = (
    ZooModel(
        name="mobilenet_v2",
        description="MobileNetV2 (inverted residuals, depthwise convs, ReLU6), 3x224x224 -> 1000 (full)",
        task="inference",
        default_batch=8,
        builder=lambda size: MobileNetV2(_SIZES[size]),
        make_inputs=_inputs,
    ),
)

"""NASNet-A-style network: a stack of multi-branch normal and reduction cells.

Each cell preprocesses its two inputs (the outputs of the two previous cells) to `c` channels, then
computes five blocks; a block adds two branches (separable convs, pooling, identity) applied to the
cell inputs or to earlier blocks, and the cell concatenates several of these states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["NASNET_ZOO", "Block", "Cell", "NASNet"]

# A block: (op, input state, op, input state); states are [h0, h1, block0, block1, ...].
_Block = tuple[str, int, str, int]
_NORMAL: tuple[_Block, ...] = (
    ("sep3", 1, "identity", 1),
    ("sep3", 0, "sep5", 1),
    ("avg3", 1, "identity", 0),
    ("avg3", 0, "avg3", 0),
    ("sep5", 0, "sep3", 0),
)
_NORMAL_CONCAT: tuple[int, ...] = (0, 2, 3, 4, 5, 6)  # -> 6c channels
_REDUCTION: tuple[_Block, ...] = (
    ("sep5", 1, "sep7", 0),
    ("max3", 1, "sep7", 0),
    ("avg3", 1, "sep5", 0),
    ("max3", 1, "sep3", 2),
    ("avg3", 2, "identity", 3),
)
_REDUCTION_CONCAT: tuple[int, ...] = (3, 4, 5, 6)  # -> 4c channels


@dataclass(frozen=True)
class _NASNetConfig:
    image: int  # input height and width
    stem: int  # channels after the two stride-2 stem convs
    channels: int  # cell channels `c` in the first stage (doubled by each reduction)
    cells: int  # normal cells per stage (3 stages, reduction cells between them)
    classes: int


_SIZES: dict[Size, _NASNetConfig] = {
    "tiny": _NASNetConfig(image=32, stem=8, channels=4, cells=1, classes=10),
    "full": _NASNetConfig(image=224, stem=32, channels=32, cells=2, classes=1000),
}


def _relu_conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


def _separable(c: int, kernel: int, stride: int) -> nn.Sequential:
    """Twice ReLU -> depthwise kxk -> pointwise 1x1 -> BN; only the first depthwise conv strides."""
    layers: list[nn.Module] = []
    for s in (stride, 1):
        layers += [
            nn.ReLU(),
            nn.Conv2d(c, c, kernel, s, kernel // 2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
        ]
    return nn.Sequential(*layers)


def _op(name: str, c: int, stride: int) -> nn.Module:
    if name.startswith("sep"):
        return _separable(c, int(name[3:]), stride)
    if name == "avg3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    if name == "max3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "identity" and stride == 1:
        return nn.Identity()
    raise ValueError(f"unknown NASNet op {name!r} at stride {stride}")


class Block(nn.Module):
    """Two branches added: `left(states[a]) + right(states[b])`; cell inputs stride 2 in a reduction cell."""

    def __init__(self, spec: _Block, c: int, *, reduction: bool) -> None:
        super().__init__()
        op_a, self.a, op_b, self.b = spec
        self.left = _op(op_a, c, 2 if reduction and self.a < 2 else 1)
        self.right = _op(op_b, c, 2 if reduction and self.b < 2 else 1)

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self.left(states[self.a]) + self.right(states[self.b])


class Cell(nn.Module):
    """One normal (`reduction=False`) or reduction cell: (h0, h1) -> concatenation of chosen states."""

    def __init__(
        self, c_prev_prev: int, c_prev: int, c: int, *, reduction: bool, reduction_prev: bool
    ) -> None:
        super().__init__()
        stride0 = 2 if reduction_prev else 1  # h0 is twice as large after a reduction cell
        self.pre0 = _relu_conv_bn(c_prev_prev, c, stride0)
        self.pre1 = _relu_conv_bn(c_prev, c)
        blocks, self.concat = (_REDUCTION, _REDUCTION_CONCAT) if reduction else (_NORMAL, _NORMAL_CONCAT)
        self.blocks = nn.ModuleList(Block(spec, c, reduction=reduction) for spec in blocks)
        self.out_channels = c * len(self.concat)

    def forward(self, h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(h0), self.pre1(h1)]
        for block in self.blocks:
            states.append(block(states))
        return torch.cat([states[i] for i in self.concat], dim=1)


class NASNet(nn.Module):
    """(B, 3, H, W) float32 -> (B, classes) logits; 3 stages of normal cells, 2 reduction cells."""

    def __init__(self, cfg: _NASNetConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, cfg.stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.stem),
            nn.ReLU(),
            nn.Conv2d(cfg.stem, cfg.stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.stem),
        )
        cells = self._cells(cfg)
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cells[-1].out_channels, cfg.classes)

    @staticmethod
    def _cells(cfg: _NASNetConfig) -> list[Cell]:
        cells, c_pp, c_p, reduction_prev = [], cfg.stem, cfg.stem, False
        for stage in range(3):
            c = cfg.channels * 2**stage
            kinds = [False] * cfg.cells + ([True] if stage < 2 else [])
            for reduction in kinds:
                cell = Cell(
                    c_pp, c_p, c * 2 if reduction else c, reduction=reduction, reduction_prev=reduction_prev
                )
                cells.append(cell)
                c_pp, c_p, reduction_prev = c_p, cell.out_channels, reduction
        return cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = h1 = self.stem(x)
        for cell in self.cells:
            h0, h1 = h1, cell(h0, h1)
        return self.fc(self.pool(torch.relu(h1)).flatten(1))


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = _SIZES[size].image
    return (torch.randn(batch, 3, image, image, generator=gen),)


NASNET_ZOO = (
    ZooModel(
        name="nasnet",
        description="NASNet-A-style stack of multi-branch cells (separable convs, pooling, identity), 3x224x224",
        task="inference",
        default_batch=8,
        builder=lambda size: NASNet(_SIZES[size]),
        make_inputs=_inputs,
    ),
)

"""CANDLE-Uno: 7 feature branches x 4 feed-forward layers, concatenated, then a regression MLP.

A GraphPipe (ASPLOS 2025) benchmark model (drug-response prediction from cell-line and drug
features). `forward` is `torch.fx.symbolic_trace`-able; the branches are `self.branches`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["UNO_BRANCHES", "UNO_LAYERS", "UNO_ZOO", "CandleUno"]

UNO_BRANCHES = 7  # feature groups, one input tensor each
UNO_LAYERS = 4  # Linear + ReLU layers per branch


@dataclass(frozen=True)
class _UnoConfig:
    features: tuple[int, ...]  # input width of each of the 7 branches
    hidden: int  # width of every branch layer
    top: int  # width of the top MLP


_SIZES: dict[Size, _UnoConfig] = {
    "tiny": _UnoConfig(features=(5, 6, 7, 8, 9, 10, 11), hidden=8, top=8),
    # cell RNA-seq, 2 x (drug descriptors, drug fingerprints), 2 small descriptor groups
    "full": _UnoConfig(features=(942, 5270, 2048, 5270, 2048, 256, 256), hidden=512, top=512),
}


def _feed_forward(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(sizes):
        layers += [nn.Linear(c_in, c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class CandleUno(nn.Module):
    """Seven (B, features_i) float32 inputs -> (B, 1) float32 regression output."""

    def __init__(self, cfg: _UnoConfig) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_feed_forward([f] + [cfg.hidden] * UNO_LAYERS) for f in cfg.features)
        self.top = nn.Sequential(
            _feed_forward([UNO_BRANCHES * cfg.hidden, cfg.top, cfg.top]), nn.Linear(cfg.top, 1)
        )

    def forward(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        x2: torch.Tensor,
        x3: torch.Tensor,
        x4: torch.Tensor,
        x5: torch.Tensor,
        x6: torch.Tensor,
    ) -> torch.Tensor:
        inputs = (x0, x1, x2, x3, x4, x5, x6)
        return self.top(torch.cat([branch(x) for branch, x in zip(self.branches, inputs)], dim=1))


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, f, generator=gen) for f in _SIZES[size].features)


def _target(size: Size, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 1, generator=gen)  # (B, 1) float32 response


UNO_ZOO = (
    ZooModel(
        name="candle_uno",
        description="CANDLE-Uno: 7 branches x 4 FF layers, concat, top MLP regression head (MSE)",
        task="training",
        default_batch=32,
        builder=lambda size: CandleUno(_SIZES[size]),
        make_inputs=_inputs,
        make_target=_target,
        loss_fn=F.mse_loss,
    ),
)

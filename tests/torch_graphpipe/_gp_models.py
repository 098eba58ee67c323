"""Tiny models of every shape the runtime must handle, with batches and losses (for the runtime tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CASES", "Case", "ForkJoin", "Untraceable"]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())))

    def forward(self, x):
        return self.layers(x)


class ForkJoin(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.left = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.right = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.left(s) + self.right(s))


class Untraceable(nn.Module):
    """Python control flow on tensor data: symbolic tracing must fail and name the line."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class Concat(nn.Module):
    """Three inputs, three towers, concatenated into one head."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(4, 8), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(24, 2)

    def forward(self, x, y, z):
        return self.head(torch.cat([t(v) for t, v in zip(self.towers, (x, y, z))], dim=-1))


class Skip(nn.Module):
    """A long skip edge from the first block to the last."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
        self.e = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        z = self.d(torch.tanh(self.c(torch.relu(self.b(h)))))
        return self.e(z + h)


class MultiOutput(nn.Module):
    """Two heads whose outputs form the model output (a tuple)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(8, 8)
        self.h1 = nn.Linear(8, 3)
        self.h2 = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 5))

    def forward(self, x):
        t = self.trunk(x)
        return self.h1(t), self.h2(t)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _two_heads(
    out: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    return F.mse_loss(out[0], target[0]) + F.cross_entropy(out[1], target[1])


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[tuple[Any, ...], Any]]  # (inputs, target)
    loss: Callable[[Any, Any], torch.Tensor]
    partition: list[list[str]]  # explicit partition, one group per stage


def _rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


CASES: dict[str, Case] = {
    "chain": Case(
        Chain,
        lambda b, g: ((_rand(b, 8, g=g),), _rand(b, 8, g=g)),
        _mse,
        [
            ["layers.0", "layers.1"],
            ["layers.2", "layers.3"],
            ["layers.4", "layers.5"],
            ["layers.6", "layers.7"],
        ],
    ),
    "fork_join": Case(
        ForkJoin,
        lambda b, g: ((_rand(b, 8, g=g),), _rand(b, 4, g=g)),
        _mse,
        [["stem"], ["left"], ["right"], ["head"]],
    ),
    # the last stage joins the branches and holds one of them: it is split at the other (late) branch
    "fork_join_tail": Case(
        ForkJoin,
        lambda b, g: ((_rand(b, 8, g=g),), _rand(b, 4, g=g)),
        _mse,
        [["stem"], ["left"], ["right", "head"]],
    ),
    "concat": Case(
        Concat,
        lambda b, g: (tuple(_rand(b, 4, g=g) for _ in range(3)), _rand(b, 2, g=g)),
        _mse,
        [["towers.0"], ["towers.1"], ["towers.2"], ["head"]],
    ),
    "skip": Case(
        Skip,
        lambda b, g: ((_rand(b, 8, g=g),), _rand(b, 3, g=g)),
        _mse,
        [["a"], ["b", "c"], ["d", "e"]],
    ),
    "multi_output": Case(
        MultiOutput,
        lambda b, g: ((_rand(b, 8, g=g),), (_rand(b, 3, g=g), torch.randint(0, 5, (b,), generator=g))),
        _two_heads,
        [["trunk"], ["h1"], ["h2"]],
    ),
}

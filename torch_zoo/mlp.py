"""MLPs: a plain 3-layer GELU MLP and a residual MLP (LayerNorm + Linear + GELU + Linear blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["MLP", "MLP_ZOO", "ResidualBlock", "ResidualMLP"]


@dataclass(frozen=True)
class _MlpConfig:
    dim: int  # input and output features
    hidden: int  # hidden features
    blocks: int  # residual blocks (residual_mlp only)


_SIZES: dict[Size, _MlpConfig] = {
    "tiny": _MlpConfig(dim=16, hidden=32, blocks=2),
    "full": _MlpConfig(dim=512, hidden=2048, blocks=4),
}


class MLP(nn.Module):
    """`dim -> hidden -> hidden -> dim` with GELU between the three linear layers; (B, dim) -> (B, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class ResidualBlock(nn.Module):
    """`x + Linear(GELU(Linear(LayerNorm(x))))`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """A stack of `ResidualBlock`s and a final LayerNorm; (B, dim) -> (B, dim)."""

    def __init__(self, dim: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(dim, hidden) for _ in range(blocks)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, _SIZES[size].dim, generator=gen),)


def _build_mlp(size: Size) -> nn.Module:
    cfg = _SIZES[size]
    return MLP(cfg.dim, cfg.hidden)


def _build_residual_mlp(size: Size) -> nn.Module:
    cfg = _SIZES[size]
    return ResidualMLP(cfg.dim, cfg.hidden, cfg.blocks)


MLP_ZOO = (
    ZooModel(
        name="mlp",
        description="3-layer GELU MLP, d 512->2048->2048->512 (full)",
        task="inference",
        default_batch=32,
        builder=_build_mlp,
        make_inputs=_inputs,
    ),
    ZooModel(
        name="residual_mlp",
        description="4 residual LayerNorm+Linear+GELU+Linear blocks, d 512, hidden 2048 (full)",
        task="inference",
        default_batch=32,
        builder=_build_residual_mlp,
        make_inputs=_inputs,
    ),
)

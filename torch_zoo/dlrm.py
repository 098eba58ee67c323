"""DLRM: 7 dense-feature branches (bottom MLPs) + 7 embedding branches, pairwise dot-product
interaction of the 14 vectors, top MLP, one click logit.

A GraphPipe (ASPLOS 2025) benchmark model. Each branch has its own input tensor; `forward` is
`torch.fx.symbolic_trace`-able. Embedding bags are `nn.Embedding` + sum (ONNX/OpenVINO friendly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["DLRM", "DLRM_DENSE", "DLRM_SPARSE", "DLRM_ZOO", "DenseBranch", "EmbeddingBag"]

DLRM_DENSE = 7  # dense-feature branches
DLRM_SPARSE = 7  # embedding branches


@dataclass(frozen=True)
class _DLRMConfig:
    dense: int  # features per dense input
    bottom: int  # hidden width of each bottom MLP
    embed: int  # vector width shared by all 14 branch outputs
    rows: int  # rows per embedding table
    bag: int  # indices per bag (summed)
    top: int  # hidden width of the top MLP


_SIZES: dict[Size, _DLRMConfig] = {
    "tiny": _DLRMConfig(dense=4, bottom=8, embed=4, rows=16, bag=3, top=8),
    "full": _DLRMConfig(dense=128, bottom=1024, embed=128, rows=10000, bag=8, top=1024),
}


class DenseBranch(nn.Module):
    """Bottom MLP, dense -> bottom -> bottom -> embed with ReLUs: (B, dense) float32 -> (B, embed)."""

    def __init__(self, cfg: _DLRMConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dense, cfg.bottom),
            nn.ReLU(),
            nn.Linear(cfg.bottom, cfg.bottom),
            nn.ReLU(),
            nn.Linear(cfg.bottom, cfg.embed),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class EmbeddingBag(nn.Module):
    """Sum-pooled embedding lookup: (B, bag) int64 row ids -> (B, embed)."""

    def __init__(self, cfg: _DLRMConfig) -> None:
        super().__init__()
        self.table = nn.Embedding(cfg.rows, cfg.embed)
        nn.init.normal_(self.table.weight, std=cfg.bag**-0.5)  # the sum of a bag has unit variance

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids).sum(dim=1)


def _upper_pairs(n: int) -> torch.Tensor:
    """Flat indices i * n + j of the pairs i < j of an n x n matrix: (n (n - 1) / 2,) int64."""
    i, j = torch.triu_indices(n, n, offset=1)
    return i * n + j


class DLRM(nn.Module):
    """7 (B, dense) float32 + 7 (B, bag) int64 inputs -> (B, 1) click logit."""

    pairs: torch.Tensor  # (91,) int64 flat indices of the upper triangle of the 14 x 14 dot products

    def __init__(self, cfg: _DLRMConfig) -> None:
        super().__init__()
        vectors = DLRM_DENSE + DLRM_SPARSE
        self.dense_branches = nn.ModuleList(DenseBranch(cfg) for _ in range(DLRM_DENSE))
        self.sparse_branches = nn.ModuleList(EmbeddingBag(cfg) for _ in range(DLRM_SPARSE))
        self.register_buffer("pairs", _upper_pairs(vectors), persistent=False)
        top_in = DLRM_DENSE * cfg.embed + vectors * (vectors - 1) // 2
        self.top = nn.Sequential(
            nn.Linear(top_in, cfg.top),
            nn.ReLU(),
            nn.Linear(cfg.top, cfg.top),
            nn.ReLU(),
            nn.Linear(cfg.top, 1),
        )

    def forward(
        self,
        dense0: torch.Tensor,
        dense1: torch.Tensor,
        dense2: torch.Tensor,
        dense3: torch.Tensor,
        dense4: torch.Tensor,
        dense5: torch.Tensor,
        dense6: torch.Tensor,
        sparse0: torch.Tensor,
        sparse1: torch.Tensor,
        sparse2: torch.Tensor,
        sparse3: torch.Tensor,
        sparse4: torch.Tensor,
        sparse5: torch.Tensor,
        sparse6: torch.Tensor,
    ) -> torch.Tensor:
        dense_in = (dense0, dense1, dense2, dense3, dense4, dense5, dense6)
        sparse_in = (sparse0, sparse1, sparse2, sparse3, sparse4, sparse5, sparse6)
        dense = [branch(x) for branch, x in zip(self.dense_branches, dense_in)]
        sparse = [branch(x) for branch, x in zip(self.sparse_branches, sparse_in)]
        return self.top(torch.cat([*dense, self._interact(dense + sparse)], dim=1))

    def _interact(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Dot products of every pair of the 14 (B, embed) vectors: (B, 91)."""
        z = torch.stack(vectors, dim=1)  # (B, 14, embed)
        return torch.matmul(z, z.transpose(1, 2)).flatten(1).index_select(1, self.pairs)


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    cfg = _SIZES[size]
    dense = [torch.randn(batch, cfg.dense, generator=gen) for _ in range(DLRM_DENSE)]
    sparse = [torch.randint(0, cfg.rows, (batch, cfg.bag), generator=gen) for _ in range(DLRM_SPARSE)]
    return (*dense, *sparse)


def _target(size: Size, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (batch, 1), generator=gen).float()  # (B, 1) float32 click labels


DLRM_ZOO = (
    ZooModel(
        name="dlrm",
        description="DLRM: 7 dense bottom-MLP + 7 embedding-bag branches, pairwise dot interaction, top MLP",
        task="training",
        default_batch=32,
        builder=lambda size: DLRM(_SIZES[size]),
        make_inputs=_inputs,
        make_target=_target,
        loss_fn=F.binary_cross_entropy_with_logits,
    ),
)

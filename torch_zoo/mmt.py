"""MMT: a multi-modal transformer, 4 modality branches x 8 transformer layers, merged by a head.

A GraphPipe (ASPLOS 2025) benchmark model: the branches are independent until the merge, so a
graph pipeline can run them as concurrent stages. `forward` is `torch.fx.symbolic_trace`-able.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torch_zoo.attention import TransformerLayer
from torch_zoo.model import Size, ZooModel

__all__ = ["MMT_BRANCHES", "MMT_LAYERS", "MMT_ZOO", "ModalityBranch", "MultiModalTransformer"]

MMT_BRANCHES = 4  # modalities, one input tensor each
MMT_LAYERS = 8  # transformer layers per branch


@dataclass(frozen=True)
class _MMTConfig:
    features: tuple[int, int, int, int]  # input feature width of each modality
    hidden: int
    heads: int
    ffn: int
    seq: int  # tokens per modality
    classes: int


_SIZES: dict[Size, _MMTConfig] = {
    "tiny": _MMTConfig(features=(6, 8, 10, 12), hidden=16, heads=2, ffn=32, seq=4, classes=3),
    "full": _MMTConfig(features=(64, 128, 96, 32), hidden=256, heads=4, ffn=1024, seq=32, classes=10),
}


class ModalityBranch(nn.Module):
    """(B, seq, features) float32 -> (B, hidden): projection, positions, 8 pre-LN layers, mean pool."""

    def __init__(self, features: int, cfg: _MMTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(features, cfg.hidden)
        self.position = nn.Parameter(torch.randn(cfg.seq, cfg.hidden) * 0.02)
        layers = (TransformerLayer(cfg.hidden, cfg.heads, cfg.ffn, pre_norm=True) for _ in range(MMT_LAYERS))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.proj(x) + self.position)).mean(dim=1)


class MultiModalTransformer(nn.Module):
    """Four (B, seq, features_i) float32 inputs -> (B, classes) logits."""

    def __init__(self, cfg: _MMTConfig) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ModalityBranch(f, cfg) for f in cfg.features)
        self.head = nn.Sequential(
            nn.Linear(MMT_BRANCHES * cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.classes)
        )

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([branch(x) for branch, x in zip(self.branches, (x0, x1, x2, x3))], dim=-1)
        return self.head(merged)


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    cfg = _SIZES[size]
    return tuple(torch.randn(batch, cfg.seq, f, generator=gen) for f in cfg.features)


def _target(size: Size, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, _SIZES[size].classes, (batch,), generator=gen)  # (B,) int64 class ids


MMT_ZOO = (
    ZooModel(
        name="mmt",
        description="multi-modal transformer: 4 branches x 8 layers (hidden 256, seq 32 full), concat + head",
        task="training",
        default_batch=8,
        builder=lambda size: MultiModalTransformer(_SIZES[size]),
        make_inputs=_inputs,
        make_target=_target,
        loss_fn=F.cross_entropy,
    ),
)

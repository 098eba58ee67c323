"""Transformer building blocks shared by `bert`, `gpt2` and `mmt`.

Attention is written with matmul + softmax (no fused SDPA) so that every op exports cleanly to
ONNX (`torch.onnx.export(dynamo=True)`), OpenVINO and `torch.fx.symbolic_trace`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["SelfAttention", "TransformerLayer"]


def _future_mask(seq: int, device: torch.device) -> torch.Tensor:
    """(S, S) bool, True where key j is after query i; built from `arange` so FX and export trace it."""
    position = torch.arange(seq, device=device)
    return position.unsqueeze(0) > position.unsqueeze(1)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, S, hidden) float32; token i attends to j <= i when `causal`."""

    def __init__(self, hidden: int, heads: int, *, causal: bool = False) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(hidden // heads)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.causal = causal

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, hidden) -> (B, heads, S, head_dim)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # (B, heads, S, S)
        if self.causal:
            scores = scores.masked_fill(_future_mask(x.shape[1], x.device), float("-inf"))
        context = torch.matmul(scores.softmax(dim=-1), v)  # (B, heads, S, head_dim)
        return self.out(context.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    """Self-attention + GELU feed-forward, each with a residual and a LayerNorm.

    `pre_norm=True` normalises before each sub-block (GPT-2); `False` after the residual (BERT).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        ffn: int,
        *,
        pre_norm: bool,
        causal: bool = False,
        gelu: Literal["none", "tanh"] = "none",
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(hidden, heads, causal=causal)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(approximate=gelu), nn.Linear(ffn, hidden))
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ffn(x))

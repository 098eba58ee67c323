"""Language transformers: a BERT-style encoder and a small GPT-2-style decoder (token ids in)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.attention import TransformerLayer
from torch_zoo.model import InputFactory, Size, ZooModel

__all__ = ["GPT2", "TRANSFORMER_ZOO", "Bert"]


@dataclass(frozen=True)
class _TransformerConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int  # feed-forward inner width
    seq: int  # sequence length of the example inputs (and the longest one supported)


_BERT: dict[Size, _TransformerConfig] = {
    "tiny": _TransformerConfig(vocab=64, hidden=16, layers=2, heads=2, ffn=32, seq=8),
    "full": _TransformerConfig(vocab=30522, hidden=256, layers=8, heads=8, ffn=1024, seq=64),
}
# GPT-2 proper has a 50257-token vocabulary; 8192 keeps the LM head from dominating this small body.
_GPT2: dict[Size, _TransformerConfig] = {
    "tiny": _TransformerConfig(vocab=64, hidden=16, layers=2, heads=2, ffn=64, seq=8),
    "full": _TransformerConfig(vocab=8192, hidden=256, layers=4, heads=4, ffn=1024, seq=64),
}


class _Embeddings(nn.Module):
    """Word + learned position embeddings: (B, S) int64 token ids -> (B, S, hidden)."""

    def __init__(self, cfg: _TransformerConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position = nn.Parameter(torch.randn(cfg.seq, cfg.hidden) * 0.02)  # (S_max, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word(ids) + self.position[: ids.shape[1]]


class Bert(nn.Module):
    """BERT-style encoder (post-LayerNorm, GELU): (B, S) int64 ids -> (B, S, hidden) float32."""

    def __init__(self, cfg: _TransformerConfig) -> None:
        super().__init__()
        self.embed = _Embeddings(cfg)
        self.embed_norm = nn.LayerNorm(cfg.hidden)
        layers = (TransformerLayer(cfg.hidden, cfg.heads, cfg.ffn, pre_norm=False) for _ in range(cfg.layers))
        self.layers = nn.Sequential(*layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embed_norm(self.embed(ids)))


class GPT2(nn.Module):
    """GPT-2-style decoder (pre-LayerNorm, causal, tanh GELU): (B, S) int64 ids -> (B, S, vocab) logits."""

    def __init__(self, cfg: _TransformerConfig) -> None:
        super().__init__()
        self.embed = _Embeddings(cfg)
        layers = (
            TransformerLayer(cfg.hidden, cfg.heads, cfg.ffn, pre_norm=True, causal=True, gelu="tanh")
            for _ in range(cfg.layers)
        )
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.layers(self.embed(ids))))


def _token_inputs(table: dict[Size, _TransformerConfig]) -> InputFactory:
    def inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        cfg = table[size]
        return (torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=gen),)

    return inputs


TRANSFORMER_ZOO = (
    ZooModel(
        name="bert",
        description="BERT-style encoder: hidden 256, 8 layers, 8 heads, FFN 1024, seq 64 (full)",
        task="inference",
        default_batch=8,
        builder=lambda size: Bert(_BERT[size]),
        make_inputs=_token_inputs(_BERT),
    ),
    ZooModel(
        name="gpt2",
        description="GPT-2-style causal decoder: hidden 256, 4 layers, 4 heads, seq 64, vocab 8192 (full)",
        task="inference",
        default_batch=8,
        builder=lambda size: GPT2(_GPT2[size]),
        make_inputs=_token_inputs(_GPT2),
    ),
)

"""DCGAN generator: a latent vector up-sampled to a 3x64x64 image by transposed convolutions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torch_zoo.model import Size, ZooModel

__all__ = ["DCGAN_ZOO", "DCGANGenerator"]


@dataclass(frozen=True)
class _DCGANConfig:
    latent: int  # latent vector length (nz)
    features: int  # generator feature maps at the last hidden layer (ngf)


_SIZES: dict[Size, _DCGANConfig] = {
    "tiny": _DCGANConfig(latent=8, features=4),
    "full": _DCGANConfig(latent=100, features=64),
}


def _up(c_in: int, c_out: int, stride: int, padding: int) -> nn.Sequential:
    """ConvTranspose2d 4x4 + BatchNorm + ReLU."""
    conv = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())


class DCGANGenerator(nn.Module):
    """(B, latent, 1, 1) float32 -> (B, 3, 64, 64) in [-1, 1]: 1 -> 4 -> 8 -> 16 -> 32 -> 64 pixels."""

    def __init__(self, latent: int, features: int) -> None:
        super().__init__()
        f = features
        self.net = nn.Sequential(
            _up(latent, f * 8, 1, 0),
            _up(f * 8, f * 4, 2, 1),
            _up(f * 4, f * 2, 2, 1),
            _up(f * 2, f, 2, 1),
            nn.ConvTranspose2d(f, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _build(size: Size) -> nn.Module:
    cfg = _SIZES[size]
    return DCGANGenerator(cfg.latent, cfg.features)


def _inputs(size: Size, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, _SIZES[size].latent, 1, 1, generator=gen),)


DCGAN_ZOO = (
    ZooModel(
        name="dcgan",
        description="DCGAN generator, 100-d latent -> 3x64x64 image (ConvTranspose2d+BatchNorm+ReLU, Tanh)",
        task="inference",
        default_batch=8,
        builder=_build,
        make_inputs=_inputs,
    ),
)

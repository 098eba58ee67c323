"""Random weights that keep activations alive: He init, then BatchNorm statistics from a random batch.

# [Note: zoo weights]
PyTorch's default init (Kaiming-uniform with a = sqrt(5), variance 1/(3 fan_in)) shrinks the signal
at every layer, and an eval-mode BatchNorm with fresh statistics (mean 0, variance 1) normalises
nothing; deep zoo models then return (almost) the same output for every input, and comparing a
backend against eager on them would check nothing. So `ZooModel.build`:
1. draws every Linear / Conv / ConvTranspose weight He-normal (fan_in, ReLU gain) — biases keep
   PyTorch's default — which preserves the activation variance through ReLU stacks;
2. runs one random batch through the model in train mode with cumulative BatchNorm averaging, so
   each BatchNorm's running statistics are those of its real input (as after training).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["calibrate_batchnorm", "init_weights"]

_HE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def init_weights(model: nn.Module) -> None:
    """Draw every Linear / conv weight He-normal (fan_in, ReLU gain) from the global RNG, in place."""
    for module in model.modules():
        if isinstance(module, _HE_LAYERS):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def calibrate_batchnorm(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Set each BatchNorm's running mean and variance to those seen on `inputs` (no other change)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(*inputs)
    model.train(was_training)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum

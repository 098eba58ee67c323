"""Eager PyTorch: the module itself. Supports every op, so a cover of any graph always exists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["EagerBackend"]


@dataclass(frozen=True, kw_only=True)
class EagerBackend:
    """Runs the module as it is: in the caller's grad mode, on any device, for any shapes."""

    @property
    def name(self) -> str:
        return "eager"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        del example_inputs  # nothing to specialise
        return module

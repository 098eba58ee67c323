"""Eager PyTorch: the module itself. Supports every op, so a cover of any graph always exists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from torch_collage.backends.base import BackendSpec
from torch_collage.rewrite import run_marked_in_place

__all__ = ["SPEC", "EagerBackend"]


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


def _compile_partition(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    del example_inputs
    return run_marked_in_place(gm)  # cache updates in place: [Note: rewrites before placing]


# Every node, mutating ones included: a cover of any graph always exists.
SPEC = BackendSpec(
    name="eager",
    compile=_compile_partition,
    supports=lambda node: True,
    fusion="region",
    version=lambda: f"torch {torch.__version__}",
    mutating_ok=True,
    runner=EagerBackend,
    threads="torch",
)

"""The workloads of bench_graphpipe.py: synthetic branchy and chain models, the zoo's multi-branch
models, and the sleeping stand-in that emulates one device per stage on a 2-core machine."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_zoo import get_model

__all__ = ["Sleepy", "Workload", "workloads"]

# -- workloads -----------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class TwoBranch(nn.Module):
    """Two branches of 4 blocks each, summed: DESIGN's worked example."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(*(Block() for _ in range(4)))
        self.b = nn.Sequential(*(Block() for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    stages: int
    build: Callable[[str], nn.Module]  # size ("tiny" / "full") -> model in train mode
    batch: Callable[[str, int], tuple[tuple[Any, ...], Any]]  # (size, batch) -> (inputs, target)
    loss_fn: Callable[[Any, Any], torch.Tensor]
    profiled: bool  # costs profiled on the full-size model; else one unit (fwd 1, bwd 2) per Linear
    groups: tuple[tuple[str, ...], ...] | None = None  # an explicit partition to run beside the planner's


def _synthetic(name: str, cls: type[nn.Module], stages: int, groups: Any = None) -> Workload:
    def batch(size: str, n: int) -> tuple[tuple[Any, ...], Any]:
        g = torch.Generator().manual_seed(n)
        return (torch.randn(n, 16, generator=g),), torch.randn(n, 16, generator=g)

    return Workload(
        name, stages, lambda size: cls().train(), batch, F.mse_loss, profiled=False, groups=groups
    )


def _zoo(name: str, stages: int) -> Workload:

    zoo = get_model(name)

    def batch(size: str, n: int) -> tuple[tuple[Any, ...], Any]:
        return zoo.example_inputs(size, n, seed=n), zoo.example_target(size, n, seed=n)

    return Workload(name, stages, lambda size: zoo.build(size).train(), batch, zoo.loss_fn, profiled=True)


def workloads() -> dict[str, Workload]:
    return {
        "two_branch": _synthetic(
            "two_branch", TwoBranch, 8, tuple((f"{b}.{i}",) for b in "ab" for i in range(4))
        ),
        "chain": _synthetic("chain", Chain, 4),
        "mmt": _zoo("mmt", 8),
        "dlrm": _zoo("dlrm", 8),
        "candle_uno": _zoo("candle_uno", 8),
    }


# -- emulated stage compute ----------------------------------------------------------------------


class _SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, seconds: float, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.seconds = seconds
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        time.sleep(ctx.seconds)
        return (None, *grads)


class Sleepy(nn.Module):
    """A stage that sleeps for its emulated cost; see the module docstring.

    [Note: weight-gradient share]
    With ``weight_share`` > 0 that share of the backward sleep happens in a hook on one of the stage's
    parameters, which runs when that parameter's gradient is computed: in the weight-gradient pass
    (``W``) of a schedule that splits the backward into input and weight gradients, in the one
    backward of the others. The rest sleeps on the outputs' gradient path (``I``). The zero-bubble
    papers assume ``I`` and ``W`` cost about the same (``weight_share=0.5``). (A sleeping branch from
    the parameter into the outputs would do the same, but torch 2.13's ``W`` then fails with "Trying to
    backward through the graph a second time": a weight reaching the outputs twice.)"""

    def __init__(self, inner: nn.Module, fwd_ms: float, bwd_ms: float, weight_share: float = 0.0) -> None:
        super().__init__()
        self.inner, self.fwd_s, self.bwd_s = inner, fwd_ms / 1e3, bwd_ms / 1e3
        weight = next((p for p in inner.parameters() if p.requires_grad), None)
        self.weight_share = weight_share if weight is not None else 0.0
        self._weight_sleep_s = 0.0  # set by each forward (calibrated like the rest)
        if weight is not None and self.weight_share > 0:  # see [Note: weight-gradient share]
            weight.register_hook(self._sleep_in_weight_gradient)

    def _sleep_in_weight_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(self._weight_sleep_s)
        return grad

    def forward(self, *args: Any) -> Any:
        start = time.perf_counter()
        out = self.inner(*args)
        real = time.perf_counter() - start
        time.sleep(max(0.0, self.fwd_s - real))
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        if idx and torch.is_grad_enabled():
            bwd = max(0.0, self.bwd_s - 2 * real)
            self._weight_sleep_s = bwd * self.weight_share
            wrapped = _SleepBackward.apply(bwd * (1 - self.weight_share), *(leaves[i] for i in idx))
            for i, w in zip(idx, wrapped):
                leaves[i] = w
        return torch.utils._pytree.tree_unflatten(leaves, spec)


# -- planning (parent process) -------------------------------------------------------------------

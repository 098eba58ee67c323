"""The workloads of bench_graphpipe.py: synthetic branchy and chain models, the zoo's multi-branch
models, and the emulated device each stage runs on (see [Note: emulated device time])."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import progress
from torch_zoo import get_model

__all__ = ["REAL_WORK_RATIO", "EmulatedDevice", "Workload", "real_work_ms", "stage_ms", "workloads"]

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
    stage_ms: float = 0.0  # least mean stage time per micro-batch (see [Note: emulated time and real work])


def _synthetic(name: str, cls: type[nn.Module], stages: int, groups: Any = None) -> Workload:
    def batch(size: str, n: int) -> tuple[tuple[Any, ...], Any]:
        g = torch.Generator().manual_seed(n)
        return (torch.randn(n, 16, generator=g),), torch.randn(n, 16, generator=g)

    return Workload(
        name, stages, lambda size: cls().train(), batch, F.mse_loss, profiled=False, groups=groups
    )


def _zoo(name: str, stages: int, stage_ms: float = 0.0) -> Workload:

    zoo = get_model(name)

    def batch(size: str, n: int) -> tuple[tuple[Any, ...], Any]:
        return zoo.example_inputs(size, n, seed=n), zoo.example_target(size, n, seed=n)

    return Workload(
        name,
        stages,
        lambda size: zoo.build(size).train(),
        batch,
        zoo.loss_fn,
        profiled=True,
        stage_ms=stage_ms,
    )


def workloads() -> dict[str, Workload]:
    return {
        "two_branch": _synthetic(
            "two_branch", TwoBranch, 8, tuple((f"{b}.{i}",) for b in "ab" for i in range(4))
        ),
        "chain": _synthetic("chain", Chain, 4),
        "mmt": _zoo("mmt", 8, stage_ms=60.0),  # its tiny model's real work: 13-18 ms per micro-batch
        "dlrm": _zoo("dlrm", 8),
        "candle_uno": _zoo("candle_uno", 8),
    }


# -- emulated stage compute ----------------------------------------------------------------------


class EmulatedDevice:
    """Each compute action of a stage takes its planned cost, as on a device of its own.

    [Note: emulated device time]
    A stage is a process running the tiny model on a 2-core CPU shared by up to 16 stages; it stands for
    a device that runs the full-size model's operators in their planned cost. ``action(kind)`` is the
    context an action runs in: the stage's real work (the tiny model's computation, autograd, packing
    its messages) happens inside, and the context then sleeps until the action's cost has passed since
    it began. An action therefore takes its cost (or its real time, if that is longer) however many
    other stages compute at the same moment, so a schedule that keeps more stages busy at once is not
    slowed by their contention for the two cores, which separate devices would not have; and no
    estimate of the real work (a backward as twice its forward, say) is needed. The messages and the runtime's work
    between actions stay real time, outside every action. ``costs`` maps an action kind (``F``, ``FL``,
    ``B``, ``BL``, ``I``, ``W``) to milliseconds: GraphPipe's from :meth:`Plan.action_costs`, torch's
    schedules' from the same stage costs (``B`` a whole backward, ``I`` and ``W`` its two parts)."""

    def __init__(self, costs: dict[str, float]) -> None:
        bad = {k: v for k, v in costs.items() if not v >= 0}
        if bad:
            raise ValueError(f"costs must be >= 0 ms, got {bad}")
        self.costs = {k: v / 1e3 for k, v in costs.items()}

    @contextlib.contextmanager
    def action(self, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        left = start + self.costs[kind] - time.perf_counter()
        if left > 0:
            time.sleep(left)


# -- emulated stage time ------------------------------------------------------------------------

REAL_WORK_RATIO = 4.0  # a stage's emulated time per micro-batch should be >= this x the real fwd+bwd


def real_work_ms(wl: Workload, microbatch: int, repeats: int = 7) -> float:
    """The tiny model's real forward + backward time per micro-batch (ms; one thread, fastest run).

    [Note: emulated time and real work]
    The stages' real work (the tiny model, autograd, the runtime) shares the machine's cores while
    the emulated devices would each have their own. Where all stages together keep the cores busy,
    actions queue for a core and outlast their cost, the more so the more stages a schedule keeps busy
    at once, and measured steps drift from the simulation. So a workload's mean stage time per
    micro-batch should be at least ``REAL_WORK_RATIO`` x the tiny model's real forward + backward
    time. That is a fixed property of the workload (``Workload.stage_ms``: 60 ms for MMT, whose tiny
    model takes 13-18 ms; ``--target-ms`` for the others), not a measurement of the run, so that every
    run emulates the same devices: the measured real time drifted from 13.6 to 27 ms between runs.
    The real time is measured and reported beside it, with a warning where it is too large, and the
    table's "CPU busy" column says how busy the cores were during each runtime's steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = wl.build("tiny")
        inputs, target = wl.batch("tiny", microbatch)
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            wl.loss_fn(model(*inputs), target).backward()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
        return min(times)
    finally:
        torch.set_num_threads(threads)


def stage_ms(wl: Workload, args: argparse.Namespace) -> tuple[float, float]:
    """(mean emulated stage time per micro-batch, the tiny model's real work) in ms; see the Note."""
    real = real_work_ms(wl, 2)  # the run's micro-batch: a batch of 2 x M samples in M micro-batches
    stage = max(args.target_ms, wl.stage_ms)
    if REAL_WORK_RATIO * real > stage:
        progress(
            f"WARNING: {wl.name}'s tiny model takes {real:.1f} ms of real work per micro-batch, more than "
            f"1/{REAL_WORK_RATIO:g} of its {stage:.1f} ms stage time: measured steps may drift from the simulation"
        )
    return stage, real

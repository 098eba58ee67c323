"""torch 2.13's chain schedules in bench_graphpipe.py's harness: runners, checks and predicted memory.

Every schedule of ``benchmarks.graphpipe_baseline.TORCH_SCHEDULES`` runs the chain split of the
workload (``virtual stages per rank x ranks`` stages, planned by ``plan_graph(stage_graph="chain")``)
with the same emulated devices as GraphPipe (each compute action takes its stage's cost, see
[Note: emulated device time]; a split backward's ``I`` and ``W`` take the stage's input- and
weight-gradient costs), the same batch, micro-batch size and count. A schedule that cannot run (torch refuses the configuration, or a step
fails) or whose step leaves a parameter without a gradient is a row saying why.

[Note: predicted memory]
Per device: the parameters of its stages times ``param_copies`` (weights, gradients, optimizer
state) plus, at the worst moment of the step, the activations of the micro-batches its stages hold
(forwarded, weight gradient not yet computed), each stage's ``act_bytes`` per micro-batch. For
torch's schedules the moments come from the schedule's own action lists (``pipeline_order``); for
GraphPipe from the simulated step's peak in-flight counts (each stage's peak, summed per device, an
upper bound). The per-device budget of the comparison is Schedule1F1B's (the default chain schedule,
all at the same micro-batch size); a schedule needing more is marked and not counted as the best.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.graphpipe_baseline import TORCH_SCHEDULES, ChainBaseline
from benchmarks.graphpipe_workloads import EmulatedDevice
from torch_graphpipe import Plan

__all__ = ["LABELS", "WEIGHT_SHARE", "TorchRun", "build_runners", "gp_memory", "peak_held", "torch_memory"]

WEIGHT_SHARE = 0.5  # the synthetic models' share of a backward in its weight gradients (as ZB papers assume)
LABELS = {
    name: f"{name} (chain{'' if v == 1 else f', {v} stages/rank'})"
    for name, (v, _) in TORCH_SCHEDULES.items()
}

TorchRun = dict[str, Any]  # {"schedule", "per_rank", "error", "order"}: what rank 0 reports per schedule


def build_runners(
    model: torch.nn.Module,
    inputs: Sequence[Any],
    target: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    chains: dict[int, Plan],
) -> tuple[dict[str, Callable[[], Any]], dict[str, TorchRun]]:
    """A step function per schedule that runs, and what every schedule did (on every rank alike)."""
    runners: dict[str, Callable[[], Any]] = {}
    runs: dict[str, TorchRun] = {}
    for name, (per_rank, _) in TORCH_SCHEDULES.items():
        label, plan = LABELS[name], chains[per_rank]
        error, base, devices = None, None, _devices(plan)
        try:
            base = ChainBaseline(
                copy.deepcopy(model), example_inputs=inputs, loss_fn=loss_fn, plan=plan, schedule=name,
                around_action=lambda s, kind, d=devices: d[s].action(kind),
            )  # fmt: skip
        except Exception as exc:  # torch refuses this configuration (the same on every rank)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        error = _agree(error)
        if base is not None and error is None:
            error = _agree(_check_step(base, inputs, target))
        runs[label] = {"schedule": name, "per_rank": per_rank, "error": error, "order": None}
        if base is not None and error is None:
            runs[label]["order"] = base.compute_order()
            runners[label] = lambda b=base: b.step(*inputs, target=target if b.is_last else None)
    return runners, runs


def _devices(plan: Plan) -> list[EmulatedDevice]:
    """Per stage of a chain plan, its emulated device (``B`` whole, ``I`` + ``W`` split)."""
    out = []
    for stage in plan.stages:
        c = stage.cost
        out.append(EmulatedDevice({"F": c.fwd_ms, "B": c.bwd_ms, "I": c.bwd_ms - c.wgt_ms, "W": c.wgt_ms}))
    return out


def _check_step(base: ChainBaseline, inputs: Sequence[Any], target: Any) -> str | None:
    """Run one step: the error, or the parameters it left without a gradient (then clear them)."""
    try:
        base.step(*inputs, target=target if base.is_last else None)
    except Exception as exc:
        return (
            f"step failed: {type(exc).__name__}: {exc}".splitlines()[0]
            + f" ({traceback.format_exc(limit=1)!r})"
        )
    missing = [
        n for m in base.stage_modules for n, p in m.named_parameters() if p.requires_grad and p.grad is None
    ]
    for m in base.stage_modules:
        m.zero_grad(set_to_none=True)
    return f"no gradient for {missing[:3]} after a step" if missing else None


def _agree(error: str | None) -> str | None:
    """The first rank's error, on every rank (so every rank skips the same schedules)."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)


def torch_memory(
    order: dict[int, list[tuple[int, str, int]]], plan: Plan, param_copies: float
) -> list[float]:
    """Predicted peak bytes per rank of a torch schedule's action lists; see [Note: predicted memory]."""
    out = []
    for rank in sorted(order):
        stages = {s for s, _, _ in order[rank]}
        params = sum(plan.stages[s].cost.param_bytes for s in stages) * param_copies
        held = dict.fromkeys(stages, 0)
        peak = 0.0
        for s, kind, _ in order[rank]:
            held[s] += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
            peak = max(peak, sum(held[t] * plan.stages[t].cost.act_bytes for t in held))
        out.append(params + peak)
    return out


def gp_memory(plan: Plan, peak_in_flight: Sequence[int], param_copies: float) -> list[float]:
    """Predicted peak bytes per rank of a GraphPipe plan (one stage per rank)."""
    return [s.cost.memory_bytes(k, param_copies) for s, k in zip(plan.stages, peak_in_flight)]


def peak_held(order: dict[int, list[tuple[int, str, int]]]) -> list[int]:
    """Per rank, the most micro-batches its stages hold together."""
    out = []
    for rank in sorted(order):
        held = peak = 0
        for _, kind, _ in order[rank]:
            held += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
            peak = max(peak, held)
        out.append(peak)
    return out

"""Setting up a pipeline on every rank: checks, one plan for all ranks, this rank's stage.

[Note: one plan on every rank]
Every rank traces the model (deterministic) and checks the arguments before any communication, so a
bad argument fails on every rank alike. Profiling is not deterministic, so rank 0 alone plans and
broadcasts the plan (or its error) with ``broadcast_object_list``; every rank then routes the values,
builds every stage module (cheap: they share the model's parameters) to check that no trainable
parameter is used by two stages, and keeps only its own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.fx as fx

from torch_graphpipe.graph_capture import CapturedGraph, CaptureMethod, capture
from torch_graphpipe.groups import stages_from_module_groups
from torch_graphpipe.microbatch import split_batch
from torch_graphpipe.planner import Plan, ScheduleKind, plan, plan_stages
from torch_graphpipe.profile import CostTable, profile_graph
from torch_graphpipe.routing import Routing, route, with_routing
from torch_graphpipe.shape_oracle import ShapeOracle
from torch_graphpipe.stage_module import (
    build_stage_module,
    check_shared_parameters,
    match_persistence,
    unowned_state,
)
from torch_graphpipe.train_mode import train_mode_differences
from torch_graphpipe.validate import validate_schedule

__all__ = ["PartitionArg", "PipelineSetup", "PlanOptions", "setup_pipeline"]

log = logging.getLogger(__name__)

# what ``GraphPipe(partition=...)`` accepts: the planner, module-name lists per stage, or a plan
PartitionArg = Literal["auto"] | Sequence[Sequence[str]] | Plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """How ``partition="auto"`` plans (see :func:`torch_graphpipe.plan`)."""

    stage_graph: Literal["dag", "chain"] = "dag"  # DAG of stages, or the best chain for comparison
    leaf_modules: tuple[type, ...] = ()  # extra module types traced as one operator
    costs: CostTable | None = None  # fixed operator costs instead of profiling on rank 0
    memory_budget_bytes: float | None = None  # per-stage memory bound for the partitioner
    capture_method: CaptureMethod = "auto"  # symbolic tracing, torch.export, or tracing then export
    schedule_kind: ScheduleKind = "1f1b"  # DAG 1F1B, or zero-bubble (backwards split into B and W)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineSetup:
    """What a rank keeps."""

    plan: Plan  # the plan as executed (routed edges, validated schedule)
    routing: Routing  # values on every stage edge
    stage: fx.GraphModule  # this rank's stage
    oracle: ShapeOracle  # shapes of every value (meta device)
    unowned: dict[str, torch.Tensor]  # state no stage uses (rank 0 keeps it for checkpoints)
    state_keys: tuple[str, ...]  # the full model's state_dict keys, in order
    capture_method: Literal["fx", "export"]  # how the model's graph was captured


def setup_pipeline(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    num_microbatches: int | Literal["auto"],
    partition: PartitionArg,
    group: dist.ProcessGroup,
    options: PlanOptions,
    agree_group: dist.ProcessGroup | None = None,
) -> PipelineSetup:
    """Plan once for all ranks and build this rank's stage; see [Note: one plan on every rank].

    ``group`` is this pipeline (group rank = stage); ``agree_group`` (default ``group``) holds every
    rank that must run the same plan (all replicas, see [Note: data parallel stages]).
    ``num_microbatches="auto"`` (with ``partition="auto"``) plans first, choosing the count with the
    partition (see [Note: memory-aware micro-batching]); the plan's count is then used."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    planned: Plan | None = None
    if num_microbatches == "auto":
        if isinstance(partition, Plan):
            num_microbatches = partition.num_microbatches
        elif partition != "auto":
            raise ValueError(
                "num_microbatches='auto' chooses the micro-batches with the partition: use "
                "partition='auto', or pass an int with an explicit partition"
            )
        else:
            planned = _agree(agree_group or group, lambda: _auto_plan(module, example_inputs, world, options))
            num_microbatches = planned.num_microbatches
    micro = split_batch(tuple(example_inputs), num_microbatches, "example_inputs")
    captured = capture(module, options.leaf_modules, micro[0], options.capture_method)
    masks = _check_partition(partition, captured, world, num_microbatches, options)
    differences = train_mode_differences(module, captured.graph_module)
    if differences and rank == 0:  # see [Note: train-mode differences]
        log.warning(
            "GraphPipe training will not match single-process training of %s in train mode: %s "
            "(see [Note: train-mode differences] in torch_graphpipe/train_mode.py)",
            type(module).__name__, "; ".join(differences),
        )  # fmt: skip
    if isinstance(partition, Plan):
        the_plan = partition
    elif planned is not None:
        the_plan = planned
    else:
        the_plan = _agree(agree_group or group, lambda: _make_plan(module, captured, example_inputs, micro[0], masks, world,
                                                    num_microbatches, options))  # fmt: skip
    routing = route(the_plan, captured.graph)
    oracle = ShapeOracle(captured.graph_module)
    oracle.train(module.training)
    specs = oracle.specs(micro[0])
    edge_bytes = {
        (a, b): sum(t.nbytes for v in dict(routing.stages[a].send)[b] for t in specs.values[v].tensors)
        for a, b in routing.edges
    }
    executed = with_routing(the_plan, routing, edge_bytes)
    validate_schedule(executed.schedule)
    stages = [build_stage_module(captured.graph_module, r) for r in routing.stages]
    check_shared_parameters(stages)
    state_keys = tuple(module.state_dict().keys())
    for stage in stages:
        match_persistence(stage, set(state_keys))
    return PipelineSetup(
        plan=executed,
        routing=routing,
        stage=stages[rank],
        oracle=oracle,
        unowned=unowned_state(module, stages) if rank == 0 else {},
        state_keys=state_keys,
        capture_method=captured.method,
    )


def _check_partition(
    partition: PartitionArg, captured: CapturedGraph, world: int, num_microbatches: int, options: PlanOptions
) -> list[int] | None:
    """Checks that need no communication; the stages of an explicit partition."""
    n_ops = len(captured.graph)
    if isinstance(partition, Plan):
        if partition.num_stages != world:
            raise ValueError(
                f"the plan has {partition.num_stages} stages but the process group has {world} ranks"
            )
        if partition.num_microbatches != num_microbatches:
            raise ValueError(
                f"the plan is for {partition.num_microbatches} micro-batches, not num_microbatches={num_microbatches}"
            )
        return None
    if isinstance(partition, str):
        if partition != "auto":
            raise ValueError(
                f"partition must be 'auto', a list of module-name lists or a Plan, got {partition!r}"
            )
        if world > n_ops:
            raise ValueError(f"{world} ranks (stages) but the model has only {n_ops} operators to place")
        return None
    if options.stage_graph != "dag":
        raise ValueError(
            "an explicit partition makes a DAG of stages; stage_graph='chain' needs partition='auto'"
        )
    if len(partition) != world:
        raise ValueError(f"partition has {len(partition)} stages but the process group has {world} ranks")
    return stages_from_module_groups(captured.graph, partition)


def _make_plan(
    module: torch.nn.Module,
    captured: CapturedGraph,
    example_inputs: Sequence[Any],
    microbatch: Sequence[Any],
    masks: list[int] | None,
    world: int,
    num_microbatches: int,
    options: PlanOptions,
) -> Plan:
    if masks is None:
        return plan(
            module,
            tuple(example_inputs),
            world,
            num_microbatches,
            options.stage_graph,
            memory_budget_bytes=options.memory_budget_bytes,
            costs=options.costs,
            leaf_modules=options.leaf_modules,
            capture_method=captured.method,
            schedule_kind=options.schedule_kind,
        )
    costs = options.costs
    if costs is None:
        size = next((x.shape[0] for x in microbatch if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
        costs = profile_graph(captured.graph_module, captured.graph, microbatch, microbatch_size=size)
    return plan_stages(captured.graph, costs, masks, num_microbatches, schedule_kind=options.schedule_kind)


def _auto_plan(
    module: torch.nn.Module, example_inputs: Sequence[Any], world: int, options: PlanOptions
) -> Plan:
    return plan(
        module,
        tuple(example_inputs),
        world,
        "auto",
        options.stage_graph,
        memory_budget_bytes=options.memory_budget_bytes,
        costs=options.costs,
        leaf_modules=options.leaf_modules,
        capture_method=options.capture_method,
        schedule_kind=options.schedule_kind,
    )


def _agree(group: dist.ProcessGroup, make: Any) -> Plan:
    """Rank 0 runs ``make`` and broadcasts the plan or the reason it failed."""
    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank(group) == 0:
        try:
            payload = [make()]
        except Exception as exc:
            error = exc
            payload = [f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(payload, group=group, group_src=0, device=_object_device(group))
    if error is not None:
        raise error
    if isinstance(payload[0], str):
        raise ValueError(f"planning failed on rank 0: {payload[0]}")
    log.info("%s", payload[0])
    return payload[0]


def _object_device(group: dist.ProcessGroup) -> torch.device | None:
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None

"""The planner: ``plan`` (exported as ``torch_graphpipe.plan``) captures, profiles, partitions and
schedules a model in one process; :class:`Plan` is its result.

Planning works on the cost table's robust statistics (see [Note: plans that reproduce] in
torch_graphpipe/stable.py); the partition choice is in torch_graphpipe/plan_search.py, the plan's
assembly (stage graph, schedule, costs) in torch_graphpipe/assemble.py, the types in
torch_graphpipe/plan_types.py."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from torch_graphpipe.assemble import assemble
from torch_graphpipe.graph import OpGraph
from torch_graphpipe.graph_capture import CaptureMethod, capture
from torch_graphpipe.plan_search import chain_stages, dag_stages, no_fit_message
from torch_graphpipe.plan_types import Plan, ScheduleKind, StageGraphKind, StagePlan
from torch_graphpipe.profile import CommModel, CostTable, profile_graph
from torch_graphpipe.scaling import costs_at, microbatch_candidates
from torch_graphpipe.stable import first_within, plan_noise, planning_costs, planning_margin
from torch_graphpipe.stage_cost import StageCostModel

__all__ = [
    "Plan",
    "ScheduleKind",
    "StageGraphKind",
    "StagePlan",
    "choose_microbatches",
    "plan",
    "plan_graph",
    "plan_stages",
    "split_microbatches",
]

log = logging.getLogger(__name__)


def split_microbatches(example_inputs: Sequence[Any], num_microbatches: int) -> list[tuple[Any, ...]]:
    """Split every tensor input along dim 0 into ``num_microbatches`` equal chunks."""
    _check_positive("num_microbatches", num_microbatches)
    chunks: list[list[Any]] = [[] for _ in range(num_microbatches)]
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            if x.shape[0] % num_microbatches:
                raise ValueError(
                    f"input {i} has batch size {x.shape[0]}, not divisible by num_microbatches={num_microbatches}"
                )
            parts: Sequence[Any] = x.chunk(num_microbatches, dim=0)
        else:
            parts = [x] * num_microbatches
        for chunk, part in zip(chunks, parts):
            chunk.append(part)
    return [tuple(c) for c in chunks]


def plan(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    num_stages: int,
    num_microbatches: int | Literal["auto"],
    stage_graph: StageGraphKind = "dag",
    *,
    memory_budget_bytes: float | None = None,
    comm: CommModel | None = None,
    costs: CostTable | None = None,
    leaf_modules: Sequence[type] = (),
    repeats: int = 7,
    capture_method: CaptureMethod = "auto",
    schedule_kind: ScheduleKind = "1f1b",
) -> Plan:
    """Trace, profile on one micro-batch of ``example_inputs`` (the whole batch), partition, schedule.

    ``costs`` skips profiling (a fixed table, e.g. for tests); ``memory_budget_bytes`` bounds each
    stage's parameters (times ``CostTable.param_copies``) plus its in-flight activations.
    ``capture_method`` picks symbolic tracing or ``torch.export`` (see :func:`torch_graphpipe.capture`);
    ``schedule_kind="zero_bubble"`` splits backwards into input and weight gradients (see [Note:
    zero-bubble DAG schedule]). ``num_microbatches="auto"`` chooses the micro-batch count and size with
    the partition (see [Note: memory-aware micro-batching]).
    """
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    auto = num_microbatches == "auto"
    _check_args(num_stages, 1 if auto else num_microbatches, stage_graph, schedule_kind)
    counts: list[int] = (
        microbatch_candidates(_batch_size(example_inputs), num_stages) if auto else [int(num_microbatches)]
    )
    micro = {m: split_microbatches(example_inputs, m)[0] for m in (counts[0], counts[-1])}
    captured = capture(module, leaf_modules, micro[counts[-1]], capture_method)
    if costs is None:
        low, high = (
            profile_graph(
                captured.graph_module, captured.graph, micro[m], repeats=repeats, comm=comm,
                microbatch_size=_batch_size(micro[m]),
            )
            for m in (counts[-1], counts[0])
        )  # fmt: skip
    else:
        low = high = costs if comm is None else dataclasses.replace(costs, comm=comm)
    options: dict[str, Any] = {"memory_budget_bytes": memory_budget_bytes, "schedule_kind": schedule_kind}
    if not auto:
        return plan_graph(captured.graph, low, num_stages, counts[0], stage_graph, **options)
    return choose_microbatches(
        captured.graph, low, high, num_stages, _batch_size(example_inputs), stage_graph, **options
    )


def choose_microbatches(
    graph: OpGraph,
    low: CostTable,
    high: CostTable,
    num_stages: int,
    batch: int,
    stage_graph: StageGraphKind = "dag",
    *,
    memory_budget_bytes: float | None = None,
    schedule_kind: ScheduleKind = "1f1b",
) -> Plan:
    """The fastest plan over the micro-batch counts dividing ``batch`` that fits, with operator costs
    profiled at two micro-batch sizes (``low``, ``high``); see [Note: memory-aware micro-batching]."""
    plans: list[Plan] = []
    error: ValueError | None = None
    for m in microbatch_candidates(batch, num_stages):
        costs = costs_at(low, high, batch // m)
        try:
            plans.append(
                plan_graph(
                    graph,
                    costs,
                    num_stages,
                    m,
                    stage_graph,
                    memory_budget_bytes=memory_budget_bytes,
                    schedule_kind=schedule_kind,
                )
            )
        except ValueError as exc:  # does not fit the memory budget
            error = exc
    if not plans:
        assert error is not None
        raise error
    times = [p.simulate().iteration_time for p in plans]
    noise = max(low.tolerance, plan_noise(max(p.margin for p in plans)))  # [Note: plan noise]
    best = plans[first_within(times, noise)]  # the fewest, largest micro-batches within the noise
    log.info(
        "micro-batches: %s",
        ", ".join(f"{p.num_microbatches} x {p.microbatch_size}: {t:.4g} ms" for p, t in zip(plans, times)),
    )
    return best


def _batch_size(inputs: Sequence[Any]) -> int:
    return next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)


def plan_graph(
    graph: OpGraph,
    costs: CostTable,
    num_stages: int,
    num_microbatches: int,
    stage_graph: StageGraphKind = "dag",
    *,
    memory_budget_bytes: float | None = None,
    schedule_kind: ScheduleKind = "1f1b",
) -> Plan:
    """Partition and schedule an already captured graph with the given costs (their robust statistics,
    see [Note: plans that reproduce] in torch_graphpipe/stable.py)."""
    _check_args(num_stages, num_microbatches, stage_graph, schedule_kind)
    if num_stages > len(graph):
        raise ValueError(f"num_stages={num_stages} is more than the graph's {len(graph)} operators")
    start = time.perf_counter()
    costs = planning_costs(costs)
    margin = planning_margin(costs, num_stages)
    model = StageCostModel(graph, costs)
    chain = stage_graph == "chain"
    try:
        if chain:
            stages = chain_stages(
                graph, model, costs, num_stages, num_microbatches, memory_budget_bytes, schedule_kind, margin
            )
        else:
            stages = dag_stages(
                graph, model, costs, num_stages, num_microbatches, memory_budget_bytes, schedule_kind, margin
            )
    except ValueError as exc:
        if memory_budget_bytes is None:
            raise
        raise ValueError(
            no_fit_message(graph, model, num_stages, num_microbatches, memory_budget_bytes)
        ) from exc
    return assemble(
        graph,
        costs,
        model,
        stages,
        num_microbatches,
        stage_graph,
        start,
        schedule_kind,
        memory_budget_bytes,
        margin,
    )


def plan_stages(
    graph: OpGraph,
    costs: CostTable,
    stages: Sequence[int],
    num_microbatches: int,
    *,
    schedule_kind: ScheduleKind = "1f1b",
) -> Plan:
    """A DAG plan with the given stages (node bitsets, convex, covering every node once)."""
    _check_args(len(stages), num_microbatches, "dag", schedule_kind)
    start = time.perf_counter()
    costs = planning_costs(costs)
    margin = planning_margin(costs, len(stages))
    model = StageCostModel(graph, costs)
    return assemble(graph, costs, model, stages, num_microbatches, "dag", start, schedule_kind, margin=margin)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_args(
    num_stages: Any, num_microbatches: Any, stage_graph: Any, schedule_kind: Any = "1f1b"
) -> None:
    _check_positive("num_stages", num_stages)
    _check_positive("num_microbatches", num_microbatches)
    if stage_graph not in ("dag", "chain"):
        raise ValueError(f"stage_graph must be 'dag' or 'chain', got {stage_graph!r}")
    if schedule_kind not in ("1f1b", "zero_bubble"):
        raise ValueError(f"schedule_kind must be '1f1b' or 'zero_bubble', got {schedule_kind!r}")

"""The planner: ``plan`` (exported as ``torch_graphpipe.plan``) captures, profiles, partitions and
schedules a model in one process; :class:`Plan` is its result."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from torch_graphpipe.chain import partition_chain
from torch_graphpipe.graph import OpGraph, mask_of, members
from torch_graphpipe.graph_capture import CaptureMethod, capture
from torch_graphpipe.partition import partition_dag
from torch_graphpipe.profile import CommModel, CostTable, profile_graph
from torch_graphpipe.scaling import costs_at, microbatch_candidates
from torch_graphpipe.schedule import Schedule, build_1f1b
from torch_graphpipe.simulator import SimulationResult, simulate
from torch_graphpipe.sp import decompose
from torch_graphpipe.stage_cost import StageCost, StageCostModel
from torch_graphpipe.stage_graph import LateSplit, StageGraph, build_stage_graph, late_splits
from torch_graphpipe.zero_bubble import build_zero_bubble

__all__ = [
    "Plan",
    "ScheduleKind",
    "StagePlan",
    "choose_microbatches",
    "plan",
    "plan_graph",
    "plan_stages",
    "split_microbatches",
]

log = logging.getLogger(__name__)

StageGraphKind = Literal["dag", "chain"]
ScheduleKind = Literal["1f1b", "zero_bubble"]  # see [Note: DAG 1F1B], [Note: zero-bubble DAG schedule]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One stage of a plan."""

    index: int  # position in the topological order of the stage DAG (the rank that runs it)
    node_names: tuple[str, ...]  # operators, topological order
    module_names: tuple[str, ...]  # qualified names of the leaf modules it calls
    cost: StageCost  # per micro-batch
    in_flight: int  # micro-batches it holds at most (stages on its longest path to a sink)
    late_pred: int | None = None  # the predecessor it is split at (see [Note: late inputs]), if any
    late_node_names: tuple[str, ...] = ()  # its operators that depend on the late predecessor's values
    late_cost: StageCost | None = None  # their cost (a share of ``cost``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A stage graph, its costs and its schedule."""

    stages: tuple[StagePlan, ...]  # in topological order
    edges: tuple[tuple[int, int], ...]  # stage DAG edges (producer, consumer)
    edge_bytes: tuple[int, ...]  # bytes per micro-batch on each edge
    stage_graph: StageGraphKind  # "dag" or "chain"
    num_microbatches: int  # micro-batches per step
    microbatch_size: int  # samples per micro-batch
    comm: CommModel  # communication model used for planning and simulation
    schedule: Schedule  # DAG 1F1B or zero-bubble schedule
    bottleneck_ms: float  # slowest stage's time per micro-batch (compute + communication)
    planning_time_s: float  # wall time of partitioning and scheduling
    peak_bytes: tuple[float, ...] = ()  # per stage, predicted peak memory (see [Note: held activations])
    memory_budget_bytes: float | None = None  # the per-device budget it was planned for

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def time_per_sample_ms(self) -> float:
        return self.bottleneck_ms / self.microbatch_size

    def simulate(self) -> SimulationResult:
        """Discrete-event simulation of one step with the plan's costs (milliseconds)."""
        delay = {e: self.comm.time_ms(b) for e, b in zip(self.edges, self.edge_bytes)}
        fwd = [s.cost.fwd_ms for s in self.stages]
        bwd = [s.cost.bwd_ms for s in self.stages]
        return simulate(self.schedule, fwd, bwd, delay, self.late_cost(), wgt=self.wgt_cost())

    @property
    def schedule_kind(self) -> ScheduleKind:
        """``"zero_bubble"`` when the schedule splits backwards into ``B`` and ``W``, else ``"1f1b"``."""
        return "zero_bubble" if any(a.kind == "W" for p in self.schedule.programs for a in p) else "1f1b"

    def wgt_cost(self) -> list[float]:
        """Per stage, the weight-gradient share of its backward (the ``W`` actions of a zero-bubble schedule)."""
        return [s.cost.wgt_ms for s in self.stages]

    def late_cost(self, overrun_ms: float = 0.0) -> dict[int, tuple[float, float]]:
        """``{stage: (forward, backward) ms of its late part}`` for :func:`simulate` (plus ``overrun_ms``)."""
        return {
            s.index: (s.late_cost.fwd_ms + overrun_ms, s.late_cost.bwd_ms + overrun_ms)
            for s in self.stages
            if s.late_cost is not None
        }

    def __str__(self) -> str:
        lines = [
            f"Plan: {self.num_stages} stages ({self.stage_graph}, {self.schedule_kind} schedule), "
            f"{self.num_microbatches} micro-batches of {self.microbatch_size}, bottleneck {self.bottleneck_ms:.4g} ms/micro-batch",
            f"edges: {', '.join(f'{a}->{b}' for a, b in self.edges) or 'none'}",
        ]
        if self.memory_budget_bytes is not None:
            lines.append(f"memory budget {self.memory_budget_bytes / 1e6:.4g} MB per device")
        for s in self.stages:
            peak = f", peak {self.peak_bytes[s.index] / 1e6:.4g} MB" if self.peak_bytes else ""
            lines.append(
                f"  stage {s.index}: {len(s.node_names)} ops, {s.cost.time_ms:.4g} ms, "
                f"in-flight {s.in_flight}{peak}, modules {_short(s.module_names)}"
                + (f", late input from stage {s.late_pred}" if s.late_pred is not None else "")
            )
        return "\n".join(lines)


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
    repeats: int = 3,
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
    fastest = min(times)
    best = next(p for p, t in zip(plans, times) if t <= fastest * (1 + low.tolerance))  # fewest, largest
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
    """Partition and schedule an already captured graph with the given costs."""
    _check_args(num_stages, num_microbatches, stage_graph, schedule_kind)
    if num_stages > len(graph):
        raise ValueError(f"num_stages={num_stages} is more than the graph's {len(graph)} operators")
    start = time.perf_counter()
    model = StageCostModel(graph, costs)
    chain = stage_graph == "chain"
    try:
        if chain:
            stages = partition_chain(
                graph,
                model,
                num_stages,
                memory_budget_bytes=memory_budget_bytes,
                num_microbatches=num_microbatches,
            ).stages
        else:
            stages = _dag_stages(
                graph, model, costs, num_stages, num_microbatches, memory_budget_bytes, schedule_kind
            )
    except ValueError as exc:
        if memory_budget_bytes is None:
            raise
        raise ValueError(_no_fit(graph, model, num_stages, num_microbatches, memory_budget_bytes)) from exc
    return _assemble(
        graph, costs, model, stages, num_microbatches, stage_graph, start, schedule_kind, memory_budget_bytes
    )


def _no_fit(
    graph: OpGraph, model: StageCostModel, num_stages: int, num_microbatches: int, budget: float
) -> str:
    """Why no partition fits ``budget``: the operator too large alone, or the smallest stage of the
    partition planned without a budget that does not fit."""
    head = f"no partition into {num_stages} stages fits memory_budget_bytes={budget:.0f}"
    copies = model.param_copies
    need, v = max((model.of_mask(1 << v).memory_bytes(1, copies), v) for v in range(len(graph)))
    if need > budget:
        return (
            f"{head}: operator {graph.nodes[v].name} alone needs {need:.0f} bytes (parameters x {copies:g} "
            "and one micro-batch's activations)"
        )
    masks = partition_dag(decompose(graph), model, num_stages).stages
    sg = build_stage_graph(graph, model, masks)
    over = [
        (c.memory_bytes(min(f, num_microbatches), copies), s, min(f, num_microbatches))
        for s, (c, f) in enumerate(zip(sg.costs, sg.in_flight))
        if c.memory_bytes(min(f, num_microbatches), copies) > budget
    ]
    if not over:  # the search's in-flight counts were pessimistic; name the largest stage
        over = [max((c.memory_bytes(min(f, num_microbatches), copies), s, min(f, num_microbatches))
                    for s, (c, f) in enumerate(zip(sg.costs, sg.in_flight)))]  # fmt: skip
    need, s, held = min(over)
    names = [graph.nodes[v].name for v in members(sg.stages[s])]
    return (
        f"{head}: the smallest stage that does not fit, stage {s} ({_short(tuple(names))}), needs {need:.0f} "
        f"bytes with {held} micro-batches in flight; raise the budget, use more stages, or smaller "
        "micro-batches (num_microbatches='auto' chooses)"
    )


def _dag_stages(
    graph: OpGraph,
    model: StageCostModel,
    costs: CostTable,
    num_stages: int,
    num_microbatches: int,
    budget: float | None,
    schedule_kind: ScheduleKind,
) -> tuple[int, ...]:
    """[Note: DAG plan candidates] The DAG search's family of partitions misses some good ones (a stage
    holding the tail of one branch and the join, see [Note: partition search]), and the best chain
    split, laid out as a DAG (every value sent straight to its consumers), is also a DAG plan. Both
    are tried; the one whose schedule simulates faster wins (the DAG search's on a tie)."""
    found: list[tuple[str, tuple[int, ...]]] = []
    error: ValueError | None = None
    searches = (
        (
            "DAG search",
            lambda: partition_dag(
                decompose(graph),
                model,
                num_stages,
                memory_budget_bytes=budget,
                num_microbatches=num_microbatches,
            ),
        ),
        (
            "chain split",
            lambda: partition_chain(
                graph, model, num_stages, memory_budget_bytes=budget, num_microbatches=num_microbatches
            ),
        ),
    )
    for label, search in searches:
        try:
            masks = search().stages
            _check_memory(graph, model, masks, budget, num_microbatches)
            found.append((label, masks))
        except ValueError as exc:  # nothing of this family fits the memory budget
            error = error or exc
    if not found:
        assert error is not None
        raise error
    times = [_simulated_ms(graph, model, costs, masks, num_microbatches, schedule_kind) for _, masks in found]
    best = min(range(len(found)), key=lambda i: (times[i], i))
    log.info(
        "DAG plan from the %s (simulated step: %s)",
        found[best][0],
        ", ".join(f"{label} {t:.4g} ms" for (label, _), t in zip(found, times)),
    )
    return found[best][1]


def _check_memory(
    graph: OpGraph, model: StageCostModel, masks: Sequence[int], budget: float | None, num_microbatches: int
) -> None:
    """Raise ``ValueError`` when a stage of the full stage graph (output edges included, see [Note:
    output edges]) does not fit ``budget``."""
    if budget is None:
        return
    sg = build_stage_graph(graph, model, masks)
    for s, (cost, depth) in enumerate(zip(sg.costs, sg.in_flight)):
        in_flight = min(depth, num_microbatches)
        need = cost.memory_bytes(in_flight, model.param_copies)
        if need > budget:
            raise ValueError(
                f"stage {s} of the DAG search's partition needs {need:.0f} bytes with {in_flight} micro-batches "
                f"in flight (its output goes on to the loss stage), over memory_budget_bytes={budget}"
            )


def _simulated_ms(
    graph: OpGraph,
    model: StageCostModel,
    costs: CostTable,
    masks: Sequence[int],
    num_microbatches: int,
    schedule_kind: ScheduleKind,
) -> float:
    sg = build_stage_graph(graph, model, masks)
    splits, schedule = _schedule(graph, model, sg, num_microbatches, "dag", schedule_kind, costs)
    delay = {e: costs.comm.time_ms(b) for e, b in zip(sg.edges, sg.edge_bytes)}
    late = {s: (c.fwd_ms, c.bwd_ms) for s, c in ((s, model.of_mask(x.late_mask)) for s, x in splits.items())}
    fwd, bwd, wgt = ([getattr(c, f) for c in sg.costs] for f in ("fwd_ms", "bwd_ms", "wgt_ms"))
    return simulate(schedule, fwd, bwd, delay, late, wgt=wgt).iteration_time


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
    model = StageCostModel(graph, costs)
    return _assemble(graph, costs, model, stages, num_microbatches, "dag", start, schedule_kind)


def _assemble(
    graph: OpGraph,
    costs: CostTable,
    model: StageCostModel,
    masks: Sequence[int],
    num_microbatches: int,
    stage_graph: StageGraphKind,
    start: float,
    schedule_kind: ScheduleKind,
    budget: float | None = None,
) -> Plan:
    num_stages = len(masks)
    sg = build_stage_graph(graph, model, masks, chain=stage_graph == "chain")
    splits, schedule = _schedule(
        graph, model, sg, num_microbatches, stage_graph, schedule_kind, costs, budget
    )
    sg = dataclasses.replace(
        sg, costs=tuple(_with_boundary(model, sg, s, c, splits) for s, c in enumerate(sg.costs))
    )
    elapsed = time.perf_counter() - start
    peaks = simulate(schedule, [0.0] * num_stages, [0.0] * num_stages).peak_in_flight  # the schedule's
    log.info("planned %d operators into %d %s stages in %.3f s", len(graph), num_stages, stage_graph, elapsed)
    return Plan(
        stages=tuple(
            _stage_plan(graph, model, i, m, c, f, splits.get(i))
            for i, (m, c, f) in enumerate(zip(sg.stages, sg.costs, sg.in_flight))
        ),
        edges=sg.edges,
        edge_bytes=sg.edge_bytes,
        stage_graph=stage_graph,
        num_microbatches=num_microbatches,
        microbatch_size=costs.microbatch_size,
        comm=costs.comm,
        schedule=schedule,
        bottleneck_ms=max(c.time_ms for c in sg.costs),
        planning_time_s=elapsed,
        peak_bytes=tuple(c.memory_bytes(p, costs.param_copies) for c, p in zip(sg.costs, peaks)),
        memory_budget_bytes=budget,
    )


def _with_boundary(
    model: StageCostModel, sg: StageGraph, s: int, cost: StageCost, splits: dict[int, LateSplit]
) -> StageCost:
    """A split stage also holds the values its early part passes to its late part (the runtime keeps
    them for the early part's backward, see [Note: runtime semantics])."""
    split = splits.get(s)
    if split is None:
        return cost
    mask = sg.stages[s]
    early = mask & ~split.late_mask
    boundary = mask_of(v for v in members(early) if model.succ_mask[v] & split.late_mask)
    return dataclasses.replace(cost, act_bytes=cost.act_bytes + model.held_extra(mask, boundary))


def _schedule(
    graph: OpGraph,
    model: StageCostModel,
    sg: StageGraph,
    num_microbatches: int,
    stage_graph: StageGraphKind,
    schedule_kind: ScheduleKind,
    costs: CostTable,
    budget: float | None = None,
) -> tuple[dict[int, LateSplit], Schedule]:
    """The DAG 1F1B or zero-bubble schedule, with join stages split at their late input on a DAG plan."""
    splits = {x.stage: x for x in late_splits(graph, model, sg.stages)} if stage_graph == "dag" else {}
    late = [(s, x.pred) for s, x in splits.items()]
    n = len(sg.stages)
    if schedule_kind == "1f1b":
        return splits, build_1f1b(n, sg.edges, num_microbatches, late)
    fwd, bwd, wgt = ([getattr(c, f) for c in sg.costs] for f in ("fwd_ms", "bwd_ms", "wgt_ms"))
    delay = {e: costs.comm.time_ms(b) for e, b in zip(sg.edges, sg.edge_bytes)}
    caps = None
    if budget is not None:  # a stage may defer W's as far as its memory allows
        warmup = [min(d, num_microbatches) for d in sg.in_flight]
        room = [(budget - c.param_bytes * costs.param_copies) // max(1, c.act_bytes) for c in sg.costs]
        caps = [max(w, min(num_microbatches, int(r))) for w, r in zip(warmup, room)]
    zb = build_zero_bubble(
        n, sg.edges, num_microbatches, late, fwd=fwd, bwd=bwd, wgt=wgt, edge_delay=delay, max_in_flight=caps
    )
    return splits, zb


def _short(names: tuple[str, ...], limit: int = 4) -> str:
    if len(names) <= limit:
        return ", ".join(names) or "-"
    return f"{', '.join(names[:limit])}, ... ({len(names)} modules)"


def _stage_plan(
    graph: OpGraph,
    model: StageCostModel,
    index: int,
    mask: int,
    cost: StageCost,
    in_flight: int,
    split: LateSplit | None,
) -> StagePlan:
    nodes = [graph.nodes[v] for v in members(mask)]
    modules = tuple(dict.fromkeys(n.target for n in nodes if n.kind == "module"))
    late = {} if split is None else {
        "late_pred": split.pred,
        "late_node_names": tuple(graph.nodes[v].name for v in members(split.late_mask)),
        "late_cost": model.of_mask(split.late_mask),
    }  # fmt: skip
    return StagePlan(
        index=index,
        node_names=tuple(n.name for n in nodes),
        module_names=modules,
        cost=cost,
        in_flight=in_flight,
        **late,  # type: ignore[arg-type]
    )


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

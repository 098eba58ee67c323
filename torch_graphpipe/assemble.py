"""From stages (node bitsets) to a :class:`Plan`: the stage DAG, its schedule and the stages' costs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from torch_graphpipe.graph import OpGraph, mask_of, members
from torch_graphpipe.plan_types import Plan, ScheduleKind, StageGraphKind, StagePlan
from torch_graphpipe.profile import CostTable
from torch_graphpipe.schedule import Schedule, build_1f1b
from torch_graphpipe.simulator import simulate
from torch_graphpipe.stage_cost import StageCost, StageCostModel
from torch_graphpipe.stage_graph import LateSplit, StageGraph, build_stage_graph, late_splits
from torch_graphpipe.zero_bubble import build_zero_bubble

__all__ = ["assemble", "build_schedule", "simulated_ms"]

log = logging.getLogger(__name__)


def assemble(
    graph: OpGraph,
    costs: CostTable,
    model: StageCostModel,
    masks: Sequence[int],
    num_microbatches: int,
    stage_graph: StageGraphKind,
    start: float,
    schedule_kind: ScheduleKind,
    budget: float | None = None,
    margin: float = 0.0,
) -> Plan:
    """The plan of the stages ``masks`` (planning started at ``start``, a ``perf_counter`` time)."""
    num_stages = len(masks)
    sg = build_stage_graph(graph, model, masks, chain=stage_graph == "chain")
    splits, schedule = build_schedule(
        graph, model, sg, num_microbatches, stage_graph, schedule_kind, costs, budget, margin
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
        margin=margin,
    )


def simulated_ms(
    graph: OpGraph,
    model: StageCostModel,
    costs: CostTable,
    masks: Sequence[int],
    num_microbatches: int,
    schedule_kind: ScheduleKind,
    margin: float = 0.0,
) -> float:
    """Simulated step time of the DAG plan of the stages ``masks``."""
    sg = build_stage_graph(graph, model, masks)
    splits, schedule = build_schedule(
        graph, model, sg, num_microbatches, "dag", schedule_kind, costs, margin=margin
    )
    delay = {e: costs.comm.time_ms(b) for e, b in zip(sg.edges, sg.edge_bytes)}
    late = {s: (c.fwd_ms, c.bwd_ms) for s, c in ((s, model.of_mask(x.late_mask)) for s, x in splits.items())}
    fwd, bwd, wgt = ([getattr(c, f) for c in sg.costs] for f in ("fwd_ms", "bwd_ms", "wgt_ms"))
    return simulate(schedule, fwd, bwd, delay, late, wgt=wgt).iteration_time


def build_schedule(
    graph: OpGraph,
    model: StageCostModel,
    sg: StageGraph,
    num_microbatches: int,
    stage_graph: StageGraphKind,
    schedule_kind: ScheduleKind,
    costs: CostTable,
    budget: float | None = None,
    margin: float = 0.0,
) -> tuple[dict[int, LateSplit], Schedule]:
    """The DAG 1F1B or zero-bubble schedule, with join stages split at their late input on a DAG plan."""
    splits = (
        {x.stage: x for x in late_splits(graph, model, sg.stages, margin)} if stage_graph == "dag" else {}
    )
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
        n,
        sg.edges,
        num_microbatches,
        late,
        fwd=fwd,
        bwd=bwd,
        wgt=wgt,
        edge_delay=delay,
        max_in_flight=caps,
        margin=margin,
    )
    return splits, zb


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

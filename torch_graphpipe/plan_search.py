"""Which partition a plan gets: the DAG plan's candidates and the choice among them, the memory check
on the full stage graph, and the error when nothing fits the memory budget."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from torch_graphpipe.assemble import assemble, simulated_ms
from torch_graphpipe.chain import chain_splits
from torch_graphpipe.graph import OpGraph, members
from torch_graphpipe.partition import partition_dag
from torch_graphpipe.plan_types import ScheduleKind, short_names
from torch_graphpipe.profile import CostTable
from torch_graphpipe.sp import decompose
from torch_graphpipe.stable import combined_margin, first_within, plan_noise
from torch_graphpipe.stage_cost import StageCostModel
from torch_graphpipe.stage_graph import build_stage_graph

__all__ = ["chain_stages", "check_memory", "dag_stages", "no_fit_message"]

log = logging.getLogger(__name__)


def chain_stages(
    graph: OpGraph,
    model: StageCostModel,
    costs: CostTable,
    num_stages: int,
    num_microbatches: int,
    budget: float | None,
    schedule_kind: ScheduleKind,
    margin: float = 0.0,
) -> tuple[int, ...]:
    """The chain plan's stages: the first of the chain split candidates (see [Note: chain split
    candidates]) whose simulated step, as a chain plan, is within the plan noise of the fastest."""
    found = _distinct(_chain_candidates(graph, model, num_stages, num_microbatches, budget, margin))
    if len(found) == 1:
        return found[0][1]
    times = [
        assemble(graph, costs, model, masks, num_microbatches, "chain", 0.0, schedule_kind, budget, margin)
        .simulate()
        .iteration_time
        for _, masks in found
    ]
    return _choose("chain plan", found, times, margin)


def _chain_candidates(
    graph: OpGraph,
    model: StageCostModel,
    num_stages: int,
    num_microbatches: int,
    budget: float | None,
    margin: float,
) -> list[tuple[str, tuple[int, ...]]]:
    """[Note: chain split candidates] A chain split's slowest stage is a proxy for its step: a split
    whose bottleneck is a few percent above the smallest may carry fewer bytes on its cuts, or
    balance the stages that fill and drain the pipeline better, and be simulated faster (on the zoo's
    CANDLE-Uno at 4 stages, 20% faster). And the split that is stable under noise (the fewest bytes
    within the combined margin, see [Note: stable chain splits] in torch_graphpipe/chain.py) may be
    one the simulation rates clearly slower when that margin is wide (up to 1.6x on the zoo's
    ResNet-18 with a margin of 25%). So the windows over the smallest bottleneck only propose splits
    and the simulation decides: the fewest bytes within the combined margin, then within the plan
    noise (see [Note: plan noise] in torch_graphpipe/stable.py). The split at the exact smallest
    bottleneck is not proposed: it is the one noise moves, and offering it made the choice flip between
    profiles."""
    labels = ("chain split", "chain split within the plan noise")
    windows = (combined_margin(margin), plan_noise(margin))
    splits = chain_splits(
        graph, model, num_stages, windows, memory_budget_bytes=budget, num_microbatches=num_microbatches
    )
    return list(zip(labels, splits))


def _distinct(found: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    for label, masks in found:
        if all(sorted(masks) != sorted(m) for _, m in out):
            out.append((label, masks))
    return out


def _choose(
    what: str, found: list[tuple[str, tuple[int, ...]]], times: list[float], margin: float
) -> tuple[int, ...]:
    """The first candidate within the plan noise of the fastest; see [Note: plan noise]."""
    best = first_within(times, plan_noise(margin))
    log.info(
        "%s from the %s (simulated step: %s; margin %.3g)",
        what,
        found[best][0],
        ", ".join(f"{label} {t:.4g} ms" for (label, _), t in zip(found, times)),
        margin,
    )
    return found[best][1]


def dag_stages(
    graph: OpGraph,
    model: StageCostModel,
    costs: CostTable,
    num_stages: int,
    num_microbatches: int,
    budget: float | None,
    schedule_kind: ScheduleKind,
    margin: float = 0.0,
) -> tuple[int, ...]:
    """[Note: DAG plan candidates] The DAG search's family of partitions misses some good ones (a stage
    holding the tail of one branch and the join, see [Note: partition search]), and the best chain
    split, laid out as a DAG (every value sent straight to its consumers), is also a DAG plan. And the
    smallest bottleneck is not always the fastest step: on the zoo's CANDLE-Uno a bottleneck 1% larger
    lets every stage hold 2 micro-batches instead of 3, a step 37% shorter. The candidates, in this
    order: the DAG search with slack on the bottleneck (the margin, at least ``CostTable.tolerance``),
    the DAG search at the smallest bottleneck, the chain splits (see [Note: chain split candidates]).
    Each is simulated and the first whose step is within the plan noise of the fastest is kept (see
    [Note: plan noise] in torch_graphpipe/stable.py): the DAG search with slack wins a tie, never a
    clear loss."""
    root = decompose(graph)

    def dag(slack: float) -> Callable[[], list[tuple[str, tuple[int, ...]]]]:
        label = "DAG search" if slack else "DAG search at the smallest bottleneck"
        return lambda: [
            (
                label,
                partition_dag(
                    root,
                    model,
                    num_stages,
                    memory_budget_bytes=budget,
                    num_microbatches=num_microbatches,
                    margin=margin,
                    slack=slack,
                ).stages,
            )
        ]

    def chains() -> list[tuple[str, tuple[int, ...]]]:
        return _chain_candidates(graph, model, num_stages, num_microbatches, budget, margin)

    searches = [dag(max(margin, costs.tolerance)), dag(0.0), chains]
    found: list[tuple[str, tuple[int, ...]]] = []
    error: ValueError | None = None
    for search in searches:
        try:
            proposed = search()
        except ValueError as exc:  # nothing of this family fits the memory budget
            error = error or exc
            continue
        for label, masks in proposed:
            try:
                check_memory(graph, model, masks, budget, num_microbatches)
            except ValueError as exc:
                error = error or exc
                continue
            found = _distinct([*found, (label, tuple(masks))])
    if not found:
        assert error is not None
        raise error
    times = [
        simulated_ms(graph, model, costs, masks, num_microbatches, schedule_kind, margin)
        for _, masks in found
    ]
    return _choose("DAG plan", found, times, margin)


def check_memory(
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


def no_fit_message(
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
        f"{head}: the smallest stage that does not fit, stage {s} ({short_names(tuple(names))}), needs {need:.0f} "
        f"bytes with {held} micro-batches in flight; raise the budget, use more stages, or smaller "
        "micro-batches (num_microbatches='auto' chooses)"
    )

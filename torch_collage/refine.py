"""Optional measured refinement (``search="dp+refine"``): local search on the DP's placement.

The DP adds up costs measured in isolation; assembled, partitions interfere. Refinement measures
whole placements end to end: it moves one partition at a time to another backend (or merges it into
its neighbour's backend), keeps a move when the assembled graph gets faster, and stops when no move
helps or the time budget is spent. Moves are predicted first, and only those predicted within
``slack`` of the current placement are measured, each side by side with the current placement
([Note: end-to-end times are cached per comparison] in endtoend.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence

from torch_collage.candidates import Candidate
from torch_collage.cost import CostModel
from torch_collage.endtoend import EndToEnd
from torch_collage.graph import DataflowGraph
from torch_collage.measure import remeasure, search_key
from torch_collage.search import Partition, Placement, SwitchFn, merge_consecutive

__all__ = ["RefineFn", "refine", "refine_replayed"]

logger = logging.getLogger(__name__)

# end-to-end ms of two assembled placements, timed side by side
CompareFn = Callable[[Placement, Placement], tuple[float, float]]
CostFn = Callable[[Candidate], float]


def refine(
    placement: Placement,
    graph: DataflowGraph,
    backends: Sequence[str],
    cost: CostFn,
    switch: SwitchFn,
    compare_e2e: CompareFn,
    budget_s: float,
    slack: float = 1.25,
) -> Placement:
    """The fastest placement found by single-partition moves, each measured end to end beside the
    current placement."""
    deadline = time.perf_counter() + budget_s
    best = placement
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for move in _moves(best, graph, backends, cost, switch):
            if time.perf_counter() >= deadline:
                break
            if move.predicted_ms > slack * best.predicted_ms:
                continue
            best_ms, ms = compare_e2e(best, move)
            if ms < best_ms:
                best, improved = move, True
                break
    return best


def _moves(
    placement: Placement, graph: DataflowGraph, backends: Sequence[str], cost: CostFn, switch: SwitchFn
) -> list[Placement]:
    out = []
    parts = placement.partitions
    for k, part in enumerate(parts):
        for backend in backends:
            if backend == part.backend:
                continue
            ms = cost(Candidate(part.mask, backend))
            if not math.isfinite(ms):
                continue
            moved = [*parts[:k], Partition(part.mask, backend, ms), *parts[k + 1 :]]
            out.append(merge_consecutive(Placement.priced(moved, switch), graph))
    return sorted(out, key=lambda p: p.predicted_ms)


RefineFn = Callable[..., Placement]  # ``refine``'s signature


def refine_replayed(
    placement: Placement,
    e2e: EndToEnd,
    costs: dict[Candidate, float],
    refine_fn: RefineFn = refine,
    reserve_s: float = 0.0,
) -> Placement:
    """``refine_fn`` on ``placement`` under a quarter of the time budget (at least 1 s), and no more
    than the budget has left beyond ``reserve_s`` ([Note: the compile budget] in timing.py), or its
    outcome replayed from the cache.

    [Note: replayed refinement]
    Refinement stops at a time budget. Replaying it from cached costs is faster than measuring, so a
    warm compile would get further than the cold one did and measure new placements until the budget
    ran out again. The outcome is therefore cached under the starting placement, and a warm compile
    reuses it.

    [Note: refined regions are measured]
    A kept move may merge neighbouring partitions into a region no candidate covered, priced as the
    sum of its parts (``merge_consecutive``). Measuring it gives the report a measured prediction,
    and lets the warm replay find its cost in the cache instead of timing it."""
    model, graph = e2e.model, e2e.graph

    def cost(cand: Candidate) -> float:
        if cand not in costs:
            costs[cand] = model.cost(cand)
        return costs[cand]

    budget = max(1.0, model.options.time_budget_s / 4)
    key = search_key(model, "refine", placement.describe(graph), f"{budget:.1f}")
    stored = model.cache.get_text(key)
    if stored is not None:
        try:
            return _placement_from_json(stored, cost, model)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("torch_collage: cached refinement unreadable (%s); refining again", exc)
    noisy = model.noisy
    spend = budget if math.isinf(model.budget.seconds) else min(budget, model.budget.left() - reserve_s)
    if spend > 0:
        refined = refine_fn(placement, graph, list(model.specs), cost, model.switch_cost, e2e.pair, spend)
    else:  # replayed as it is: the warm compile must not refine what the cold one had no time for
        model.budget.skip("refinement")
        refined = placement
    refined = remeasure(refined, model, costs)
    if model.noisy == noisy:  # [Note: quiet measurements]
        model.cache.put_text(key, json.dumps([[str(p.mask), p.backend] for p in refined.partitions]))
    return refined


def _placement_from_json(text: str, cost: CostFn, model: CostModel) -> Placement:
    parts = []
    for mask_text, backend in json.loads(text):
        if backend not in model.specs:
            raise KeyError(f"backend {backend!r} is not active")
        cand = Candidate(int(mask_text), backend)
        parts.append(Partition(cand.mask, backend, cost(cand)))
    return Placement.priced(parts, model.switch_cost)

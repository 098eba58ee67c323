"""Optional measured refinement (``search="dp+refine"``): local search on the DP's placement.

The DP adds up costs measured in isolation; assembled, partitions interfere. Refinement measures
whole placements end to end: it moves one partition at a time to another backend (or merges it into
its neighbour's backend), keeps a move when the assembled graph gets faster, and stops when no move
helps or the time budget is spent. Moves are predicted first, and only those predicted within
``slack`` of the current placement are measured, each side by side with the current placement
([Note: end-to-end times are cached per comparison] in endtoend.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from torch_collage.candidates import Candidate
from torch_collage.graph import DataflowGraph
from torch_collage.search import Partition, Placement, SwitchFn, merge_consecutive

__all__ = ["refine"]

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

"""Exact op-level search over covers, then merging of consecutive same-backend partitions.

[Note: cover search]
A state is (covered units, backend of the partition run last). Covered sets are always *ideals*
(closed under predecessors), so partitions run in the order they were added and never form a cycle.
From a state, only candidates whose lowest unit is the lowest uncovered unit are expanded (TVM
Collage's trick: covers are not enumerated once per permutation of independent partitions); a
candidate must not overlap the covered set and its predecessors outside it must all be covered.
The edge cost is the candidate's measured cost plus the measured switch cost from the last backend.
Dijkstra returns the cheapest cover among those whose partitions can run in order of their lowest
unit. That excludes some covers (a partition that would have to wait for a later-numbered unit of
a parallel branch), which is the price of the permutation trick; eager singletons keep a cover
always reachable.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch_collage.candidates import Candidate
from torch_collage.graph import DataflowGraph, lowest_bit

__all__ = [
    "Partition",
    "Placement",
    "brute_force_cover",
    "merge_consecutive",
    "merge_eager_runs",
    "merge_groups",
    "merge_run",
    "search_cover",
]

CostFn = Callable[[Candidate], float]
SwitchFn = Callable[[str, str], float]


@dataclass(frozen=True)
class Partition:
    mask: int  # units it covers
    backend: str
    cost_ms: float  # predicted (measured for unmerged partitions)


@dataclass(frozen=True)
class Placement:
    """Partitions in execution order, with the predicted total (partitions + switches), in ms."""

    partitions: tuple[Partition, ...]
    predicted_ms: float

    def describe(self, graph: DataflowGraph) -> str:
        """``backend[unit,unit] -> backend[...]``: a readable form of the placement."""
        return " -> ".join(f"{p.backend}[{','.join(graph.names(p.mask))}]" for p in self.partitions)

    @classmethod
    def priced(cls, partitions: Sequence[Partition], switch: SwitchFn) -> Placement:
        """Partitions with the predicted total: their costs plus a switch cost between consecutive ones."""
        total = sum(p.cost_ms for p in partitions)
        total += sum(switch(a.backend, b.backend) for a, b in itertools.pairwise(partitions))
        return cls(tuple(partitions), total)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.backend for p in self.partitions))


def search_cover(
    graph: DataflowGraph,
    candidates: Sequence[Candidate],
    cost: CostFn,
    switch: SwitchFn,
    stats: dict[str, int] | None = None,
) -> Placement:
    """The cheapest cover; see [Note: cover search]. ``cost`` may return ``inf`` for unusable candidates.
    ``stats`` (if given) receives ``"states"``: how many states were expanded."""
    by_lowest: dict[int, list[Candidate]] = defaultdict(list)
    for cand in candidates:
        by_lowest[cand.lowest].append(cand)
    tie = itertools.count()
    start: tuple[int, str] = (0, "")
    best: dict[tuple[int, str], float] = {start: 0.0}
    back: dict[tuple[int, str], tuple[tuple[int, str], Candidate, float]] = {}
    heap: list[tuple[float, int, tuple[int, str]]] = [(0.0, next(tie), start)]
    while heap:
        dist, _, state = heapq.heappop(heap)
        covered, last = state
        if dist > best.get(state, float("inf")):
            continue
        if stats is not None:
            stats["states"] = stats.get("states", 0) + 1
        if covered == graph.full:
            return _unwind(state, back, dist)
        u = lowest_bit(~covered & graph.full)
        for cand in by_lowest.get(u, ()):
            if cand.mask & covered or graph.external_preds(cand.mask) & ~covered:
                continue
            step = cost(cand)
            if step == float("inf"):
                continue
            step_total = step + (switch(last, cand.backend) if last else 0.0)
            nxt = (covered | cand.mask, cand.backend)
            if dist + step_total < best.get(nxt, float("inf")):
                best[nxt] = dist + step_total
                back[nxt] = (state, cand, step)
                heapq.heappush(heap, (dist + step_total, next(tie), nxt))
    raise RuntimeError("no cover of the graph exists; the eager backend must support every node")


def _unwind(
    state: tuple[int, str],
    back: dict[tuple[int, str], tuple[tuple[int, str], Candidate, float]],
    total: float,
) -> Placement:
    parts = []
    while state in back:
        state, cand, step = back[state]
        parts.append(Partition(cand.mask, cand.backend, step))
    return Placement(tuple(reversed(parts)), total)


def merge_groups(placement: Placement, graph: DataflowGraph) -> list[tuple[Partition, ...]]:
    """The placement's partitions in runs that ``merge_consecutive`` would make one partition each:
    consecutive, on the same backend, each touching (sharing an edge with) the run before it."""
    groups: list[list[Partition]] = []
    run_mask = 0
    for part in placement.partitions:
        if groups and groups[-1][-1].backend == part.backend and graph.neighbours(run_mask) & part.mask:
            groups[-1].append(part)
            run_mask |= part.mask
        else:
            groups.append([part])
            run_mask = part.mask
    return [tuple(g) for g in groups]


def merge_run(group: Sequence[Partition]) -> Partition:
    """One partition covering a run of ``merge_groups``, priced as the sum of its parts."""
    mask = functools.reduce(operator.or_, (p.mask for p in group))
    return Partition(mask, group[0].backend, sum(p.cost_ms for p in group))


def merge_consecutive(placement: Placement, graph: DataflowGraph) -> Placement:
    """Merge partitions that run one after the other on the same backend and touch (share an edge).

    Running two consecutive partitions as one keeps execution order valid; the merged cost is
    predicted as the sum (the caller may measure the merged region: [Note: merged regions are
    measured] in place.py)."""
    merged = tuple(merge_run(group) for group in merge_groups(placement, graph))
    return Placement(merged, placement.predicted_ms)


def merge_eager_runs(placement: Placement) -> Placement:
    """``placement`` with each run of consecutive eager partitions as one partition, priced as the
    sum of its parts ([Note: eager runs are one partition]).

    [Note: eager runs are one partition]
    Eager runs a partition's ops one after the other whether they are one partition or several, so
    cutting a run of eager ops into pieces only adds calls through the assembled loop (a module call
    and the slots between them, some microseconds each). The search leaves such pieces apart: it
    covers with eager's singletons, and ``merge_measured`` merges only touching runs and keeps them
    apart when the merged region times slower than its parts, which eager's merged region often does
    by noise, as the parts were each timed without the calls between them. Llama's decode graph at a
    static cache of 8K slots, placed on eager and torch_cp, ran as 494 partitions where 17 runs
    would do. Consecutive partitions run one after the other, so their union is convex whether or
    not they touch (a path between them would pass a node that runs between them: there is none);
    every run of consecutive eager partitions is therefore one eager partition, without measuring.
    """
    parts: list[Partition] = []
    for part in placement.partitions:
        if parts and part.backend == "eager" and parts[-1].backend == "eager":
            last = parts.pop()
            part = Partition(last.mask | part.mask, "eager", last.cost_ms + part.cost_ms)
        parts.append(part)
    if len(parts) == len(placement.partitions):
        return placement
    return Placement(tuple(parts), placement.predicted_ms)


def brute_force_cover(
    graph: DataflowGraph, candidates: Sequence[Candidate], cost: CostFn, switch: SwitchFn
) -> float:
    """Cheapest cover by exhaustive recursion over the same space as ``search_cover`` (for tests)."""

    def rec(covered: int, last: str) -> float:
        if covered == graph.full:
            return 0.0
        u = lowest_bit(~covered & graph.full)
        out = float("inf")
        for cand in candidates:
            if cand.lowest != u or cand.mask & covered or graph.external_preds(cand.mask) & ~covered:
                continue
            extra = switch(last, cand.backend) if last else 0.0
            out = min(out, cost(cand) + extra + rec(covered | cand.mask, cand.backend))
        return out

    return rec(0, "")

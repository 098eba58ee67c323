"""Chain partitioner: the best sequential split of a topological order, for comparison.

Stage ``k`` of ``S`` is the interval ``[i, j)`` of the topological order and holds ``S - k``
micro-batches in flight; it receives every tensor crossing the cut before it and passes on every
tensor crossing the cut after it (what a sequential pipeline must do with skip edges). Exact over
interval splits: binary search over the sorted times of every interval, each target checked by a
dynamic program over (stage, first node).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from torch_graphpipe.graph import OpGraph
from torch_graphpipe.partition import PartitionResult
from torch_graphpipe.stable import TIE, combined_margin
from torch_graphpipe.stage_cost import StageCostModel

__all__ = ["chain_splits", "partition_chain"]


class _Intervals:
    def __init__(self, graph: OpGraph, model: StageCostModel) -> None:
        n = len(graph)
        self.n = n
        self.copies = model.param_copies
        self.compute = list(itertools.accumulate((model.fwd[v] + model.bwd[v] for v in range(n)), initial=0))
        self.params = list(itertools.accumulate(model.params, initial=0))
        self.own = list(itertools.accumulate(model.out_bytes, initial=0))
        self.cut_msg, self.cut_bytes = [0.0] * (n + 1), [0] * (n + 1)
        for c in range(1, n):
            live = [p for p in range(c) if model.succ_mask[p] >> c]
            self.cut_msg[c] = sum(model.msg[p] for p in live)
            self.cut_bytes[c] = sum(model.out_bytes[p] for p in live)

    def time(self, i: int, j: int) -> float:
        return self.compute[j] - self.compute[i] + self.cut_msg[i] + self.cut_msg[j]

    def memory(self, i: int, j: int, in_flight: int) -> float:
        act = self.own[j] - self.own[i] + self.cut_bytes[i]
        return (self.params[j] - self.params[i]) * self.copies + in_flight * act


def _feasible(
    iv: _Intervals, stages: int, target: float, budget: float | None, cap: int
) -> list[list[int]] | None:
    """``nxt[k][i]``: end of stage ``k`` starting at ``i`` in a feasible split, -1 when none."""
    n = iv.n
    ok = [[False] * (n + 1) for _ in range(stages + 1)]
    ok[stages][n] = True
    nxt = [[-1] * (n + 1) for _ in range(stages)]
    for k in range(stages - 1, -1, -1):
        for i in range(n - 1, -1, -1):
            for j in range(i + 1, n + 1):
                if iv.compute[j] - iv.compute[i] > target:
                    break
                if not ok[k + 1][j] or iv.time(i, j) > target:
                    continue
                if budget is None or iv.memory(i, j, min(cap, stages - k)) <= budget:
                    ok[k][i], nxt[k][i] = True, j
                    break
    return nxt if ok[0][0] else None


def _fewest_bytes(
    iv: _Intervals, stages: int, target: float, budget: float | None, cap: int
) -> list[list[int]]:
    """``nxt[k][i]``: end of stage ``k`` starting at ``i`` in the split with every stage within
    ``target`` (and ``budget``) whose cuts carry the fewest bytes; among those the most balanced (the
    smallest sum of squared stage times), exact ties to the earliest cut; see [Note: stable chain
    splits]."""
    n = iv.n
    best: list[list[tuple[int, float] | None]] = [[None] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = (0, 0.0)
    nxt = [[-1] * (n + 1) for _ in range(stages)]
    for k in range(stages - 1, -1, -1):
        for i in range(n - 1, -1, -1):
            for j in range(i + 1, n + 1):
                if iv.compute[j] - iv.compute[i] > target:
                    break
                rest, t = best[k + 1][j], iv.time(i, j)
                if rest is None or t > target:
                    continue
                if budget is not None and iv.memory(i, j, min(cap, stages - k)) > budget:
                    continue
                key = (rest[0] + (iv.cut_bytes[j] if j < n else 0), rest[1] + t * t)
                here = best[k][i]
                if here is None or key < here:  # strictly better: exact ties keep the earliest cut
                    best[k][i], nxt[k][i] = key, j
    assert best[0][0] is not None, "the target admits the smallest bottleneck's split"
    return nxt


def partition_chain(
    graph: OpGraph,
    model: StageCostModel,
    num_stages: int,
    *,
    memory_budget_bytes: float | None = None,
    num_microbatches: int | None = None,
    margin: float = 0.0,
) -> PartitionResult:
    """Split the topological order into ``num_stages`` intervals minimising the slowest stage (a stage
    holds at most ``num_microbatches`` micro-batches, for the memory budget).

    [Note: stable chain splits]
    Near-equal chain splits abound (a cut moved by one cheap operator changes the slowest stage by
    less than a profile's noise), so the smallest bottleneck taken as exact lands on whichever the
    noise favoured. The split is instead the one whose cuts carry the fewest bytes among those whose
    slowest stage is within the combined ``margin`` (the planning margin, see [Note: plans that
    reproduce] in torch_graphpipe/stable.py) of the smallest bottleneck.
    Bytes do not move with timing noise, so the choice changes only when noise pushes a split across
    the margin's edge. Where several carry equally few bytes (a run of layers of one width), the most
    balanced one (the smallest sum of squared stage times) is taken: it lies inside the margin rather
    than at its edge, as the earliest or latest cuts would. The split proposed is one of the chain
    plan's candidates, which the simulation chooses between within the plan noise (see [Note: chain
    split candidates] in torch_graphpipe/plan_search.py), so a wide margin never keeps a split
    simulated clearly slower. On the zoo's DLRM and MMT this gives one split over noisy
    profiles at 4, 8 and 16 stages; on CANDLE-Uno's long run of equal layers, 16 stages still move a
    cut in some draws."""
    (stages,) = chain_splits(
        graph,
        model,
        num_stages,
        [combined_margin(margin)],
        memory_budget_bytes=memory_budget_bytes,
        num_microbatches=num_microbatches,
    )
    iv = _Intervals(graph, model)
    bottleneck = max(iv.time(a, b) for a, b in _bounds(list(stages)))
    return PartitionResult(stages=stages, bottleneck_ms=bottleneck, depth=num_stages)


def chain_splits(
    graph: OpGraph,
    model: StageCostModel,
    num_stages: int,
    windows: Sequence[float],
    *,
    memory_budget_bytes: float | None = None,
    num_microbatches: int | None = None,
) -> list[tuple[int, ...]]:
    """Per relative window ``w`` of ``windows``, the split with the fewest bytes on its cuts (then the
    most balanced) among those whose slowest stage is at most ``1 + w`` times the smallest; see
    [Note: stable chain splits]. Stages are node bitsets in order."""
    cap = num_microbatches or num_stages
    iv = _Intervals(graph, model)
    n = iv.n
    times = sorted({iv.time(i, j) for i in range(n) for j in range(i + 1, n + 1)})
    hi = len(times) - 1
    lo = min(hi, bisect.bisect_left(times, iv.compute[n] / num_stages))
    if _feasible(iv, num_stages, times[hi], memory_budget_bytes, cap) is None:
        raise ValueError(f"no chain of {num_stages} stages fits memory_budget_bytes={memory_budget_bytes}")
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(iv, num_stages, times[mid], memory_budget_bytes, cap) is not None:
            hi = mid
        else:
            lo = mid + 1
    out = []
    for window in windows:
        nxt = _fewest_bytes(iv, num_stages, times[lo] * (1 + max(window, TIE)), memory_budget_bytes, cap)
        stages, i = [], 0
        for k in range(num_stages):
            j = nxt[k][i]
            stages.append(((1 << j) - 1) & ~((1 << i) - 1))
            i = j
        out.append(tuple(stages))
    return out


def _bounds(stages: list[int]) -> list[tuple[int, int]]:
    return [((m & -m).bit_length() - 1, m.bit_length()) for m in stages]

"""DAG partitioner: binary search on the bottleneck, dynamic program over the series-parallel tree.

[Note: partition search]
For a target bottleneck ``T`` (time per micro-batch of the slowest stage), ``solve(H, d, k)`` is the
fewest in-flight micro-batches (stages on the longest path to a sink) that the source stages of the
SP subtree ``H`` need when ``H`` is split into exactly ``d`` stages of time <= T, given that ``k``
stages follow ``H`` (so a stage of local depth ``x`` holds ``x + k`` micro-batches, which its memory
must fit). Series ``C_0; ...; C_n-1`` is solved from the end: position ``i`` either makes the run
``C_i..C_j`` one stage, or splits ``C_i`` into ``d_i >= 2`` stages after the rest has been solved
(the rest's depth is ``C_i``'s ``k``). Parallel ``B_0 | ... | B_m-1`` (sorted by cost, largest first)
either merges the branches from ``idx`` on into one stage, or gives branch ``idx`` its own ``d_1``
stages and the others ``d - d_1``; the depth is the larger of the two.

The search is exact over this family of partitions: the smallest bottleneck is found by binary search
over the sorted times of every stage the family can form, then the fewest in-flight micro-batches at
that bottleneck. Not in the family: a stage holding part of a series component together with its
neighbour (except a branch tail with the join, below), or an arbitrary (non-suffix) group of parallel
branches.

[Note: branch tail with the join]
A join (``a(x) + b(x)``) is usually free, so a stage of its own wastes a device, and merging it with
whole branches makes a stage as slow as those branches. The balanced plan keeps the *end* of one
branch with the join: for two branches of four unit blocks on eight stages, ``a0..a3`` and ``b0..b2``
one block each and ``b3 + join`` one stage. So at series position ``i`` whose child is a parallel
``P`` (branches in cost order ``B_0..B_m-1``), a stage may also be ``tail_t(B_idx-1) | B_idx.. |
C_i+1..C_j``, where ``tail_t`` is the series children ``t..`` of branch ``B_idx-1`` (``idx`` up to
``m``, so no whole branch need be merged). The head of that branch (children ``..t-1``) is solved
as a shorter series (``series(node, k, end=t)``), the branches before it separately, both followed by
the joint stage and the rest; the depth is the larger of the two plus the joint stage and the rest.
Only the last separately split branch in the cost order gets a tail: trying every branch would need a
prefix table per excluded branch.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from functools import cache

from torch_graphpipe.candidates import CandidateTree
from torch_graphpipe.sp import SPNode
from torch_graphpipe.stable import TIE
from torch_graphpipe.stage_cost import StageCost, StageCostModel

__all__ = ["PartitionResult", "partition_dag"]

log = logging.getLogger(__name__)

INF = math.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionResult:
    """Stages (node bitsets) and the search's objective values."""

    stages: tuple[int, ...]  # node bitsets, one per stage (not yet topologically ordered)
    bottleneck_ms: float  # slowest stage's time per micro-batch
    depth: int  # in-flight micro-batches of the deepest source stage, as the search saw it


class _Search:
    """The dynamic program for one target bottleneck; see [Note: partition search]."""

    def __init__(
        self, tree: CandidateTree, target_ms: float, budget: float | None, max_d: int, cap: int
    ) -> None:
        self.tree, self.target, self.budget, self.max_d = tree, target_ms, budget, max_d
        self.cap = cap  # micro-batches per step: no stage holds more
        self.copies = tree.model.param_copies
        self.solve = cache(self._solve)
        self.series = cache(self._series)
        self.parallel = cache(self._parallel)
        self.prefix = cache(self._prefix)
        self.tail_group = cache(self._tail_group)
        self.head_table = cache(self._head_table)

    def fits(self, cost: StageCost, in_flight: int) -> bool:
        if cost.time_ms > self.target:
            return False
        return self.budget is None or cost.memory_bytes(min(in_flight, self.cap), self.copies) <= self.budget

    def k_key(self, k: int) -> int:
        return k if self.budget is not None else 0  # without a budget, depth after H is irrelevant

    def _solve(self, node: SPNode, d: int, k: int) -> float:
        if d < 1 or d > self.tree.leaves[id(node)]:
            return INF
        if self.tree.compute[id(node)] > d * self.target:
            return INF
        if node.kind == "leaf":
            return 1 if self.fits(self.tree.whole[id(node)], 1 + k) else INF
        if node.kind == "series":
            return self.series(node, k, len(node.children))[0][d][0]
        return self.parallel(node, k)[0][d][0]

    def _series(self, node: SPNode, k: int, end: int) -> list[list[tuple[float, tuple]]]:
        """``table[i][d] = (depth, choice)`` for children ``i..end-1`` split into ``d`` stages."""
        dmax = min(self.max_d, self.tree.leaves[id(node)])
        table = [[(INF, ())] * (dmax + 1) for _ in range(end + 1)]
        table[end][0] = (0, ())
        for i in range(end - 1, -1, -1):
            for d in range(1, dmax + 1):
                table[i][d] = min(self._series_options(node, table, i, d, k, end), default=(INF, ()))
        return table

    def _series_options(self, node: SPNode, table: list, i: int, d: int, k: int, end: int):
        kids, runs = node.children, self.tree.runs[id(node)]
        for j, cost in enumerate(runs[i], start=i):
            if j >= end or cost.fwd_ms + cost.bwd_ms > self.target:
                break
            rest = table[j + 1][d - 1][0]
            if rest < INF and self.fits(cost, int(1 + rest + k)):
                yield (1 + rest, ("run", j))
        child = kids[i]
        if child.kind == "leaf":
            return
        for di in range(2, min(d, self.tree.leaves[id(child)]) + 1):
            rest = table[i + 1][d - di][0]
            if rest < INF:
                inner = self.solve(child, di, self.k_key(int(rest + k)))
                if inner < INF:
                    yield (inner + rest, ("split", di))
        yield from self._absorb_options(node, table, i, d, k, end)
        yield from self._tail_options(node, table, i, d, k, end)

    def _absorb_options(self, node: SPNode, table: list, i: int, d: int, k: int, end: int):
        """Branches ``idx..`` of parallel ``C_i`` merged with the run ``C_i+1..C_j`` into one stage."""
        kids = node.children
        for idx, row in self.tree.absorb[id(node)].get(i, {}).items():
            for j, cost in enumerate(row, start=i + 1):
                if j >= end or cost.fwd_ms + cost.bwd_ms > self.target:
                    break
                for dp in range(1, min(d, self.tree.leaves[id(kids[i])])):
                    rest = table[j + 1][d - 1 - dp][0]
                    if rest == INF or not self.fits(cost, int(1 + rest + k)):
                        continue
                    prefix = self.prefix(kids[i], self.k_key(int(1 + rest + k)))[idx][dp][0]
                    if prefix < INF:
                        yield (prefix + 1 + rest, ("absorb", j, idx, dp))

    def _tail_options(self, node: SPNode, table: list, i: int, d: int, k: int, end: int):
        """A branch tail of parallel ``C_i`` (and the branches after it) with ``C_i+1..C_j``; see
        [Note: branch tail with the join]. Yields only the best of these options (they are many)."""
        par, skip = node.children[i], 0
        best: tuple[float, tuple] = (INF, ())
        for idx, t, _, row in self.tree.tails[id(node)].get(i, ()):
            if idx == skip or row[0].fwd_ms + row[0].bwd_ms > self.target:
                skip = idx  # the tails of one branch come growing: the longer ones cost more still
                continue
            group = self.tail_group(par, idx, t, 0) if self.budget is None else None
            for j, cost in enumerate(row, start=i + 1):
                if j >= end or cost.fwd_ms + cost.bwd_ms > self.target:
                    break
                if cost.time_ms > self.target:
                    continue
                after = table[j + 1]
                for dd in range(1, d):
                    rest = after[d - 1 - dd][0]
                    if rest == INF:
                        continue
                    if group is None or self.budget is not None:
                        if not self.fits(cost, int(1 + rest + k)):
                            continue
                        group = self.tail_group(par, idx, t, self.k_key(int(1 + rest + k)))
                    if dd < len(group) and group[dd][0] + 1 + rest < best[0]:
                        best = (group[dd][0] + 1 + rest, ("tail", j, idx, t, dd))
        if best[0] < INF:
            yield best

    def _tail_group(self, par: SPNode, idx: int, t: int, k: int) -> list[tuple[float, int]]:
        """``[dd] = (depth, stages of the head)``: the head ``..t-1`` of branch ``idx - 1`` and the
        branches before it, split separately into ``dd`` stages in all."""
        branch = self.tree.order[id(par)][idx - 1]
        if self.budget is None:
            head = self.head_table(branch)[t]
        else:
            head = [row[0] for row in self.series(branch, k, t)[0]]
        before = [row[0] for row in self.prefix(par, k)[idx - 1]]
        out: list[tuple[float, int]] = [(INF, 0)] * len(before)
        for dh in range(1, len(head)):
            if head[dh] == INF:
                continue
            for dp in range(len(before) - dh):
                value = max(head[dh], before[dp])
                if value < out[dh + dp][0]:
                    out[dh + dp] = (value, dh)
        return out

    def _parallel(self, node: SPNode, k: int) -> list[list[tuple[float, tuple]]]:
        """``table[0][d] = (depth, choice)``: branches split separately, or a suffix of them merged."""
        suffix = self.tree.suffix[id(node)]
        pre = self.prefix(node, k)
        m, dmax = len(suffix), min(self.max_d, self.tree.leaves[id(node)])
        row: list[tuple[float, tuple]] = [(INF, ())] * (dmax + 1)
        for d in range(1, dmax + 1):
            options: list[tuple[float, tuple]] = [(pre[m][d][0], ("separate",))]
            for idx in range(m):
                if pre[idx][d - 1][0] < INF and self.fits(suffix[idx], 1 + k):
                    options.append((max(1, pre[idx][d - 1][0]), ("merge", idx)))
            row[d] = min(options)
        return [row]

    def _head_table(self, node: SPNode) -> list[list[float]]:
        """``[t][d]``: depth of series children ``..t-1`` split into ``d`` stages, without a budget.

        [Note: forward head table] Every tail ``t`` of a branch needs the head ``..t-1`` solved; a
        table per ``t`` (``series(node, k, end=t)``) made planning 10x slower on the zoo's MMT. Without
        a memory budget a stage's fit does not depend on what follows, so a series' depth is the sum
        of its segments' depths and one forward pass over the same options as ``_series_options``
        (runs, split children, absorbed and tail-joined branches) gives every head at once. With a
        budget the exact per-``t`` table is used."""
        kids, runs = node.children, self.tree.runs[id(node)]
        n, dmax = len(kids), min(self.max_d, self.tree.leaves[id(node)])
        table = [[INF] * (dmax + 1) for _ in range(n + 1)]
        table[0][0] = 0
        for i in range(n):
            here = table[i]
            if min(here) == INF:
                continue
            segments: list[tuple[int, int, float]] = []  # (last child, stages, depth)
            for j, cost in enumerate(runs[i], start=i):
                if cost.fwd_ms + cost.bwd_ms > self.target:
                    break
                if cost.time_ms <= self.target:
                    segments.append((j, 1, 1))
            child = kids[i]
            if child.kind != "leaf":
                for di in range(2, min(dmax, self.tree.leaves[id(child)]) + 1):
                    segments.append((i, di, self.solve(child, di, 0)))
            for idx, row in self.tree.absorb[id(node)].get(i, {}).items():
                prefix = self.prefix(child, 0)[idx]
                for j, cost in enumerate(row, start=i + 1):
                    if cost.fwd_ms + cost.bwd_ms > self.target:
                        break
                    if cost.time_ms <= self.target:
                        segments.extend((j, 1 + dp, prefix[dp][0] + 1) for dp in range(1, len(prefix)))
            skip = 0
            for idx, t, _, row in self.tree.tails[id(node)].get(i, ()):
                if idx == skip or row[0].fwd_ms + row[0].bwd_ms > self.target:
                    skip = idx
                    continue
                for j, cost in enumerate(row, start=i + 1):
                    if cost.fwd_ms + cost.bwd_ms > self.target:
                        break
                    if cost.time_ms <= self.target:
                        group = self.tail_group(child, idx, t, 0)
                        segments.extend((j, 1 + dd, group[dd][0] + 1) for dd in range(1, len(group)))
            for j, dseg, value in segments:
                if value == INF:
                    continue
                nxt = table[j + 1]
                for d in range(dmax + 1 - dseg):
                    if here[d] + value < nxt[d + dseg]:
                        nxt[d + dseg] = here[d] + value
        return table

    def _prefix(self, node: SPNode, k: int) -> list[list[tuple[float, tuple]]]:
        """``pre[idx][d] = (depth, choice)``: branches ``0..idx-1``, each split on its own, ``d`` stages."""
        kids = self.tree.order[id(node)]
        dmax = min(self.max_d, self.tree.leaves[id(node)])
        pre: list[list[tuple[float, tuple]]] = [[(INF, ())] * (dmax + 1) for _ in range(len(kids) + 1)]
        pre[0][0] = (0, ())
        for idx, kid in enumerate(kids):
            for d in range(1, dmax + 1):
                options = [
                    (max(pre[idx][d - db][0], self.solve(kid, db, k)), ("branch", db))
                    for db in range(1, min(d, self.tree.leaves[id(kid)]) + 1)
                ]
                pre[idx + 1][d] = min(options, default=(INF, ()))
        return pre

    def stages(self, node: SPNode, d: int, k: int) -> list[int]:
        """Reconstruct the stages of an optimal solution of ``solve(node, d, k)``."""
        if node.kind == "leaf":
            return [node.mask]
        if node.kind == "series":
            return self._series_stages(node, d, self.k_key(k), len(node.children))
        k = self.k_key(k)
        choice = self.parallel(node, k)[0][d][1]
        if choice[0] == "separate":
            return self._prefix_stages(node, len(node.children), d, k)
        idx = choice[1]
        return [*self._prefix_stages(node, idx, d - 1, k), self.tree.suffix_mask[id(node)][idx]]

    def _prefix_stages(self, node: SPNode, idx: int, d: int, k: int) -> list[int]:
        pre, kids, out = self.prefix(node, k), self.tree.order[id(node)], []
        while idx > 0:
            db = pre[idx][d][1][1]
            out.extend(self.stages(kids[idx - 1], db, k))
            idx, d = idx - 1, d - db
        assert d == 0
        return out

    def _series_stages(self, node: SPNode, d: int, k: int, end: int) -> list[int]:
        table, out, i = self.series(node, k, end), [], 0
        while i < end:
            choice = table[i][d][1]
            if choice[0] == "run":
                j = choice[1]
                out.append(_union(node.children[i : j + 1]))
                i, d = j + 1, d - 1
            elif choice[0] == "split":
                di = choice[1]
                rest = table[i + 1][d - di][0]
                out.extend(self.stages(node.children[i], di, int(rest + k)))
                i, d = i + 1, d - di
            elif choice[0] == "tail":
                _, j, idx, t, dd = choice
                rest = table[j + 1][d - 1 - dd][0]
                par = node.children[i]
                head = next(h for x, y, h, _ in self.tree.tails[id(node)][i] if (x, y) == (idx, t))
                out.append(head | _union(node.children[i + 1 : j + 1]))
                kk = self.k_key(int(1 + rest + k))
                dh = self.tail_group(par, idx, t, kk)[dd][1]
                out.extend(self._series_stages(self.tree.order[id(par)][idx - 1], dh, kk, t))
                out.extend(self._prefix_stages(par, idx - 1, dd - dh, kk))
                i, d = j + 1, d - 1 - dd
            else:
                _, j, idx, dp = choice
                rest = table[j + 1][d - 1 - dp][0]
                par = node.children[i]
                joint = self.tree.suffix_mask[id(par)][idx] | _union(node.children[i + 1 : j + 1])
                out.append(joint)
                out.extend(self._prefix_stages(par, idx, dp, self.k_key(int(1 + rest + k))))
                i, d = j + 1, d - 1 - dp
        return out


def _union(nodes) -> int:
    mask = 0
    for node in nodes:
        mask |= node.mask
    return mask


def partition_dag(
    root: SPNode,
    model: StageCostModel,
    num_stages: int,
    *,
    memory_budget_bytes: float | None = None,
    num_microbatches: int | None = None,
    margin: float = 0.0,
    slack: float = 0.0,
) -> PartitionResult:
    """Split the graph into exactly ``num_stages`` convex stages; see [Note: partition search]. A stage
    holds at most ``num_microbatches`` micro-batches (for the memory budget).

    Branch costs within ``margin`` (relative) of each other count as equal; the fewest in-flight
    micro-batches are sought at the smallest bottleneck times ``1 + slack`` (see [Note: plans that
    reproduce] in torch_graphpipe/stable.py)."""
    tree = CandidateTree(root, model, margin)
    times = tree.candidate_times()
    lo, hi = bisect.bisect_left(times, tree.compute[id(root)] / num_stages), len(times) - 1

    def search_at(i: int) -> _Search:
        return _Search(tree, times[i], memory_budget_bytes, num_stages, num_microbatches or num_stages)

    if search_at(hi).solve(root, num_stages, 0) == INF:
        raise ValueError(
            f"no partition into {num_stages} stages fits memory_budget_bytes={memory_budget_bytes}"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if search_at(mid).solve(root, num_stages, 0) < INF:
            hi = mid
        else:
            lo = mid + 1
    search = _Search(
        tree, times[lo] * (1 + slack + TIE), memory_budget_bytes, num_stages, num_microbatches or num_stages
    )
    depth = search.solve(root, num_stages, 0)
    stages = search.stages(root, num_stages, 0)
    assert len(stages) == num_stages, (len(stages), num_stages)
    bottleneck = max(model.of_mask(m).time_ms for m in stages)
    log.debug("dag partition: %d candidates, bottleneck %.4g ms, depth %d", len(times), bottleneck, depth)
    return PartitionResult(stages=tuple(stages), bottleneck_ms=bottleneck, depth=int(depth))

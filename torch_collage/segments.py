"""Coarse candidates: intervals of the topological order between narrow cuts (option ``segments``).

[Note: coarse segments]
The op-level candidates hold at most ``max_depth`` ops, so the cover search can only assemble a
placement from small pieces: it cannot ask "the transformer blocks on OpenVINO, the vocabulary
projection on ONNX Runtime?" without first paying a boundary between every few ops. With
``segments=K``, the graph's units are also cut at K-1 points of its topological order, each chosen
near an even split (in units) where fewest values cross the cut (a block boundary, where one tensor
does), and every interval between two cut points (the whole graph excepted) becomes a candidate on
each backend that runs arbitrary regions and supports all of it. An interval of a topological order
is always convex (an edge never points backwards, so no path leaves it and comes back), and covers
made of intervals are exactly what the cover search expands, so the search now weighs coarse mixes
beside the fine ones with the same measured costs.

The intervals also tell where the backends differ: ``GraphReport.segments`` lists the consecutive
ones with each backend's time, and the best backend per segment bounds what a coarse mix could gain
(boundaries cost extra). On the 2-core EPYC of benchmarks/results/collage_segments_cpu_epyc.md,
the best backend per segment added up to 0.87-1.06x the best whole graph on four of five models,
while cutting a backend's graph into 4 segments alone cost it 1.06-1.43x (fusion and layouts end at
each boundary), and no mix was kept. ``segments`` therefore defaults to 0: K=4 costs about four
whole-graph compiles per backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch_collage.backends.base import BackendSpec
from torch_collage.candidates import Candidate, supported_mask
from torch_collage.graph import DataflowGraph

__all__ = [
    "around_specialists",
    "consecutive_segments",
    "crossings",
    "cut_points",
    "interval_mask",
    "segment_candidates",
    "specialists",
]


def crossings(graph: DataflowGraph) -> list[int]:
    """``out[k]`` (``0 <= k <= graph.size``): how many units before position ``k`` feed a unit at or
    after it, i.e. how many values a partition boundary at ``k`` hands over (0 at both ends)."""
    n = graph.size
    delta = [0] * (n + 2)
    for i in range(n):
        last = graph.succs[i].bit_length() - 1  # the last unit that reads unit i
        if last > i:
            delta[i + 1] += 1
            delta[last + 1] -= 1
    out, running = [], 0
    for k in range(n + 1):
        running += delta[k]
        out.append(running)
    return out


def cut_points(graph: DataflowGraph, n_segments: int) -> list[int]:
    """``0``, up to ``n_segments - 1`` cut positions, and ``graph.size``, ascending and distinct.

    Cut ``j`` lies within half a segment's length of ``j * size / n_segments``, at the
    position with the fewest crossing values there (the nearest to the even split on a tie)."""
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments!r}")
    n = graph.size
    cross = crossings(graph)
    window = max(1, n // (2 * n_segments))
    points = {0, n}
    for j in range(1, n_segments):
        target = round(j * n / n_segments)
        near = range(max(1, target - window), min(n - 1, target + window) + 1)
        if near:
            points.add(min(near, key=lambda k: (cross[k], abs(k - target))))
    return sorted(points)


def interval_mask(start: int, stop: int) -> int:
    """The units ``start <= i < stop`` as a bitset."""
    return ((1 << stop) - 1) & ~((1 << start) - 1)


def segment_candidates(
    graph: DataflowGraph, specs: Iterable[BackendSpec], n_segments: int
) -> list[Candidate]:
    """Every interval between two cut points but the whole graph, on each backend that fuses
    arbitrary regions (``fusion="region"``, no depth cap of its own) and supports all its units."""
    if n_segments < 2 or graph.size < 2:
        return []
    points = cut_points(graph, n_segments)
    intervals = [
        interval_mask(a, b)
        for i, a in enumerate(points)
        for b in points[i + 1 :]
        if (a, b) != (0, graph.size)
    ]
    out: list[Candidate] = []
    for spec in specs:
        if spec.name == "eager" or spec.fusion != "region" or spec.max_depth is not None:
            continue
        supported = supported_mask(graph, spec)
        out.extend(Candidate(m, spec.name) for m in intervals if m & supported == m)
    return out


def consecutive_segments(graph: DataflowGraph, n_segments: int) -> list[int]:
    """The masks of the ``n_segments`` (or fewer) consecutive intervals that tile the graph."""
    points = cut_points(graph, n_segments)
    return [interval_mask(a, b) for a, b in itertools.pairwise(points)]


# [Note: regions around a specialist]
# A backend that claims a few kinds of op and runs them far better than the runtimes (torch_cp's
# decode attention over a long KV cache) wins only if the rest of the graph runs as well as a
# runtime runs it whole. The op-level candidates hold at most ``max_depth`` ops, so around the
# specialist's nodes the cover search could only choose eager or a runtime in small pieces, each
# paying a boundary: Llama's decode graph at a static cache of 8K slots was placed as eager plus
# torch_cp (26.3 ms) while Inductor alone ran its GEMMs faster than eager (16.7 against 18.8 ms at
# 512 slots). So for every specialist (a backend other than eager supporting at most
# ``SPECIALIST_SHARE`` of the units), the runs of the topological order between its units become
# candidates on each backend that fuses arbitrary regions, split again where that backend refuses
# a unit. A run of the topological order is convex ([Note: coarse segments]); the runs of a
# repeated block (a transformer layer) have one canonical form and input signature, so the cost of
# one is the cost of all and only the first few are timed. Runs of ``max_depth`` units or fewer are
# among the op-level candidates already. The specialist's own candidates are measured with these
# runs, before the nearly whole graphs ([Note: nearly whole graphs] in measure.py): each of those is
# a whole compile, and at 8K slots the three of them took the budget before torch_cp was timed.
SPECIALIST_SHARE = 0.25


def specialists(graph: DataflowGraph, specs: Iterable[BackendSpec]) -> dict[str, int]:
    """The backends other than eager that support at most ``SPECIALIST_SHARE`` of the units (and
    some), with the units they support ([Note: regions around a specialist])."""
    out = {}
    for spec in specs:
        claimed = supported_mask(graph, spec)
        if spec.name != "eager" and 0 < claimed.bit_count() <= SPECIALIST_SHARE * graph.size:
            out[spec.name] = claimed
    return out


def around_specialists(graph: DataflowGraph, specs: Iterable[BackendSpec], max_depth: int) -> list[Candidate]:
    """The runs between each specialist's units on every region backend ([Note: regions around a
    specialist]), longer than ``max_depth`` units, the whole graph excepted."""
    specs = list(specs)
    cuts = 0
    for claimed in specialists(graph, specs).values():
        cuts |= claimed
    if not cuts:
        return []
    out: list[Candidate] = []
    for spec in specs:
        if spec.name == "eager" or spec.fusion != "region" or spec.max_depth is not None:
            continue
        stop = cuts | (graph.full & ~supported_mask(graph, spec))  # where a run ends
        start = None
        for i in range(graph.size + 1):
            if i < graph.size and not stop >> i & 1:
                start = i if start is None else start
                continue
            if start is not None and i - start > max_depth and (start, i) != (0, graph.size):
                out.append(Candidate(interval_mask(start, i), spec.name))
            start = None
    return out

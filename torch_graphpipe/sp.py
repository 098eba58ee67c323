"""Series-parallel decomposition of an operator DAG (as a partial order).

A set of nodes is *series* when it splits into parts that each wholly precede the next (components of
the incomparability graph), *parallel* when it splits into parts with no path between them
(components of the comparability graph). A set that is neither (an "N" shape, so not
series-parallel) is made series-parallel by ordering it: it is cut between two levels of its longest-
path layering, the cut adding the fewest precedences, and both sides are decomposed again. The added
precedences only restrict the partitions the planner considers; every stage stays convex in the real
graph, and the stage DAG built afterwards uses the real edges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Literal

from torch_graphpipe.graph import OpGraph, mask_of, members

__all__ = ["SPNode", "decompose"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)  # identity hash: cheap memo keys
class SPNode:
    """A node of the series-parallel decomposition tree."""

    kind: Literal["leaf", "series", "parallel"]  # how ``children`` compose
    mask: int  # bitset of the graph nodes covered
    children: tuple[SPNode, ...] = ()  # series: in precedence order; parallel: any order
    forced: bool = False  # series made by ordering a non-series-parallel part

    @property
    def leaf_index(self) -> int:
        assert self.kind == "leaf"
        return self.mask.bit_length() - 1

    def count(self) -> int:
        """Number of tree nodes (for logging)."""
        return 1 + sum(c.count() for c in self.children)


def decompose(graph: OpGraph) -> SPNode:
    """Series-parallel decomposition of the whole graph."""
    return _decompose(graph, graph.all_bits)


def _decompose(graph: OpGraph, mask: int) -> SPNode:
    if mask & (mask - 1) == 0:
        return SPNode(kind="leaf", mask=mask)
    parts = _components(mask, lambda i: graph.comparable(i))
    if len(parts) > 1:
        return SPNode(kind="parallel", mask=mask, children=tuple(_decompose(graph, p) for p in parts))
    parts = _components(mask, lambda i: mask & ~graph.comparable(i) & ~(1 << i))
    if len(parts) > 1:
        parts.sort(key=lambda p: p & -p)  # topological indices: earlier part has the lower minimum
        return _series(mask, [_decompose(graph, p) for p in parts], forced=False)
    first, second = _forced_cut(graph, mask)
    log.info("graph part of %d nodes is not series-parallel; ordered at a cut", len(members(mask)))
    return _series(mask, [_decompose(graph, first), _decompose(graph, second)], forced=True)


def _series(mask: int, children: list[SPNode], *, forced: bool) -> SPNode:
    flat: list[SPNode] = []
    for child in children:
        flat.extend(child.children if child.kind == "series" else [child])
    forced = forced or any(c.forced for c in children if c.kind == "series")
    return SPNode(kind="series", mask=mask, children=tuple(flat), forced=forced)


def _components(mask: int, neighbours: Callable[[int], int]) -> list[int]:
    parts = []
    remaining = mask
    while remaining:
        comp = frontier = remaining & -remaining
        while frontier:
            grown = 0
            for i in members(frontier):
                grown |= neighbours(i)
            frontier = grown & mask & ~comp
            comp |= frontier
        parts.append(comp)
        remaining &= ~comp
    return parts


def _forced_cut(graph: OpGraph, mask: int) -> tuple[int, int]:
    """Split ``mask`` into an earlier and a later part between two longest-path levels."""
    level: dict[int, int] = {}
    for v in members(mask):  # ascending index is a topological order
        level[v] = 1 + max((level[u] for u in members(graph.anc[v] & mask)), default=0)
    best: tuple[int, int] | None = None
    for cut in range(1, max(level.values())):
        first = mask_of(v for v, lv in level.items() if lv <= cut)
        second = mask & ~first
        added = sum(bin(second & ~graph.desc[a]).count("1") for a in members(first))
        if best is None or added < best[0]:
            best = (added, first)
    assert best is not None, "a connected, non-series part has at least two levels"
    return best[1], mask & ~best[1]

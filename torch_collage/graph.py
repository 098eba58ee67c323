"""The dataflow graph Collage places: ATen FX nodes in topological order, node sets as ``int`` bitsets.

A *unit* is one ``call_function`` node together with the ``getitem`` nodes that unpack its tuple
output, so a partition never splits a multi-output op from its outputs. Unit ``i`` is bit ``1 << i``.
Ancestor and descendant sets are precomputed, so a convexity check is a few big-int operations.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import fx

__all__ = ["DataflowGraph", "bits", "lowest_bit"]


def bits(mask: int) -> Iterator[int]:
    """Indices of the set bits of ``mask``, ascending."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def lowest_bit(mask: int) -> int:
    """Index of the lowest set bit of a non-zero ``mask``."""
    return (mask & -mask).bit_length() - 1


@dataclass(frozen=True)
class DataflowGraph:
    """Units of an FX graph with predecessor/successor and reachability bitsets."""

    units: tuple[tuple[fx.Node, ...], ...]  # units[i][0] is the op; the rest its getitem users
    preds: tuple[int, ...]  # direct predecessor units
    succs: tuple[int, ...]  # direct successor units
    ancestors: tuple[int, ...]  # all units that reach unit i (excluding i)
    descendants: tuple[int, ...]  # all units reachable from unit i (excluding i)

    @classmethod
    def from_graph(cls, graph: fx.Graph) -> DataflowGraph:
        units = _units(graph)
        index = {node: i for i, unit in enumerate(units) for node in unit}
        preds = [0] * len(units)
        succs = [0] * len(units)
        for i, unit in enumerate(units):
            for node in unit:
                for arg in node.all_input_nodes:
                    j = index.get(arg)
                    if j is not None and j != i:
                        preds[i] |= 1 << j
                        succs[j] |= 1 << i
        ancestors = _closure(preds, range(len(units)))
        descendants = _closure(succs, reversed(range(len(units))))
        return cls(tuple(units), tuple(preds), tuple(succs), tuple(ancestors), tuple(descendants))

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def full(self) -> int:
        return (1 << self.size) - 1

    def is_convex(self, mask: int) -> bool:
        """No unit outside ``mask`` lies on a path between two units inside it."""
        down = up = 0
        for i in bits(mask):
            down |= self.descendants[i]
            up |= self.ancestors[i]
        return (down & up & ~mask) == 0

    def neighbours(self, mask: int) -> int:
        """Units adjacent to ``mask`` (either direction), outside it."""
        out = 0
        for i in bits(mask):
            out |= self.preds[i] | self.succs[i]
        return out & ~mask

    def external_preds(self, mask: int) -> int:
        out = 0
        for i in bits(mask):
            out |= self.preds[i]
        return out & ~mask

    def nodes(self, mask: int) -> list[fx.Node]:
        return [node for i in bits(mask) for node in self.units[i]]

    def names(self, mask: int) -> list[str]:
        return [self.units[i][0].name for i in bits(mask)]


def _units(graph: fx.Graph) -> list[tuple[fx.Node, ...]]:
    units: list[tuple[fx.Node, ...]] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        getitems = tuple(u for u in node.users if u.op == "call_function" and u.target is operator.getitem)
        units.append((node, *getitems))
    return units


def _closure(direct: Sequence[int], order: Iterator[int] | range) -> list[int]:
    """Transitive closure of ``direct`` edges, visiting units so that each one's edges are final first."""
    out = [0] * len(direct)
    for i in order:
        acc = direct[i]
        for j in bits(direct[i]):
            acc |= out[j]
        out[i] = acc
    return out

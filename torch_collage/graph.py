"""The dataflow graph Collage places: ATen FX nodes in topological order, node sets as ``int`` bitsets.

A *unit* is one ``call_function`` node together with the ``getitem`` nodes that unpack its tuple
output, so a partition never splits a multi-output op from its outputs. Unit ``i`` is bit ``1 << i``.
Ancestor and descendant sets are precomputed, so a convexity check is a few big-int operations.
Nodes computed from constants alone are not units; see [Note: constant expressions].
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["DataflowGraph", "bits", "constant_expressions", "find_constant_expressions", "lowest_bit"]


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


# [Note: constant expressions]
# After freezing, an inference graph still computes some values from constants alone on every call:
# the transposed weight ``t(W)`` in front of each ``addmm``, a view of a bias, a causal mask built by
# ``arange``/``gt``. A backend given the whole graph folds them and pre-packs the weights. Were such a
# node a unit of its own, a partition consuming it from another partition would receive ``t(W)`` as
# an *input*, could not pre-pack it, and (ONNX Runtime, OpenVINO) would convert it on every call; the
# partition producing it would copy it out on every call: on gpt2 at batch 8 an OpenVINO partition
# holding the last block's MLP and the head ran 15.1 ms with its transposed weights as inputs and
# 11.3 ms with them as constants. So these nodes are not units: ``extract`` copies the ones a
# partition reads into it, and each backend sees ``addmm(b, x, t(W))`` with ``W`` constant, as in
# the whole graph. They are not folded into new constants before placement either: that made
# whole-graph Inductor and OpenVINO 3-4% slower on gpt2 and bert, whose pattern rewrites expect the
# transpose. Random and mutating ops are never constant expressions, nor are values the graph returns.
_constant_expressions: weakref.WeakKeyDictionary[fx.Graph, frozenset[fx.Node]] = weakref.WeakKeyDictionary()


def constant_expressions(graph: fx.Graph) -> frozenset[fx.Node]:
    """The ``call_function`` nodes of ``graph`` computed from ``get_attr`` constants alone (computed
    once per graph; the graph must not change afterwards). See [Note: constant expressions]."""
    found = _constant_expressions.get(graph)
    if found is None:
        found = find_constant_expressions(graph)
        _constant_expressions[graph] = found
    return found


def find_constant_expressions(graph: fx.Graph) -> frozenset[fx.Node]:
    """``constant_expressions`` computed afresh (for a graph about to change)."""
    consts: set[fx.Node] = set()
    for node in graph.nodes:
        pure = node.target is operator.getitem or (
            isinstance(node.target, torch._ops.OpOverload)
            and not node.target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in node.target.tags
        )
        if (
            node.op == "call_function"
            and pure
            and all(a.op == "get_attr" or a in consts for a in node.all_input_nodes)
            and not any(u.op == "output" for u in node.users)
        ):
            consts.add(node)
    # a multi-output op stays whole (constant only if every getitem of it is), and what it fed
    # then is not constant either
    changed = True
    while changed:
        changed = False
        for node in list(consts):
            if any(a.op != "get_attr" and a not in consts for a in node.all_input_nodes) or any(
                u.target is operator.getitem and u not in consts for u in node.users
            ):
                consts.discard(node)
                changed = True
    return frozenset(consts)


def _units(graph: fx.Graph) -> list[tuple[fx.Node, ...]]:
    units: list[tuple[fx.Node, ...]] = []
    consts = constant_expressions(graph)
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or node in consts:
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

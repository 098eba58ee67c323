"""The operator DAG that the planner partitions.

Nodes are compute operators (a leaf module call or a function such as ``torch.cat``); model inputs are
not nodes (every stage reads the inputs it needs locally). A node's ``inputs`` are the names of the
compute nodes whose outputs it reads. Node sets are Python ``int`` bitsets over the topological index,
so reachability and convexity checks are cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

__all__ = ["OpGraph", "OpNode", "mask_of", "members"]

OpKind = Literal["module", "function", "method"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpNode:
    """One operator of the captured model."""

    name: str  # unique node name (FX node name)
    kind: OpKind = "function"  # what the node calls
    target: str = ""  # module path for "module", qualified function / method name otherwise
    inputs: tuple[str, ...] = ()  # names of producing compute nodes, in first-use order
    is_output: bool = False  # its value is (part of) the model output


def mask_of(indices: Iterable[int]) -> int:
    """Bitset with the given indices set."""
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


def members(mask: int) -> list[int]:
    """Indices set in a bitset, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class OpGraph:
    """A DAG of :class:`OpNode` in topological order, with reachability bitsets."""

    def __init__(self, nodes: Sequence[OpNode]) -> None:
        self.nodes: tuple[OpNode, ...] = tuple(nodes)
        self.index: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.name in self.index:
                raise ValueError(f"duplicate node name {node.name!r}")
            for src in node.inputs:
                if src not in self.index:
                    raise ValueError(f"node {node.name!r} reads {src!r}, which is not an earlier node")
            self.index[node.name] = i
        self.preds: tuple[tuple[int, ...], ...] = tuple(
            tuple(dict.fromkeys(self.index[s] for s in n.inputs)) for n in self.nodes
        )
        succs: list[list[int]] = [[] for _ in self.nodes]
        for v, ps in enumerate(self.preds):
            for p in ps:
                succs[p].append(v)
        self.succs: tuple[tuple[int, ...], ...] = tuple(tuple(s) for s in succs)
        self.desc, self.anc = self._reachability()

    @classmethod
    def from_edges(
        cls, names: Sequence[str], edges: Iterable[tuple[str, str]], outputs: Iterable[str] = ()
    ) -> OpGraph:
        """Build a graph from node names and ``(producer, consumer)`` edges (any order of names)."""
        inputs: dict[str, list[str]] = {n: [] for n in names}
        for src, dst in edges:
            if src not in inputs or dst not in inputs:
                raise ValueError(f"edge {(src, dst)} names an unknown node")
            inputs[dst].append(src)
        order = _topological(list(names), inputs)
        outs = set(outputs) or {n for n in names if all(n not in v for v in inputs.values())}
        return cls([OpNode(name=n, inputs=tuple(inputs[n]), is_output=n in outs) for n in order])

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def all_bits(self) -> int:
        return (1 << len(self.nodes)) - 1

    def comparable(self, i: int) -> int:
        """Bitset of nodes that reach ``i`` or are reached from it (``i`` excluded)."""
        return self.desc[i] | self.anc[i]

    def is_convex(self, mask: int) -> bool:
        """True when no path leaves ``mask`` and comes back into it."""
        outside_between = 0
        for i in members(mask):
            outside_between |= self.desc[i] & ~mask
        reach_back = 0
        for j in members(outside_between):
            reach_back |= self.desc[j]
        return reach_back & mask == 0

    def _reachability(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = len(self.nodes)
        desc = [0] * n
        for v in range(n - 1, -1, -1):
            for s in self.succs[v]:
                desc[v] |= desc[s] | (1 << s)
        anc = [0] * n
        for v in range(n):
            for p in self.preds[v]:
                anc[v] |= anc[p] | (1 << p)
        return tuple(desc), tuple(anc)


def _topological(names: list[str], inputs: dict[str, list[str]]) -> list[str]:
    placed: set[str] = set()
    order: list[str] = []
    pending = list(names)
    while pending:
        ready = [n for n in pending if all(s in placed for s in inputs[n])]
        if not ready:
            raise ValueError(f"the edges form a cycle through {sorted(pending)[:5]}")
        for n in ready:
            placed.add(n)
            order.append(n)
        pending = [n for n in pending if n not in placed]
    return order

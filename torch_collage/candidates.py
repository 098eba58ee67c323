"""Candidate subgraphs: per backend, the convex connected unit sets it supports, along its fusion style.

Every candidate is indexed by its lowest unit, because the search only ever expands candidates whose
lowest unit is the lowest uncovered one (see ``search.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from torch_collage.backends.base import BackendSpec, op_name
from torch_collage.graph import DataflowGraph, bits, lowest_bit

__all__ = ["Candidate", "enumerate_candidates", "is_elementwise", "supported_mask"]


@dataclass(frozen=True, order=True)
class Candidate:
    """Units ``mask`` of the graph, run as one compiled subgraph on ``backend``."""

    mask: int
    backend: str

    @property
    def lowest(self) -> int:
        return lowest_bit(self.mask)

    @property
    def size(self) -> int:
        return self.mask.bit_count()


def is_elementwise(node: fx.Node) -> bool:
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


def enumerate_candidates(
    graph: DataflowGraph, specs: Sequence[BackendSpec], max_depth: int
) -> list[Candidate]:
    """All candidates of all ``specs``: singletons always, unions up to each backend's depth."""
    out: list[Candidate] = []
    for spec in specs:
        supported = supported_mask(graph, spec)
        depth = 1 if spec.fusion == "single" else (spec.max_depth or max_depth)
        growable = supported
        if spec.fusion == "elementwise_epilogue":
            growable = sum(1 << i for i in bits(supported) if is_elementwise(graph.units[i][0]))
        masks = {m for seed in bits(supported) for m in _grow(graph, seed, growable, depth)}
        masks |= _pattern_matches(graph, spec.patterns, supported)
        out.extend(Candidate(m, spec.name) for m in sorted(masks))
    return out


def _pattern_matches(graph: DataflowGraph, patterns: Sequence[tuple[str, ...]], supported: int) -> set[int]:
    """Chains of units whose ops spell a pattern, each feeding only the next (any length)."""
    found = set()
    for pattern in patterns:
        for start in bits(supported):
            mask = _match_chain(graph, start, pattern, supported)
            if mask and graph.is_convex(mask):
                found.add(mask)
    return found


def _match_chain(graph: DataflowGraph, unit: int, pattern: tuple[str, ...], supported: int) -> int:
    mask = 0
    for k, op in enumerate(pattern):
        if not supported >> unit & 1 or op_name(graph.units[unit][0]) != op:
            return 0
        mask |= 1 << unit
        if k + 1 < len(pattern):
            nxt = list(bits(graph.succs[unit]))
            if len(nxt) != 1:
                return 0
            unit = nxt[0]
    return mask


def supported_mask(graph: DataflowGraph, spec: BackendSpec) -> int:
    """The units whose op ``spec`` supports, as a bitset."""
    return sum(1 << i for i, unit in enumerate(graph.units) if spec.supports_node(unit[0]))


def _grow(graph: DataflowGraph, seed: int, allowed: int, depth: int) -> list[int]:
    """Connected sets with lowest unit ``seed``, other units from ``allowed``, at most ``depth`` units;
    only the convex ones are returned (a non-convex set may still grow into a convex one)."""
    above = ~((1 << (seed + 1)) - 1)
    level = {1 << seed}
    seen = set(level)
    for _ in range(depth - 1):
        nxt = set()
        for mask in level:
            for j in bits(graph.neighbours(mask) & allowed & above):
                grown = mask | (1 << j)
                if grown not in seen:
                    seen.add(grown)
                    nxt.add(grown)
        level = nxt
    return sorted((m for m in seen if graph.is_convex(m)), key=lambda m: (m.bit_count(), m))

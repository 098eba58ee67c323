"""End-to-end timing of assembled placements, cached like candidate costs; see [Note: end-to-end check]
in ``place.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torch_collage.assembly import AssembledGraph
from torch_collage.cache import CachedCost
from torch_collage.cost import CostModel
from torch_collage.graph import DataflowGraph
from torch_collage.search import Placement
from torch_collage.subgraph import digest, tensor_signature

__all__ = ["e2e_many_ms", "e2e_ms"]


Assemble = Callable[[], AssembledGraph]  # builds (compiles) the placement only when it must be timed


def e2e_ms(model: CostModel, placement: Placement, assemble: Assemble, graph: DataflowGraph) -> float:
    """End-to-end median ms of the assembled ``placement`` (cached by graph, inputs and placement)."""
    return e2e_many_ms(model, graph, [(placement, assemble)])[0]


def e2e_many_ms(
    model: CostModel, graph: DataflowGraph, items: Sequence[tuple[Placement, Assemble]], rounds: int = 2
) -> list[float]:
    """End-to-end median ms of each assembled placement; uncached ones are timed alternating over
    ``rounds`` rounds in rotated order (the best round counts), so they see the same machine state."""
    placeholders = [n for n in model.gm.graph.nodes if n.op == "placeholder"]
    args = [model.values[n] for n in placeholders]
    keys = [_e2e_key(model, graph, p, args) for p, _ in items]
    cached = [model.cache.get(k) for k in keys]
    built = {i: items[i][1]() for i, c in enumerate(cached) if c is None}
    samples: dict[int, list[float]] = {i: [] for i in built}
    order = list(built)
    for r in range(rounds if order else 0):
        k = r % len(order)  # the order rotates: none is always first after the previous compile
        for i in order[k:] + order[:k]:
            samples[i].append(model.time_call(functools.partial(_call, built[i], args)))
    out = []
    for i, (key, hit) in enumerate(zip(keys, cached)):
        if hit is None:
            hit = CachedCost(min(samples[i]), "")
            model.cache.put(key, hit)
        out.append(hit.ms)
    return out


def _call(assembled: AssembledGraph, args: Sequence[Any]) -> Any:
    return assembled(*args)


def _e2e_key(model: CostModel, graph: DataflowGraph, placement: Placement, args: Sequence[Any]) -> str:
    versions = ",".join(f"{b}={model.versions[b]}" for b in placement.backends)
    return digest(
        "e2e",
        str(model.gm.graph),
        tensor_signature(args),
        placement.describe(graph),
        versions,
        str(model.threads),
    )

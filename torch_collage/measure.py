"""Which candidates are measured, in what order, under the time budget; and the measured merging of
the searched cover's same-backend runs. Every cost comes from the ``CostModel`` (cached, persistent).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from torch_collage.candidates import Candidate
from torch_collage.cost import CostModel
from torch_collage.graph import DataflowGraph
from torch_collage.search import Partition, Placement, merge_groups, merge_run
from torch_collage.subgraph import digest, tensor_signature

__all__ = [
    "UnplaceableGraph",
    "check_coverable",
    "measure_candidates",
    "merge_measured",
    "remeasure",
    "search_key",
    "with_whole_graphs",
]

logger = logging.getLogger(__name__)

Costs = dict[Candidate, float]


def with_whole_graphs(graph: DataflowGraph, cands: list[Candidate], model: CostModel) -> list[Candidate]:
    """``cands`` plus the whole graph on every backend that supports all of it (the single-backend
    placements are always among the contenders)."""
    have = set(cands)
    for name, spec in model.specs.items():
        whole = Candidate(graph.full, name)
        if whole not in have and all(spec.supports_node(u[0]) for u in graph.units):
            cands.append(whole)
    return cands


def measure_candidates(cands: list[Candidate], model: CostModel, coarse: set[Candidate]) -> Costs:
    """Cost of every candidate: whole graphs first (the single-backend placements must always be
    known), then eager singletons (they keep a cover reachable), then the ``coarse`` segments (a few
    per backend, asked for by option ``segments``: [Note: coarse segments]), then the rest smallest
    first. Past the time budget or ``max_candidates`` only the first three groups are still measured
    (on bert at batch 8 the eager singletons alone took a 60 s budget).

    [Note: a budget-cut search replays its cut]
    A warm compile measures nothing, so it is faster than the cold one and would get further within
    the same budget. Where the budget cut a cold search short, the index it stopped at is cached, and
    a warm one stops at the same candidate, so it finds every cost it needs in the cache."""
    options, full = model.options, model.graph.full
    order = sorted(cands, key=lambda c: (c.mask != full, not _essential(c), c not in coarse, c.size, c.mask))
    key = search_key(model, "measure", f"{options.time_budget_s}:{options.max_candidates}:{len(order)}")
    stored = model.cache.get_text(key)
    limit = int(stored) if stored is not None and stored.isdigit() else None
    deadline = time.perf_counter() + options.time_budget_s
    costs: Costs = {}
    reached = len(order)
    with _progress(len(order), options.progress) as bar:
        for i, cand in enumerate(order):
            essential = cand.mask == full or _essential(cand) or cand in coarse
            within = i < limit if limit is not None else time.perf_counter() < deadline
            if reached == len(order) and not within:
                reached = i
            if essential or (within and i < options.max_candidates):
                costs[cand] = model.cost(cand)
            bar.update(1)
    if limit is None:
        model.cache.put_text(key, str(reached))
    return costs


class UnplaceableGraph(RuntimeError):
    """No backend could run some node of the graph, not even eager; the message names it and why."""


def check_coverable(graph: DataflowGraph, costs: Costs, model: CostModel) -> None:
    """Raise ``UnplaceableGraph`` naming the first node that no measured candidate covers, with each
    backend's reason for it, instead of letting the search fail without saying where."""
    covered = 0
    for cand, ms in costs.items():
        if math.isfinite(ms):
            covered |= cand.mask
    missing = graph.full & ~covered
    if not missing:
        return
    unit = (missing & -missing).bit_length() - 1
    node = graph.units[unit][0]
    reasons = {b: r for (mask, b), r in model.reasons.items() if mask >> unit & 1}
    why = "; ".join(f"{b}: {r}" for b, r in sorted(reasons.items())) or "no backend supports it"
    raise UnplaceableGraph(
        f"torch_collage cannot place node {node.name!r} ({node.op} {node.target}) on any backend: {why}"
    )


def _essential(cand: Candidate) -> bool:
    return cand.backend == "eager" and cand.size == 1


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="collage: measuring candidates", disable=not enabled or total < 50)


def merge_measured(placement: Placement, graph: DataflowGraph, model: Any, costs: Costs) -> Placement:
    """The searched cover with each run of touching same-backend partitions merged into one region,
    where that region measures no slower than its parts (``model``: ``cost`` and ``switch_cost``).

    [Note: merged regions are measured]
    Merging the cover's consecutive same-backend partitions saves calls and lets the backend fuse
    across them, but a merged region is a new subgraph with a cost of its own, and it can be slower
    than its parts summed: on dlrm with 4 segments two OpenVINO segments beat ONNX Runtime's whole
    graph, while merged they were OpenVINO's whole graph, 8.85 ms against ONNX Runtime's 7.74 ms.
    Each merged region is therefore measured and kept only where it is no slower than the sum of
    its parts; otherwise, or where it fails to compile, the parts stay separate partitions run one
    after the other on the same backend."""
    parts: list[Partition] = []
    for group in merge_groups(placement, graph):
        if len(group) == 1:
            parts.append(group[0])
            continue
        run = merge_run(group)  # priced as the sum of its parts
        cand = Candidate(run.mask, run.backend)
        if cand not in costs:
            costs[cand] = model.cost(cand)
        if costs[cand] <= run.cost_ms:
            parts.append(Partition(run.mask, run.backend, costs[cand]))
        else:
            logger.debug(  # eager's runs of a few ops are kept apart often, for microseconds
                "torch_collage: %s region of %d partitions kept apart: %.3f ms merged, %.3f ms apart",
                cand.backend, len(group), costs[cand], run.cost_ms,
            )  # fmt: skip
            parts.extend(group)
    return Placement.priced(parts, model.switch_cost)


def remeasure(placement: Placement, model: CostModel, costs: Costs) -> Placement:
    """``placement`` priced with each partition's measured cost ([Note: refined regions are measured]
    in refine.py); a partition that fails alone keeps its predicted cost."""
    parts = []
    for p in placement.partitions:
        cand = Candidate(p.mask, p.backend)
        if cand not in costs:
            costs[cand] = model.cost(cand)
        cost = costs[cand] if math.isfinite(costs[cand]) else p.cost_ms
        parts.append(Partition(p.mask, p.backend, cost))
    return Placement.priced(parts, model.switch_cost)


def search_key(model: CostModel, *parts: str) -> str:
    """Cache key of a budgeted search step: the graph, its inputs, the backends, threads and ``parts``."""
    args = [model.values[n] for n in model.gm.graph.nodes if n.op == "placeholder"]
    backends = ",".join(f"{b}={model.versions[b]}" for b in sorted(model.specs))
    return digest("search", str(model.gm.graph), tensor_signature(args), backends, str(model.threads), *parts)

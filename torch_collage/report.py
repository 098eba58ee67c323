"""What a placement decided and measured, per graph and per partition (data for ``explain``), and how
the placer builds it (``graph_report``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch_collage.candidates import Candidate
from torch_collage.graph import DataflowGraph, bits
from torch_collage.search import Partition, Placement, merge_eager_runs
from torch_collage.segments import consecutive_segments
from torch_collage.timing import Budget

__all__ = ["GraphReport", "PartitionReport", "SegmentReport", "graph_report"]


@dataclass(frozen=True)
class PartitionReport:
    backend: str
    nodes: list[str]  # FX node names of the ATen ops it runs
    measured_ms: float  # its own measured median time
    runner_up: str | None  # the next-best backend measured for the same nodes, if any
    runner_up_ms: float | None = None


@dataclass(frozen=True)
class SegmentReport:
    """One consecutive interval of the graph's ops with each backend's measured time for all of it
    (option ``segments``; [Note: coarse segments])."""

    first: str  # FX name of its first op
    last: str  # FX name of its last op
    units: int  # ops it holds (an op and the getitems unpacking it count once)
    ms: dict[str, float]  # backend -> measured median time of the interval alone

    @property
    def best(self) -> str | None:
        return min(self.ms, key=lambda b: self.ms[b]) if self.ms else None


@dataclass(frozen=True)
class GraphReport:
    """One placed FX graph (forward, backward or inference)."""

    kind: str  # "forward", "backward" or "inference"
    partitions: list[PartitionReport]
    edges: list[tuple[int, int]]  # partition i feeds partition j
    predicted_ms: float  # sum of partition and switch costs
    measured_ms: float  # the chosen assembled graph, end to end
    single_backend_ms: dict[str, float]  # each backend running the whole graph (inf: it could not)
    chosen: str  # "mixed", the single backend chosen, or "<backend> (nearly whole)"
    candidates: int  # candidates considered
    measured: int  # timings run (0 on a warm cache)
    search_s: float  # wall-clock seconds placing this graph
    rejected: dict[str, str] = field(default_factory=dict)  # "backend: nodes" -> why
    usable: dict[str, int] = field(default_factory=dict)  # backend -> candidates it ran correctly
    loaded: int = 0  # partitions loaded from the compiled cache instead of compiled
    searched: str = ""  # the searched placement before the end-to-end check: "backend[ops] ..."
    searched_ms: float = float("nan")  # its predicted time (sum of partition and switch costs)
    segments: list[SegmentReport] = field(default_factory=list)  # option ``segments``; else empty
    # the end-to-end check's contenders ("mixed" for a searched mixed placement) -> ms, timed side by
    # side and compared paired ([Note: end-to-end check] in choose.py; a warm compile replays the
    # cached comparison); empty when the searched placement had no contender
    end_to_end_ms: dict[str, float] = field(default_factory=dict)
    # backend -> why its whole graph failed (compile error or mismatch, the backend's whole message)
    whole_graph_failures: dict[str, str] = field(default_factory=dict)
    # timings taken under interference: used for this search only ([Note: quiet measurements] in timing.py)
    noisy: int = 0
    budget_s: float = float("inf")  # option time_budget_s ([Note: the compile budget] in timing.py)
    # what was not measured within the budget, by kind ("whole graph on inductor", "candidates",
    # "merged regions", "end-to-end rounds", ...) -> how many; empty when nothing was left out
    unmeasured: dict[str, int] = field(default_factory=dict)
    # candidates not measured because their bound showed they could not win ([Note: candidates
    # worth measuring] in measure.py)
    pruned: int = 0
    # a warm compile's re-check of its cached choice: "agreed", "ignored: ..." or "contradicted: ..."
    # (then measured again); empty when the compile measured anything ([Note: quiet measurements])
    recheck: str = ""
    recheck_ms: dict[str, float] = field(default_factory=dict)  # the re-check's times, side by side
    # a graph with symbolic shapes: the sizes' ranges this placement covers and the size it was
    # measured at ([Note: shape ranges] in shapes.py); empty for static shapes
    shape_range: str = ""
    # a graph with symbolic sizes placed like the graph of the same structure placed before: that
    # graph's input sizes ([Note: a graph generalised to a range is placed like the graph it came
    # from] in place.py); empty when this graph was searched
    placed_like: str = ""
    # the exact rewrites made before placing, by kind -> count ([Note: rewrites before placing] in
    # rewrite.py); empty when none applied
    rewrites: dict[str, int] = field(default_factory=dict)


def graph_report(
    *,
    kind: str,
    graph: DataflowGraph,
    searched: Placement,
    chosen: str,
    measured_ms: float,
    singles: dict[str, float],
    costs: dict[Candidate, float],
    candidates: int,
    measured: int,
    search_s: float,
    rejected: dict[tuple[int, str], str],
    loaded: int,
    segments: int,
    compared: dict[str, float],
    noisy: int = 0,
    budget: Budget | None = None,
    recheck: str = "",
    recheck_ms: dict[str, float] | None = None,
    ran: Placement | None = None,
) -> GraphReport:
    """The report of one placed graph: the ``searched`` placement, and what the end-to-end check
    ``chosen`` (``"mixed"``: the searched one; a backend's name: its whole graph; ``"<backend> (nearly
    whole)"``: ``ran``, that backend's nearly whole graph with eager around it)."""
    placement = merge_eager_runs(searched)  # as assembled: [Note: eager runs are one partition]
    if chosen != "mixed" and chosen not in singles and ran is not None:  # a nearly whole graph won
        placement = merge_eager_runs(ran)
    elif chosen != "mixed":  # a single backend won (end to end, or as the verification fallback)
        ms = singles.get(chosen, measured_ms)
        placement = Placement((Partition(graph.full, chosen, ms),), ms)
    owner = {i: k for k, p in enumerate(placement.partitions) for i in bits(p.mask)}
    edges = {(owner[j], owner[i]) for i in owner for j in bits(graph.preds[i]) if owner[j] != owner[i]}
    usable: dict[str, int] = {}
    for cand, ms in costs.items():
        usable[cand.backend] = usable.get(cand.backend, 0) + int(math.isfinite(ms))
    return GraphReport(
        kind=kind,
        partitions=[_partition_report(graph, p, costs) for p in placement.partitions],
        edges=sorted(edges),
        predicted_ms=placement.predicted_ms,
        measured_ms=measured_ms,
        single_backend_ms=singles,
        chosen=chosen,
        candidates=candidates,
        measured=measured,
        search_s=search_s,
        rejected={f"{b}: {','.join(graph.names(m))}": r for (m, b), r in rejected.items()},
        usable=usable,
        loaded=loaded,
        searched=" ".join(f"{p.backend}[{p.mask.bit_count()}]" for p in searched.partitions),
        searched_ms=searched.predicted_ms,
        segments=_segment_reports(graph, segments, costs),
        end_to_end_ms=compared,
        whole_graph_failures={b: r for (m, b), r in rejected.items() if m == graph.full},
        noisy=noisy,
        budget_s=budget.seconds if budget is not None else float("inf"),
        unmeasured={k: n for k, n in (budget.skipped if budget else {}).items() if k != "certain losers"},
        pruned=budget.skipped.get("certain losers", 0) if budget else 0,
        recheck=recheck,
        recheck_ms=dict(recheck_ms or {}),
    )


def _segment_reports(
    graph: DataflowGraph, n_segments: int, costs: dict[Candidate, float]
) -> list[SegmentReport]:
    """Each consecutive segment's measured time per backend ([Note: coarse segments]); none when off."""
    if n_segments < 2 or graph.size < 2:
        return []
    out = []
    for mask in consecutive_segments(graph, n_segments):
        ms = {c.backend: t for c, t in costs.items() if c.mask == mask and math.isfinite(t)}
        names = graph.names(mask)
        out.append(SegmentReport(names[0], names[-1], len(names), dict(sorted(ms.items()))))
    return out


def _partition_report(graph: DataflowGraph, p: Partition, costs: dict[Candidate, float]) -> PartitionReport:
    others = {c.backend: ms for c, ms in costs.items() if c.mask == p.mask and c.backend != p.backend}
    others = {b: ms for b, ms in others.items() if math.isfinite(ms)}
    runner = min(others, key=lambda b: others[b]) if others else None
    nodes = [n.name for n in graph.nodes(p.mask)]
    return PartitionReport(p.backend, nodes, p.cost_ms, runner, others.get(runner) if runner else None)

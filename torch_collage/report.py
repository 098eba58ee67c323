"""What a placement decided and measured, per graph and per partition (data for ``explain``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GraphReport", "PartitionReport", "SegmentReport"]


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
    chosen: str  # "mixed" or the single backend chosen
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
    # side and compared paired ([Note: end-to-end check] in place.py; a warm compile replays the cached
    # comparison); empty when the searched placement had no contender
    end_to_end_ms: dict[str, float] = field(default_factory=dict)

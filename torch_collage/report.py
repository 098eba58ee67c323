"""What a placement decided and measured, per graph and per partition (data for ``explain``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GraphReport", "PartitionReport"]


@dataclass(frozen=True)
class PartitionReport:
    backend: str
    nodes: list[str]  # FX node names of the ATen ops it runs
    measured_ms: float  # its own measured median time
    runner_up: str | None  # the next-best backend measured for the same nodes, if any
    runner_up_ms: float | None = None


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

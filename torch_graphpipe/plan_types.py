"""What the planner returns: :class:`Plan` (stages, edges, costs and the schedule) and :class:`StagePlan`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch_graphpipe.profile import CommModel
from torch_graphpipe.schedule import Schedule
from torch_graphpipe.simulator import SimulationResult, action_costs, simulate
from torch_graphpipe.stage_cost import StageCost

__all__ = ["Plan", "ScheduleKind", "StageGraphKind", "StagePlan", "short_names"]

StageGraphKind = Literal["dag", "chain"]
ScheduleKind = Literal["1f1b", "zero_bubble"]  # see [Note: DAG 1F1B], [Note: zero-bubble DAG schedule]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One stage of a plan."""

    index: int  # position in the topological order of the stage DAG (the rank that runs it)
    node_names: tuple[str, ...]  # operators, topological order
    module_names: tuple[str, ...]  # qualified names of the leaf modules it calls
    cost: StageCost  # per micro-batch
    in_flight: int  # micro-batches it holds at most (stages on its longest path to a sink)
    late_pred: int | None = None  # the predecessor it is split at (see [Note: late inputs]), if any
    late_node_names: tuple[str, ...] = ()  # its operators that depend on the late predecessor's values
    late_cost: StageCost | None = None  # their cost (a share of ``cost``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A stage graph, its costs and its schedule."""

    stages: tuple[StagePlan, ...]  # in topological order
    edges: tuple[tuple[int, int], ...]  # stage DAG edges (producer, consumer)
    edge_bytes: tuple[int, ...]  # bytes per micro-batch on each edge
    stage_graph: StageGraphKind  # "dag" or "chain"
    num_microbatches: int  # micro-batches per step
    microbatch_size: int  # samples per micro-batch
    comm: CommModel  # communication model used for planning and simulation
    schedule: Schedule  # DAG 1F1B or zero-bubble schedule
    bottleneck_ms: float  # slowest stage's time per micro-batch (compute + communication)
    planning_time_s: float  # wall time of partitioning and scheduling
    peak_bytes: tuple[float, ...] = ()  # per stage, predicted peak memory (see [Note: held activations])
    memory_budget_bytes: float | None = None  # the per-device budget it was planned for
    margin: float = 0.0  # relative cost uncertainty it was chosen under (see [Note: plans that reproduce])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def time_per_sample_ms(self) -> float:
        return self.bottleneck_ms / self.microbatch_size

    def simulate(self) -> SimulationResult:
        """Discrete-event simulation of one step with the plan's costs (milliseconds)."""
        delay = {e: self.comm.time_ms(b) for e, b in zip(self.edges, self.edge_bytes)}
        fwd = [s.cost.fwd_ms for s in self.stages]
        bwd = [s.cost.bwd_ms for s in self.stages]
        return simulate(self.schedule, fwd, bwd, delay, self.late_cost(), wgt=self.wgt_cost())

    def action_costs(self) -> dict[tuple[int, str], float]:
        """``{(stage, kind): ms}`` of every compute action, as :meth:`simulate` charges them."""
        fwd = [s.cost.fwd_ms for s in self.stages]
        bwd = [s.cost.bwd_ms for s in self.stages]
        return action_costs(self.schedule, fwd, bwd, self.late_cost(), self.wgt_cost())

    @property
    def schedule_kind(self) -> ScheduleKind:
        """``"zero_bubble"`` when the schedule splits backwards into ``B`` and ``W``, else ``"1f1b"``."""
        return "zero_bubble" if any(a.kind == "W" for p in self.schedule.programs for a in p) else "1f1b"

    def wgt_cost(self) -> list[float]:
        """Per stage, the weight-gradient share of its backward (the ``W`` actions of a zero-bubble schedule)."""
        return [s.cost.wgt_ms for s in self.stages]

    def late_cost(self, overrun_ms: float = 0.0) -> dict[int, tuple[float, float]]:
        """``{stage: (forward, backward) ms of its late part}`` for :func:`simulate` (plus ``overrun_ms``)."""
        return {
            s.index: (s.late_cost.fwd_ms + overrun_ms, s.late_cost.bwd_ms + overrun_ms)
            for s in self.stages
            if s.late_cost is not None
        }

    def __str__(self) -> str:
        lines = [
            f"Plan: {self.num_stages} stages ({self.stage_graph}, {self.schedule_kind} schedule), "
            f"{self.num_microbatches} micro-batches of {self.microbatch_size}, bottleneck {self.bottleneck_ms:.4g} ms/micro-batch",
            f"edges: {', '.join(f'{a}->{b}' for a, b in self.edges) or 'none'}",
        ]
        if self.memory_budget_bytes is not None:
            lines.append(f"memory budget {self.memory_budget_bytes / 1e6:.4g} MB per device")
        if self.margin > 0:
            lines.append(
                f"planned with costs known to +-{self.margin:.1%} per stage (plans closer count as equal)"
            )
        for s in self.stages:
            peak = f", peak {self.peak_bytes[s.index] / 1e6:.4g} MB" if self.peak_bytes else ""
            lines.append(
                f"  stage {s.index}: {len(s.node_names)} ops, {s.cost.time_ms:.4g} ms, "
                f"in-flight {s.in_flight}{peak}, modules {short_names(s.module_names)}"
                + (f", late input from stage {s.late_pred}" if s.late_pred is not None else "")
            )
        return "\n".join(lines)


def short_names(names: tuple[str, ...], limit: int = 4) -> str:
    """The first ``limit`` names, and how many there are when there are more."""
    if len(names) <= limit:
        return ", ".join(names) or "-"
    return f"{', '.join(names[:limit])}, ... ({len(names)} modules)"

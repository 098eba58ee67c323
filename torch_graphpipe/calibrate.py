"""Calibrating the simulator on a traced step: fit three numbers, simulate with them, read a trace.

A trace is what ``StageRuntime.events`` records during one step: per stage, its compute actions as
``(kind, microbatch, start, end)`` in seconds of one clock (``time.perf_counter`` on one machine).

[Note: calibrated simulation]
The simulator is given the planned costs and the message latency measured between two idle
processes. Under emulation (8 stage processes sharing 2 cores, see benchmarks/bench_graphpipe.py)
every action overruns its cost a little and a message takes longer than between idle processes;
measured steps came out 1.02-1.18x the simulation. :func:`fit_calibration` fits three numbers on
one traced step of a plan without split stages (the chain plan): the median overrun per compute
action; the median time a send or receive occupies its stage (the gap between two computations on
a stage whose messages had already arrived, per message posted in between), which matters where a
stage exchanges several messages per micro-batch (DAG plans); and the message latency (the median
wait from a producer finishing to its waiting consumer starting, less one send and one receive).
:func:`simulate_calibrated` then simulates any plan with them (out of sample for the DAG plans).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from torch_graphpipe.action import Action
from torch_graphpipe.planner import Plan
from torch_graphpipe.simulator import SimulationResult, TimelineEntry, simulate

__all__ = ["Calibration", "Trace", "fit_calibration", "simulate_calibrated", "traced_result"]

Trace = Sequence[Sequence[tuple[str, int, float, float]]]  # per stage: (kind, micro-batch, start s, end s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """What a real step adds to the plan's costs; see [Note: calibrated simulation]."""

    overrun_ms: float = 0.0  # time a compute action takes beyond its planned cost
    message_ms: float = 0.0  # time a send or a receive occupies its own stage
    latency_ms: float = 0.0  # time a message is in flight

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"{field.name} must be >= 0, got {getattr(self, field.name)}")


def fit_calibration(trace: Trace, plan: Plan) -> Calibration:
    """Fit a :class:`Calibration` on one traced step of ``plan`` (a plan without split stages)."""
    _check_trace(trace, plan)
    ends = {(stage, kind, m): end for stage, row in enumerate(trace) for kind, m, _, end in row}
    overruns, waits, per_message = [], [], []
    for stage, row in enumerate(trace):
        cost = plan.stages[stage].cost
        between = _messages_between_computes(plan.schedule.programs[stage])
        prev_end = None
        for i, (kind, m, start, end) in enumerate(row):
            overruns.append((end - start) * 1e3 - (cost.fwd_ms if kind == "F" else cost.bwd_ms))
            known = [d for d in _producer_ends(plan, ends, stage, kind, m) if d is not None]
            if known and (prev_end is None or prev_end <= max(known)):  # it was waiting for the message
                waits.append((start - max(known)) * 1e3)
            elif prev_end is not None and between[i]:  # busy with its own messages only
                per_message.append((start - prev_end) * 1e3 / between[i])
            prev_end = end
    message_ms = max(0.0, statistics.median(per_message)) if per_message else 0.0
    latency = max(0.0, statistics.median(waits) - 2 * message_ms) if waits else 0.0
    return Calibration(
        overrun_ms=max(0.0, statistics.median(overruns)), message_ms=message_ms, latency_ms=latency
    )


def simulate_calibrated(plan: Plan, calibration: Calibration) -> SimulationResult:
    """Simulate ``plan`` with every compute action ``overrun_ms`` longer (a split stage runs two per
    direction, a zero-bubble stage a ``W`` too), ``message_ms`` per send and receive on its stage and ``latency_ms`` per message."""
    over = calibration.overrun_ms
    actions = [2 if s.late_cost is not None else 1 for s in plan.stages]
    split = [any(a.kind == "W" for a in prog) for prog in plan.schedule.programs]  # a zero-bubble stage
    fwd = [s.cost.fwd_ms + n * over for s, n in zip(plan.stages, actions)]
    bwd = [s.cost.bwd_ms + (n + w) * over for s, n, w in zip(plan.stages, actions, split)]
    wgt = [s.cost.wgt_ms + w * over for s, w in zip(plan.stages, split)]
    delay = dict.fromkeys(plan.edges, calibration.latency_ms)
    return simulate(
        plan.schedule, fwd, bwd, delay, plan.late_cost(over), message_cost=calibration.message_ms, wgt=wgt
    )


def traced_result(trace: Trace) -> SimulationResult:
    """A traced step as a :class:`SimulationResult` (milliseconds from its first action)."""
    t0 = min((e[2] for row in trace for e in row), default=0.0)
    timeline, peaks = [], []
    for stage, row in enumerate(trace):
        timeline.append(tuple(
            TimelineEntry(stage=stage, kind=k, microbatch=m, start=(s - t0) * 1e3, end=(e - t0) * 1e3)
            for k, m, s, e in row
        ))  # fmt: skip
        live = peak = 0
        release = "W" if any(kind == "W" for kind, *_ in row) else "B"  # a zero-bubble stage holds until W
        for kind, *_ in row:
            live += 1 if kind == "F" else -1 if kind == release else 0  # FL / BL: part of one micro-batch
            peak = max(peak, live)
        peaks.append(peak)
    total = max((e.end for row in timeline for e in row), default=0.0)
    busy = sum(e.end - e.start for row in timeline for e in row)
    return SimulationResult(
        iteration_time=total,
        bubble_fraction=0.0 if total <= 0 else 1 - busy / (len(timeline) * total),
        peak_in_flight=tuple(peaks),
        timeline=tuple(timeline),
    )


def _check_trace(trace: Trace, plan: Plan) -> None:
    if plan.schedule.late:
        raise ValueError(
            f"fit_calibration needs a plan without split stages (e.g. a chain plan), got late inputs "
            f"{list(plan.schedule.late)}"
        )
    if len(trace) != plan.num_stages:
        raise ValueError(f"trace has {len(trace)} stages, the plan {plan.num_stages}")
    for stage, row in enumerate(trace):
        computes = sum(1 for a in plan.schedule.programs[stage] if a.is_compute)
        if len(row) != computes:
            raise ValueError(f"trace of stage {stage} has {len(row)} compute actions, its program {computes}")


def _producer_ends(
    plan: Plan, ends: dict[tuple[int, str, int], float], stage: int, kind: str, m: int
) -> list[float | None]:
    """When the stages whose messages ``stage`` needs before ``kind`` of micro-batch ``m`` finished."""
    if kind == "F":
        return [ends.get((src, "F", m)) for src, dst in plan.edges if dst == stage]
    return [ends.get((dst, "B", m)) for src, dst in plan.edges if src == stage]


def _messages_between_computes(program: Sequence[Action]) -> list[int]:
    """For each compute action of a stage program, the sends and receives since the previous one."""
    counts, n = [], 0
    for a in program:
        if a.is_compute:
            counts.append(n)
            n = 0
        else:
            n += 1
    return counts

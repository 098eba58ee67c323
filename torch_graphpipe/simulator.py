"""Discrete-event simulation of a :class:`Schedule`.

Every stage runs its program in order on its own device. A forward or backward occupies the stage
for its cost; a send does not block the sender and its message arrives ``edge_delay`` later; a
receive waits for that arrival. Times are in the unit of the costs given (milliseconds for plans).
On a stage split at a late input (see [Note: late inputs]) ``FL`` and ``BL`` cost that stage's late
part and ``F`` and ``B`` the rest. ``message_cost`` is the time a send or a receive occupies its own
stage (packing, posting, unpacking), on top of the message's ``edge_delay`` in flight. A stage that
runs ``W`` actions (see [Note: zero-bubble DAG schedule]) spends ``wgt`` of its backward cost in them
and the rest in ``B`` (and ``BL``); its micro-batches stay in flight until their ``W``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from torch_graphpipe.action import Action
from torch_graphpipe.schedule import Schedule, ScheduleError

__all__ = ["SimulationResult", "TimelineEntry", "action_costs", "simulate"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimelineEntry:
    """One forward or backward box of the timeline."""

    stage: int  # stage index
    kind: str  # "F" or "B" ("FL" / "BL": the late part of a split stage; "W": weight gradients)
    microbatch: int  # micro-batch index
    start: float  # start time
    end: float  # end time


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """Outcome of one simulated training step."""

    iteration_time: float  # time until the last stage finishes its last action
    bubble_fraction: float  # idle share of all stages' time in [0, 1)
    peak_in_flight: tuple[int, ...]  # per stage, most micro-batches forwarded but not yet backwarded (W'd)
    timeline: tuple[tuple[TimelineEntry, ...], ...]  # per stage, compute boxes in time order

    def busy_time(self, stage: int) -> float:
        return sum(e.end - e.start for e in self.timeline[stage])


def simulate(
    schedule: Schedule,
    fwd: Sequence[float],
    bwd: Sequence[float],
    edge_delay: Mapping[tuple[int, int], float] | None = None,
    late_cost: Mapping[int, tuple[float, float]] | None = None,
    message_cost: float = 0.0,
    wgt: Sequence[float] | None = None,
) -> SimulationResult:
    """Simulate ``schedule`` with per-stage forward/backward costs and per-edge message delays.

    ``late_cost[s] = (fwd, bwd)`` is the share of stage ``s``'s costs in its late part (``FL``/``BL``);
    a split stage missing from it puts all of its cost in ``F`` and ``B``. ``wgt[s]`` is the share of
    ``bwd[s]`` a stage's ``W`` actions take (default 0); ``B`` (and ``BL``) take the rest.
    """
    cost = action_costs(schedule, fwd, bwd, late_cost, wgt)
    if message_cost < 0:
        raise ValueError(f"message_cost must be >= 0, got {message_cost}")
    engine = _Engine(schedule, edge_delay or {}, cost)
    engine.message_cost = message_cost
    engine.run()
    return engine.result()


def action_costs(
    schedule: Schedule,
    fwd: Sequence[float],
    bwd: Sequence[float],
    late_cost: Mapping[int, tuple[float, float]] | None = None,
    wgt: Sequence[float] | None = None,
) -> dict[tuple[int, str], float]:
    """``{(stage, kind): cost}`` of every compute action kind (``F``, ``FL``, ``B``, ``BL``, ``W``), as
    :func:`simulate` charges them; the arguments are :func:`simulate`'s."""
    if len(fwd) != schedule.num_stages or len(bwd) != schedule.num_stages:
        raise ValueError(f"need {schedule.num_stages} forward and backward costs, got {len(fwd)}, {len(bwd)}")
    late_cost = dict(late_cost or {})
    for s, (lf, lb) in late_cost.items():
        if not (0 <= lf <= fwd[s] + 1e-9 and 0 <= lb <= bwd[s] + 1e-9):
            raise ValueError(
                f"late_cost[{s}] = {(lf, lb)} is not within stage {s}'s costs {(fwd[s], bwd[s])}"
            )
    wgt = list(wgt) if wgt is not None else [0.0] * schedule.num_stages
    if len(wgt) != schedule.num_stages or any(not 0 <= w <= b + 1e-9 for w, b in zip(wgt, bwd)):
        raise ValueError(
            f"wgt must give each stage a share of its backward cost, got {wgt} for bwd {list(bwd)}"
        )
    cost: dict[tuple[int, str], float] = {}
    for s in range(schedule.num_stages):
        lf, lb = late_cost.get(s, (0.0, 0.0))
        w = wgt[s] if any(a.kind == "W" for a in schedule.programs[s]) else 0.0
        lb = min(lb, bwd[s] - w)
        cost.update({(s, "F"): max(0.0, fwd[s] - lf), (s, "FL"): lf, (s, "W"): w})
        cost.update({(s, "B"): max(0.0, bwd[s] - w - lb), (s, "BL"): max(0.0, lb)})
    return cost


class _Engine:
    def __init__(self, schedule, edge_delay, cost) -> None:
        self.schedule, self.delay, self.cost = schedule, edge_delay, cost
        # per stage, the action that ends a micro-batch's stay: "W" or "B"
        self.releases = ["W" if any(a.kind == "W" for a in p) else "B" for p in schedule.programs]
        n = schedule.num_stages
        self.clock = [0.0] * n
        self.pc = [0] * n
        self.in_flight = [0] * n
        self.peak = [0] * n
        self.boxes: list[list[TimelineEntry]] = [[] for _ in range(n)]
        self.messages: dict[tuple[str, int, int, int], float] = {}
        self.message_cost = 0.0

    def run(self) -> None:
        progress = True
        while progress:
            progress = False
            for s, prog in enumerate(self.schedule.programs):
                while self.pc[s] < len(prog) and self._step(s, prog[self.pc[s]]):
                    self.pc[s] += 1
                    progress = True
        stuck = [
            str(prog[self.pc[s]]) for s, prog in enumerate(self.schedule.programs) if self.pc[s] < len(prog)
        ]
        if stuck:
            raise ScheduleError(f"deadlock: stages wait forever at {', '.join(stuck)}")

    def _step(self, s: int, a: Action) -> bool:
        peer = -1 if a.peer is None else a.peer
        if a.is_recv:
            key = (a.phase, peer, s, a.microbatch)
            if key not in self.messages:
                return False
            self.clock[s] = max(self.clock[s], self.messages.pop(key)) + self.message_cost
        elif a.is_send:
            key = (a.phase, s, peer, a.microbatch)
            if key in self.messages:
                raise ScheduleError(f"{a}: the previous identical message was never received")
            edge = (s, peer) if a.phase == "F" else (peer, s)
            self.clock[s] += self.message_cost
            self.messages[key] = self.clock[s] + self.delay.get(edge, 0.0)
        else:
            self._compute(s, a)
        return True

    def _compute(self, s: int, a: Action) -> None:
        cost = self.cost[(s, a.kind)]
        start = self.clock[s]
        self.clock[s] = start + cost
        self.boxes[s].append(
            TimelineEntry(stage=s, kind=a.kind, microbatch=a.microbatch, start=start, end=start + cost)
        )
        if a.kind == "F":
            self.in_flight[s] += 1
        elif a.kind == self.releases[s]:
            self.in_flight[s] -= 1
        self.peak[s] = max(self.peak[s], self.in_flight[s])

    def result(self) -> SimulationResult:
        total = max(self.clock, default=0.0)
        busy = sum(e.end - e.start for row in self.boxes for e in row)
        n = self.schedule.num_stages
        bubble = 0.0 if total <= 0 else max(0.0, 1.0 - busy / (n * total))
        return SimulationResult(
            iteration_time=total,
            bubble_fraction=bubble,
            peak_in_flight=tuple(self.peak),
            timeline=tuple(tuple(row) for row in self.boxes),
        )

"""Schedule validator: every rule a runtime relies on, checked before anything runs."""

from __future__ import annotations

from collections import Counter

from torch_graphpipe.action import Action
from torch_graphpipe.schedule import Schedule, ScheduleError
from torch_graphpipe.simulator import simulate

__all__ = ["validate_schedule"]


def validate_schedule(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` naming the first broken rule.

    Rules: one program per stage, each action on its own stage with a known micro-batch; exactly one
    forward and one backward per micro-batch per stage, forward first; around every stage edge and
    micro-batch exactly one send of activations after the producer's forward and one receive before
    the consumer's forward, and the same for gradients in the other direction; no unmatched messages;
    no deadlock when sends never block and receives wait. A stage split at a late predecessor (see
    [Note: late inputs]) also runs one ``FL`` and one ``BL`` per micro-batch, in the order ``F``,
    ``FL``, ``BL``, ``B``; it receives the late predecessor's activations before ``FL``, sends its own
    after ``FL``, receives gradients before ``BL`` and sends the late predecessor's after ``BL``. A stage
    of a zero-bubble schedule (see [Note: zero-bubble DAG schedule]) runs one ``W`` per micro-batch,
    after its ``B``, or none at all.
    """
    _check_shape(schedule)
    for s, prog in enumerate(schedule.programs):
        _check_compute(schedule, s, prog)
    _check_messages(schedule)
    zeros = [0.0] * schedule.num_stages
    simulate(schedule, zeros, zeros)  # raises ScheduleError on deadlock


def _check_shape(schedule: Schedule) -> None:
    if schedule.num_stages < 1 or schedule.num_microbatches < 1:
        raise ScheduleError("a schedule needs at least one stage and one micro-batch")
    if len(schedule.programs) != schedule.num_stages:
        raise ScheduleError(f"{len(schedule.programs)} programs for {schedule.num_stages} stages")
    for src, dst in schedule.edges:
        if not 0 <= src < dst < schedule.num_stages:
            raise ScheduleError(f"edge {src}>{dst} is not between stages in topological order")
    late_stages = [s for s, _ in schedule.late]
    if len(set(late_stages)) != len(late_stages):
        raise ScheduleError(f"a stage has two late predecessors in late={list(schedule.late)}")
    for s, p in schedule.late:
        if (p, s) not in schedule.edges:
            raise ScheduleError(f"late input {s}<{p} is not a stage edge")
    for s, prog in enumerate(schedule.programs):
        for a in prog:
            if a.kind in ("FL", "BL") and schedule.late_pred(s) is None:
                raise ScheduleError(f"action {a}: stage {s} is not split at a late input")
            if a.stage != s:
                raise ScheduleError(f"action {a} is in the program of stage {s}")
            if a.microbatch >= schedule.num_microbatches:
                raise ScheduleError(
                    f"action {a}: micro-batch out of range 0..{schedule.num_microbatches - 1}"
                )


def _check_compute(schedule: Schedule, s: int, prog: tuple[Action, ...]) -> None:
    position: dict[tuple[str, int], int] = {}
    for i, a in enumerate(prog):
        if a.is_compute:
            if (a.kind, a.microbatch) in position:
                raise ScheduleError(f"stage {s}: {a} appears twice")
            position[(a.kind, a.microbatch)] = i
    kinds = ("F", "FL", "BL", "B") if schedule.late_pred(s) is not None else ("F", "B")
    if any(a.kind == "W" for a in prog):
        kinds = (*kinds, "W")
    for mb in range(schedule.num_microbatches):
        for kind in kinds:
            if (kind, mb) not in position:
                raise ScheduleError(f"stage {s}: no {kind} for micro-batch {mb} ({s}{kind}{mb} missing)")
        if position[("B", mb)] < position[("F", mb)]:
            raise ScheduleError(f"stage {s}: backward of micro-batch {mb} comes before its forward")
        order = [position[(kind, mb)] for kind in kinds]
        if order != sorted(order):
            raise ScheduleError(f"stage {s}: micro-batch {mb} must run {', '.join(kinds)} in this order")


def _expected_messages(schedule: Schedule) -> Counter[Action]:
    expected: Counter[Action] = Counter()
    for a, b in schedule.edges:
        for mb in range(schedule.num_microbatches):
            expected[Action(stage=a, kind="SEND_F", microbatch=mb, peer=b)] += 1
            expected[Action(stage=b, kind="RECV_F", microbatch=mb, peer=a)] += 1
            expected[Action(stage=b, kind="SEND_B", microbatch=mb, peer=a)] += 1
            expected[Action(stage=a, kind="RECV_B", microbatch=mb, peer=b)] += 1
    return expected


def _check_messages(schedule: Schedule) -> None:
    expected = _expected_messages(schedule)
    actual = Counter(a for prog in schedule.programs for a in prog if not a.is_compute)
    for a in sorted(set(expected) | set(actual), key=str):
        if actual[a] != expected[a]:
            raise ScheduleError(
                f"{a} appears {actual[a]} times, expected {expected[a]} (stage edges {list(schedule.edges)})"
            )
    for s, prog in enumerate(schedule.programs):
        position: dict[tuple[str, int, int | None], int] = {
            (a.kind, a.microbatch, a.peer): i for i, a in enumerate(prog)
        }
        late = schedule.late_pred(s)
        for a in prog:
            if a.is_compute:
                continue
            anchor = _anchor(a, late)
            compute = position[(anchor, a.microbatch, None)]
            before = a.is_recv
            if (position[(a.kind, a.microbatch, a.peer)] < compute) != before:
                where = "before" if before else "after"
                raise ScheduleError(f"stage {s}: {a} must come {where} {s}{anchor}{a.microbatch}")


def _anchor(a: Action, late: int | None) -> str:
    """The computation a message must follow (sends) or precede (receives) on a stage."""
    if late is None:
        return a.phase
    if a.kind == "RECV_F":
        return "FL" if a.peer == late else "F"
    if a.kind == "SEND_B":
        return "BL" if a.peer == late else "B"
    return "FL" if a.kind == "SEND_F" else "BL"

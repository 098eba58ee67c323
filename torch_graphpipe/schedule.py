"""Schedules as data: per-stage programs of :class:`Action`, and the DAG 1F1B builder.

[Note: DAG 1F1B]
Synchronous 1F1B generalised to a stage DAG: stage ``s`` first runs the forwards of
``w_s = min(M, depth_s)`` micro-batches, where ``depth_s`` is the number of stages on the longest path
from ``s`` to a sink (``S - i`` on a chain), then alternates one backward and one forward, then drains
the backwards. The backward of micro-batch ``j`` is placed as early as the warm-up allows, so a stage
holds at most ``w_s`` micro-batches. Around each forward the stage receives from every predecessor
and sends to every successor; around each backward it receives gradients from every successor and
sends gradients to every predecessor, peers in ascending order.

[Note: late inputs]
A stage that joins several predecessors would otherwise wait for the last of them before starting,
and send gradients to all of them only after its whole backward. On two branches of four unit blocks
joined by a free sum (DESIGN's worked example) that costs the join stage a forward of fill and the
other branch a backward of drain: 36 units instead of 33. So such a stage may be split at one *late*
predecessor (``Schedule.late``, chosen by the plan: the one whose values the fewest of the stage's
operators depend on): the forward ``F`` runs the operators that do not depend on the late values
as soon as the other predecessors' values are in, then the stage receives the late values and runs
the rest (``FL``) and sends; the backward runs that late part first (``BL``), sends the late
predecessor its gradients at once, then runs the early part (``B``) and sends the other gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch_graphpipe.action import Action
from torch_graphpipe.stage_graph import longest_path_depths

__all__ = ["Schedule", "ScheduleError", "build_1f1b", "expand_program", "warmup_counts"]


class ScheduleError(ValueError):
    """A schedule breaks a rule (missing action, wrong order, unmatched message, deadlock)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """What every stage does, in order, for one training step."""

    num_stages: int  # stages, numbered in a topological order of the stage DAG
    num_microbatches: int  # micro-batches per step
    edges: tuple[tuple[int, int], ...]  # stage DAG edges (producer, consumer)
    programs: tuple[tuple[Action, ...], ...]  # per stage, the actions in execution order
    late: tuple[tuple[int, int], ...] = ()  # (stage, its late predecessor); see [Note: late inputs]

    def late_pred(self, stage: int) -> int | None:
        """The predecessor at which ``stage`` is split, or ``None``."""
        return next((p for s, p in self.late if s == stage), None)

    def __str__(self) -> str:
        edges = ",".join(f"{a}>{b}" for a, b in self.edges)
        head = f"schedule stages={self.num_stages} microbatches={self.num_microbatches} edges={edges}"
        if self.late:
            head += " late=" + ",".join(f"{s}<{p}" for s, p in self.late)
        lines = [f"{s}: " + " ".join(str(a) for a in prog) for s, prog in enumerate(self.programs)]
        return "\n".join([head, *lines])

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Inverse of ``str``."""
        head, *lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        fields = dict(part.split("=", 1) for part in head.split()[1:])
        try:
            edges = tuple(tuple(int(x) for x in e.split(">")) for e in fields["edges"].split(",") if e)
            num_stages, num_mb = int(fields["stages"]), int(fields["microbatches"])
            late = tuple(tuple(int(x) for x in e.split("<")) for e in fields.get("late", "").split(",") if e)
        except (KeyError, ValueError) as exc:
            raise ScheduleError(f"bad schedule header {head!r}") from exc
        programs = []
        for line in lines:
            _, _, body = line.partition(":")
            programs.append(tuple(Action.parse(tok) for tok in body.split()))
        return cls(
            num_stages=num_stages,
            num_microbatches=num_mb,
            edges=edges,  # type: ignore[arg-type]
            programs=tuple(programs),
            late=late,  # type: ignore[arg-type]
        )

    def compute_order(self, stage: int) -> list[str]:
        """The stage's F/B actions only, as strings (handy for tests and printing)."""
        return [str(a) for a in self.programs[stage] if a.is_compute]


def build_1f1b(
    num_stages: int,
    edges: Sequence[tuple[int, int]],
    num_microbatches: int,
    late: Sequence[tuple[int, int]] = (),
) -> Schedule:
    """DAG 1F1B schedule; see [Note: DAG 1F1B]. Stages must be numbered topologically. ``late``
    lists ``(stage, predecessor)`` pairs at which a stage is split (see [Note: late inputs])."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    edges = tuple(sorted(set(edges)))
    late = tuple(sorted(set(late)))
    late_of = dict(late)
    if len(late_of) != len(late) or any((p, s) not in edges for s, p in late):
        raise ValueError(f"late must name at most one predecessor per stage along an edge, got {list(late)}")
    warmup = warmup_counts(num_stages, edges, num_microbatches)
    programs = tuple(
        expand_program(s, edges, _compute_order(warmup[s], num_microbatches), late_of.get(s))
        for s in range(num_stages)
    )
    return Schedule(
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        edges=edges,
        programs=programs,
        late=late,
    )


def warmup_counts(
    num_stages: int, edges: Sequence[tuple[int, int]], num_microbatches: int
) -> tuple[int, ...]:
    """Per stage, the forwards it runs before its first backward: ``min(M, depth_s)``."""
    depth = longest_path_depths(num_stages, edges)
    return tuple(min(d, num_microbatches) for d in depth)


def expand_program(
    stage: int, edges: Sequence[tuple[int, int]], order: Sequence[tuple[str, int]], late: int | None
) -> tuple[Action, ...]:
    """A stage's program from its compute order ``[(kind, microbatch)]`` (kinds ``F``, ``B``, ``W``):
    receives before and sends after each ``F`` and ``B`` (split at ``late``, see [Note: late inputs]);
    a ``W`` exchanges nothing."""
    preds = sorted(a for a, b in edges if b == stage)
    succs = sorted(b for a, b in edges if a == stage)
    prog: list[Action] = []
    for kind, mb in order:
        if kind == "W":
            prog.append(Action(stage=stage, kind="W", microbatch=mb))
        else:
            prog.extend(_around(stage, kind, mb, preds, succs, late))
    return tuple(prog)


def _compute_order(warmup: int, num_microbatches: int) -> list[tuple[str, int]]:
    order = [("F", j) for j in range(warmup)]
    for j in range(num_microbatches):
        order.append(("B", j))
        if j + warmup < num_microbatches:
            order.append(("F", j + warmup))
    return order


def _around(
    stage: int, kind: str, mb: int, preds: list[int], succs: list[int], late: int | None
) -> list[Action]:
    def act(k: str, peer: int | None = None) -> Action:
        return Action(stage=stage, kind=k, microbatch=mb, peer=peer)  # type: ignore[arg-type]

    early = [p for p in preds if p != late]
    if kind == "F":
        out = [*(act("RECV_F", p) for p in early), act("F")]
        if late is not None:
            out += [act("RECV_F", late), act("FL")]
        return out + [act("SEND_F", t) for t in succs]
    out = [act("RECV_B", t) for t in succs]
    if late is not None:
        out += [act("BL"), act("SEND_B", late)]
    return [*out, act("B"), *(act("SEND_B", p) for p in early)]

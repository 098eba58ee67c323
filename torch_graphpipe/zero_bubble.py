"""Zero-bubble DAG schedules: backwards split into input gradients (``B``) and weight gradients (``W``).

[Note: zero-bubble DAG schedule]
The zero-bubble chain schedules (ZB-H1, ZBV; Qi et al., ICLR 2024) split each backward in two: ``B``
computes the gradients of the stage's inputs, which its predecessors wait for, and ``W`` the gradients
of its weights, which nobody waits for, so a ``W`` can run whenever the stage would otherwise idle.
:func:`build_zero_bubble` does the same on a stage DAG. Each stage keeps the DAG 1F1B order of its
``F`` and ``B`` actions (see [Note: DAG 1F1B]) and receives and sends around them exactly as there; its
``W`` actions are placed by a greedy list schedule over the given costs: a stage whose next ``F``/``B``
cannot start yet (its messages have not arrived) runs its oldest pending ``W`` instead, and the ``W``
actions left at the end run after its last ``B``. The messages and their order are those of 1F1B, so
the schedule cannot deadlock where 1F1B does not.

A micro-batch's activations stay held from its ``F`` until its ``W`` (not its ``B``): deferring ``W``
raises a stage's in-flight count. ``max_in_flight[s]`` bounds it: before an ``F`` that would exceed
it the stage runs a pending ``W``. The default is ZB-H1's rule, every stage may hold as many
micro-batches as the deepest stage holds in 1F1B (``max_s min(M, depth_s)``); the planner passes what
each stage's memory budget allows (see [Note: memory-aware micro-batching] in
torch_graphpipe/planner.py).

[Note: W placement within the margin]
The greedy placement compares when a message arrives with when the stage is free, and on measured
costs those two often differ by less than the costs' noise (on uniform stages they are equal by
construction), so which ``W`` fills which bubble, and the whole schedule after it, changed between
two profiles of one machine. A second placement uses no times at all: a stage runs a ``W`` only when
its in-flight bound forces one before an ``F``, once after each ``B`` of its cool-down (no ``F`` left,
ZB-H1's ``B W B W`` tail), and the rest after its last ``B``. Both are simulated over the given costs;
the greedy one is taken only when it is faster by more than the plan noise (the combined ``margin``,
at most 5%: see [Note: plan noise] in torch_graphpipe/stable.py). On the zoo's CANDLE-Uno and DLRM (8 stages, DAG and
chain plans) the fixed placement is as fast as the greedy one or within the margin, and the schedule
is the same over noisy profiles; on MMT the greedy one is 2-11% faster and is taken, so its ``W``
placement still follows the costs there.

The runtime (see [Note: split backward] in torch_graphpipe/runtime.py) computes ``B`` with
``torch.autograd.grad`` on the stage's received values and ``W`` from the gradients ``B`` left at the
operators that use weights, so the two together cost one backward and give the same gradients. A
stage that receives nothing (a source of the stage DAG) has no input gradients: its ``B`` is empty
and its ``W`` is the whole backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch_graphpipe.schedule import Schedule, ScheduleError, build_1f1b, expand_program, warmup_counts
from torch_graphpipe.stable import ahead

__all__ = ["build_zero_bubble"]


def build_zero_bubble(
    num_stages: int,
    edges: Sequence[tuple[int, int]],
    num_microbatches: int,
    late: Sequence[tuple[int, int]] = (),
    *,
    fwd: Sequence[float],
    bwd: Sequence[float],
    wgt: Sequence[float],
    edge_delay: Mapping[tuple[int, int], float] | None = None,
    max_in_flight: Sequence[int] | None = None,
    margin: float = 0.0,
) -> Schedule:
    """Zero-bubble DAG schedule; see [Note: zero-bubble DAG schedule].

    ``fwd[s]`` and ``bwd[s]`` are stage ``s``'s forward and whole backward costs, ``wgt[s]`` the weight
    gradients' share of ``bwd[s]``; ``edge_delay`` the time a message takes on each edge (units of the
    costs). ``max_in_flight[s]`` (at least the stage's 1F1B warm-up ``min(M, depth_s)``) bounds the
    micro-batches stage ``s`` holds between their ``F`` and ``W``. ``margin`` is the costs' relative
    uncertainty (see [Note: W placement within the margin])."""
    base = build_1f1b(num_stages, edges, num_microbatches, late)  # checks the arguments
    for name, costs in (("fwd", fwd), ("bwd", bwd), ("wgt", wgt)):
        if len(costs) != num_stages or any(c < 0 for c in costs):
            raise ValueError(f"{name} needs {num_stages} costs >= 0, got {list(costs)}")
    if any(w > b + 1e-9 for w, b in zip(wgt, bwd)):
        raise ValueError(f"wgt must be a share of bwd, got wgt={list(wgt)}, bwd={list(bwd)}")
    warmup = warmup_counts(num_stages, base.edges, num_microbatches)
    caps = tuple(max_in_flight) if max_in_flight is not None else (max(warmup),) * num_stages
    if len(caps) != num_stages or any(c < w for c, w in zip(caps, warmup)):
        raise ValueError(
            f"max_in_flight must give each stage at least its 1F1B warm-up {list(warmup)}, got {list(caps)}"
        )
    orders = [[(a.kind, a.microbatch) for a in prog if a.kind in ("F", "B")] for prog in base.programs]
    inp = [b - w for b, w in zip(bwd, wgt)]
    fixed = _Greedy(base.edges, orders, fwd, inp, wgt, edge_delay or {}, caps, fixed=True)
    greedy = _Greedy(base.edges, orders, fwd, inp, wgt, edge_delay or {}, caps, fixed=False)
    placed_fixed, placed_greedy = fixed.run(), greedy.run()
    # [Note: W placement within the margin]
    placed = placed_greedy if ahead(greedy.makespan, fixed.makespan, margin) else placed_fixed
    late_of = dict(base.late)
    programs = tuple(expand_program(s, base.edges, placed[s], late_of.get(s)) for s in range(num_stages))
    return Schedule(
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        edges=base.edges,
        programs=programs,
        late=base.late,
    )


class _Greedy:
    """The list schedule of [Note: zero-bubble DAG schedule], over compute actions only."""

    def __init__(self, edges, orders, fwd, inp, wgt, delay, caps, *, fixed: bool) -> None:
        self.orders, self.caps, self.fixed = orders, caps, fixed
        self.last_f = [max((i for i, (k, _) in enumerate(o) if k == "F"), default=-1) for o in orders]
        self.after_b = [False] * len(orders)  # fixed: a cool-down B was just placed
        self.cost = {"F": fwd, "B": inp, "W": wgt}
        n = len(orders)
        self.preds = [[a for a, b in edges if b == s] for s in range(n)]
        self.succs = [[b for a, b in edges if a == s] for s in range(n)]
        self.delay = delay
        self.clock = [0.0] * n
        self.next = [0] * n
        self.pending: list[list[int]] = [[] for _ in range(n)]
        self.in_flight = [0] * n
        self.done: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> end time
        self.placed: list[list[tuple[str, int]]] = [[] for _ in range(n)]

    def ready(self, s: int) -> float | None:
        """When stage ``s``'s next F/B may start (its messages' arrival), ``None`` if not yet known."""
        kind, mb = self.orders[s][self.next[s]]
        peers = self.preds[s] if kind == "F" else self.succs[s]
        times = []
        for p in peers:
            end = self.done.get((p, kind, mb))
            if end is None:
                return None
            edge = (p, s) if kind == "F" else (s, p)
            times.append(end + self.delay.get(edge, 0.0))
        return max(times, default=0.0)

    def choice(self, s: int) -> tuple[str, int] | None:
        """What stage ``s`` runs next at its clock, or ``None`` while it can only wait."""
        if self.next[s] == len(self.orders[s]):
            return ("W", self.pending[s][0]) if self.pending[s] else None
        kind, mb = self.orders[s][self.next[s]]
        if kind == "F" and self.in_flight[s] >= self.caps[s]:  # memory: free a micro-batch first
            return ("W", self.pending[s][0])
        start = self.ready(s)
        if self.fixed:  # one W after each cool-down B, else wait for the F/B's messages
            if self.after_b[s] and self.pending[s]:
                return "W", self.pending[s][0]
            return (kind, mb) if start is not None else None
        if start is not None and start <= self.clock[s]:
            return kind, mb
        if self.pending[s]:  # idle until the messages arrive: fill with a weight gradient
            return "W", self.pending[s][0]
        return (kind, mb) if start is not None else None

    def run(self) -> list[list[tuple[str, int]]]:
        n = len(self.orders)
        while True:
            options = [(self.clock[s], s, c) for s in range(n) if (c := self.choice(s)) is not None]
            if not options:
                break
            _, s, (kind, mb) = min(options)
            self.step(s, kind, mb)
        if any(self.next[s] < len(self.orders[s]) or self.pending[s] for s in range(n)):
            raise ScheduleError("zero-bubble placement stalled: the 1F1B order deadlocks")
        return self.placed

    def step(self, s: int, kind: str, mb: int) -> None:
        start = self.clock[s]
        if kind != "W":
            start = max(start, self.ready(s) or 0.0)
            self.next[s] += 1
        self.clock[s] = start + self.cost[kind][s]
        self.done[(s, kind, mb)] = self.clock[s]
        self.placed[s].append((kind, mb))
        self.after_b[s] = kind == "B" and self.next[s] > self.last_f[s]
        if kind == "F":
            self.in_flight[s] += 1
        elif kind == "B":
            self.pending[s].append(mb)
        else:
            self.pending[s].remove(mb)
            self.in_flight[s] -= 1

    @property
    def makespan(self) -> float:
        """When the last action ends (after :meth:`run`)."""
        return max(self.clock, default=0.0)

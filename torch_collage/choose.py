"""Choose and verify: the searched placement against the close single backends, end to end, side by
side; then the winner checked against eager on the recorded values.

[Note: end-to-end check]
Partition costs are measured alone; assembled, runtimes interfere (ONNX Runtime and OpenVINO thread
pools hand cores over, tensors are converted at boundaries). So the searched placement is assembled
and measured end to end beside every whole-graph single backend whose own cost was within
``CLOSE_FACTOR`` of the best one ([Note: paired end-to-end rounds] in endtoend.py); the fastest is
chosen, a single backend on a tie or when a mixed placement wins by less than ``MIXED_MARGIN``.
Timing the singles again matters as much as checking a mixed placement: each had one cost
measurement, taken minutes apart on a shared machine, and one such measurement picked ONNX Runtime
for dlrm at 3.6 ms where OpenVINO runs it in 2.5 ms. The factor is wide because such outliers are
large (OpenVINO's whole resnext50 once measured 361 ms in the search and 240 ms side by side). The
whole graphs were compiled while measuring and are reused, and the end-to-end times are cached, so
a warm compile measures nothing.

[Note: a mixed placement must win clearly]
A mixed placement is kept only if it measures at least ``MIXED_MARGIN`` faster end to end than the
fastest single backend timed beside it. Its time varies more than a single backend's: each boundary
hands the cores from one runtime's thread pool to another's, and how long the previous pool's
threads keep spinning depends on what else the machine does (a placement that won the search by a
few percent on candle_uno ran 1.11-1.32x OpenVINO's whole graph in later runs). A win of a few
percent is not worth that risk.

[Note: never slower than eager]
Eager runs every graph, and a placement slower than it is worse than no compiler. So eager is timed
among the contenders whenever the searched placement is mixed (its partitions were measured alone,
and assembled they can run far slower: a mixed BERT placement ran 514 ms where eager ran 68 ms) or
eager's own whole-graph cost is unknown, besides whenever it is within ``CLOSE_FACTOR`` of the best.
And where eager was not timed beside the winner but its measured cost is below the winner's
end-to-end time, the two are timed side by side once more and the faster runs. Only an eager whole
graph that failed its own check (it cannot then be run checked) stays out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from torch_collage.assembly import AssembledGraph
from torch_collage.cost import copy_strided, outputs_match
from torch_collage.endtoend import EndToEnd, assemble
from torch_collage.graph import DataflowGraph
from torch_collage.options import CollageOptions
from torch_collage.precision import float32_outputs, is_low_precision, within_reference
from torch_collage.search import Partition, Placement
from torch_collage.timing import (
    RECHECK_CLOSE,
    RECHECK_CONFIRM_ROUNDS,
    RECHECK_CONTENDERS,
    RECHECK_FLOOR_MS,
    RECHECK_MARGIN,
    RECHECK_ROUNDS,
    RECHECK_SLOWER,
)

__all__ = [
    "CLOSE_FACTOR",
    "MIXED_MARGIN",
    "Choice",
    "Recheck",
    "check_seconds",
    "choose",
    "recheck",
    "single",
    "verify",
]

logger = logging.getLogger(__name__)

# Whole-graph backends measured within this factor of the best one are timed again, side by side,
# before one is chosen; see [Note: end-to-end check].
CLOSE_FACTOR = 1.5
MIXED_MARGIN = 0.05  # [Note: a mixed placement must win clearly]


@dataclass(frozen=True)
class Choice:
    """What runs: the assembled graph, its end-to-end ms, ``"mixed"`` or the single backend chosen, and
    each contender's end-to-end ms (empty when the searched placement had no contender)."""

    assembled: AssembledGraph
    measured_ms: float
    chosen: str
    compared: dict[str, float] = field(default_factory=dict)
    placement: Placement | None = None  # what was assembled


def single(graph: DataflowGraph, backend: str, ms: float) -> Placement:
    """The whole graph on ``backend``."""
    return Placement((Partition(graph.full, backend, ms),), ms)


def choose(
    e2e: EndToEnd, placement: Placement, singles: dict[str, float], nearly: dict[str, Placement] | None = None
) -> Choice:
    """The fastest end to end of the searched ``placement`` and the single backends (whole-graph ms
    in ``singles``) and nearly whole graphs (``nearly``: [Note: nearly whole graphs] in measure.py)
    within ``CLOSE_FACTOR`` of the best, and eager ([Note: never slower than eager]); see [Note:
    end-to-end check]."""
    graph = e2e.graph
    whole = len(placement.partitions) == 1 and placement.partitions[0].mask == graph.full
    searched = placement.partitions[0].backend if whole else "mixed"
    contenders = [
        *_close_singles(graph, singles, searched, nearly or {}),
        (searched, placement),
    ]  # a tie: a single
    eager = _eager(e2e, singles)
    names = [name for name, _ in contenders]
    if (
        eager is not None
        and "eager" not in names
        and (searched == "mixed" or not math.isfinite(eager.predicted_ms))
    ):
        contenders.insert(0, ("eager", eager))
    if len(contenders) == 1:
        lazy = e2e.lazy(placement)
        choice = Choice(lazy(), e2e.times([placement])[0], searched, placement=placement)
        return _not_slower_than_eager(e2e, choice, eager)
    times = e2e.times([p for _, p in contenders], rounds=3)
    compared = {name: ms for (name, _), ms in zip(contenders, times)}
    logger.debug("torch_collage: end to end: %s", ", ".join(f"{n} {ms:.3f} ms" for n, ms in compared.items()))
    k = min(range(len(times)), key=lambda i: times[i])
    if _is_mixed(contenders[k][0]):
        k = _unless_clear_win(contenders, times, k)
    elif contenders[k][0] != searched:
        logger.info(
            "torch_collage: %s placement %.3f ms end to end, %s %.3f ms; using %s",
            searched, times[-1], contenders[k][0], times[k], contenders[k][0],
        )  # fmt: skip
    name, chosen = contenders[k]
    choice = Choice(e2e.lazy(chosen)(), times[k], name, compared, chosen)
    return _not_slower_than_eager(e2e, choice, eager)


def _eager(e2e: EndToEnd, singles: dict[str, float]) -> Placement | None:
    """Eager's whole graph as a placement, unless it failed its own check ([Note: never slower
    than eager]); its cost is inf where it was not measured."""
    if "eager" not in e2e.model.specs or (e2e.graph.full, "eager") in e2e.model.reasons:
        return None
    return single(e2e.graph, "eager", singles.get("eager", math.inf))


def _not_slower_than_eager(e2e: EndToEnd, choice: Choice, eager: Placement | None) -> Choice:
    """``choice``, or eager where ``choice`` ran slower end to end than eager's measured cost and
    eager then wins side by side ([Note: never slower than eager])."""
    if eager is None or choice.chosen == "eager" or "eager" in choice.compared or choice.placement is None:
        return choice
    if not choice.measured_ms > eager.predicted_ms:
        return choice
    mine, eagers = e2e.times([choice.placement, eager], rounds=3)
    compared = {**choice.compared, choice.chosen: mine, "eager": eagers}
    if eagers < mine:
        logger.info(
            "torch_collage: %s placement %.3f ms end to end, eager %.3f ms; using eager",
            choice.chosen,
            mine,
            eagers,
        )
        return Choice(e2e.lazy(eager)(), eagers, "eager", compared, eager)
    return Choice(choice.assembled, mine, choice.chosen, compared, choice.placement)


def check_seconds(singles: dict[str, float], options: CollageOptions) -> float:
    """Seconds the end-to-end check will likely take once whole graphs cost ``singles`` (ms): three
    rounds over the close single backends, eager and a mixed placement as fast as the best, each
    timing capped at 2 s ([Note: the compile budget] in timing.py)."""
    finite = [ms for ms in singles.values() if math.isfinite(ms)]
    if not finite:
        return 0.0
    best = min(finite)
    timed = [ms for ms in finite if ms <= best * CLOSE_FACTOR] + [best]
    eager = singles.get("eager", math.inf)
    if math.isfinite(eager) and eager > best * CLOSE_FACTOR:
        timed.append(eager)
    calls = options.warmup + options.repeats
    return 3 * sum(min(2.0, calls * ms / 1e3) + 0.005 for ms in timed)


AGREED_BEFORE = "agreed before"  # a re-check of the same choice on the same cached costs agreed


@dataclass(frozen=True)
class Recheck:
    """A warm compile's re-check of its cached choice ([Note: quiet measurements] in timing.py)."""

    # "agreed[ after more rounds]", AGREED_BEFORE, "ignored: ..." or "contradicted: ..." and by what
    outcome: str
    times: dict[str, float]  # the chosen placement and its rivals, timed side by side now (ms)

    @property
    def contradicted(self) -> bool:
        return self.outcome.startswith("contradicted")


def recheck(e2e: EndToEnd, choice: Choice, singles: dict[str, float]) -> Recheck:
    """Time ``choice`` (made from cached costs) beside the ``RECHECK_CONTENDERS`` fastest other
    whole-graph backends (``singles``: their cached ms), ``RECHECK_ROUNDS`` short paired rounds, and
    say whether that contradicts the cache: the choice runs slower than cached, a rival faster than
    cached, or a rival beats the choice; the timings are not counted as measurements ([Note: quiet
    measurements])."""
    model, graph = e2e.model, e2e.graph
    if choice.placement is None:
        return Recheck("ignored: nothing to compare", {})
    rivals = sorted((ms, b) for b, ms in singles.items() if b != choice.chosen and math.isfinite(ms))
    items = [(choice.chosen, choice.placement)]
    items += [(b, single(graph, b, ms)) for ms, b in rivals[:RECHECK_CONTENDERS]]
    noisy = model.noisy
    times = _recheck_times(e2e, [p for _, p in items], RECHECK_ROUNDS)
    now = dict(zip([name for name, _ in items], times))
    if model.noisy != noisy:
        return Recheck("ignored: the machine was busy", now)
    mine = times[0]
    if mine > RECHECK_SLOWER * choice.measured_ms + RECHECK_FLOOR_MS:
        why = f"{choice.chosen} ran {mine:.3f} ms, cached {choice.measured_ms:.3f} ms"
        return Recheck(f"contradicted: {why}", now)
    for (name, _), ms in zip(items[1:], times[1:]):  # a rival the cache holds slower than it runs
        if singles[name] > RECHECK_SLOWER * ms + RECHECK_FLOOR_MS:
            return Recheck(f"contradicted: {name} ran {ms:.3f} ms, cached {singles[name]:.3f} ms", now)

    def ahead(ms: float, margin: float, of: float = mine) -> bool:
        return ms * (1 + margin) + RECHECK_FLOOR_MS < of

    rivals_now = sorted((ms, name, p) for (name, p), ms in zip(items[1:], times[1:]))
    for ms, name, _ in rivals_now:
        if ahead(ms, RECHECK_MARGIN):
            return Recheck(f"contradicted: {name} ran {ms:.3f} ms, {choice.chosen} {mine:.3f} ms", now)
    close = [(ms, name, p) for ms, name, p in rivals_now if ahead(ms, RECHECK_CLOSE)]
    if not close:
        return Recheck("agreed", now)
    _, name, rival = close[0]  # ahead, but within what two short rounds tell apart: time it longer
    again, theirs = _recheck_times(e2e, [choice.placement, rival], RECHECK_CONFIRM_ROUNDS)
    if model.noisy != noisy:
        return Recheck("ignored: the machine was busy", now)
    if ahead(theirs, RECHECK_CLOSE, again):
        why = f"{name} ran {theirs:.3f} ms, {choice.chosen} {again:.3f} ms over {RECHECK_CONFIRM_ROUNDS} more rounds"
        return Recheck(f"contradicted: {why}", {**now, choice.chosen: again, name: theirs})
    return Recheck(f"agreed after {RECHECK_CONFIRM_ROUNDS} more rounds beside {name}", now)


def _recheck_times(e2e: EndToEnd, placements: list[Placement], rounds: int) -> list[float]:
    """``e2e.recheck_times``, its timings counted as re-checks, not measurements."""
    model = e2e.model
    measured = model.measured
    times = e2e.recheck_times(placements, rounds)
    model.rechecks += model.measured - measured
    model.measured = measured
    return times


def _close_singles(
    graph: DataflowGraph, singles: dict[str, float], searched: str, nearly: dict[str, Placement]
) -> list[tuple[str, Placement]]:
    """The whole graphs and nearly whole graphs predicted within ``CLOSE_FACTOR`` of the best of them,
    fastest first. A graph that writes its state has no whole graph but eager's, and its nearly whole
    graphs are the placements most likely to win end to end: the search can prefer small pieces
    whose costs, each timed alone with its weights in cache, add up to less than they run in turn
    (Llama's decode at 512 slots: 9.8 ms predicted, 23.3 ms end to end)."""
    options = [(ms, b, single(graph, b, ms)) for b, ms in singles.items() if math.isfinite(ms)]
    options += [(p.predicted_ms, name, p) for name, p in nearly.items() if math.isfinite(p.predicted_ms)]
    if not options:
        return []
    best = min(ms for ms, _, _ in options)
    return [
        (b, p)
        for ms, b, p in sorted(options, key=lambda o: o[0])
        if b != searched and ms <= best * CLOSE_FACTOR
    ]


def _is_mixed(name: str) -> bool:
    """The searched mixed placement, or its variant on fewer runtimes ([Note: fewer runtimes] in measure.py)."""
    return name.startswith("mixed")


def _unless_clear_win(contenders: Sequence[tuple[str, Placement]], times: Sequence[float], k: int) -> int:
    """``k`` (the mixed placement), or the fastest single backend where ``k`` did not win by
    ``MIXED_MARGIN`` ([Note: a mixed placement must win clearly])."""
    singles_timed = [i for i, (name, _) in enumerate(contenders) if not _is_mixed(name)]
    if not singles_timed:
        return k
    fastest = min(singles_timed, key=lambda i: times[i])
    if times[k] * (1 + MIXED_MARGIN) <= times[fastest]:
        return k
    name = contenders[fastest][0]
    logger.info(
        "torch_collage: mixed placement %.3f ms end to end, %s %.3f ms: less than %.0f%% faster; using %s",
        times[k], name, times[fastest], 100 * MIXED_MARGIN, name,
    )  # fmt: skip
    return fastest


def verify(e2e: EndToEnd, choice: Choice, inputs: Sequence[Any]) -> Choice:
    """``choice`` if its assembled graph matches eager on the recorded values; else eager (logged).

    A placement of one partition needs no second check: its callable was checked against eager on
    these same values when it was compiled or loaded (``CostModel._check``)."""
    if len(choice.assembled.steps) <= 1:
        return choice
    model, gm = e2e.model, e2e.gm
    want = list(fx.node.map_arg(_outputs(gm), lambda n: model.values[n]))
    with torch.no_grad(), model.replaying_rng():
        got = list(choice.assembled(*[copy_strided(x) if isinstance(x, torch.Tensor) else x for x in inputs]))
    rtol, atol = model.options.rtol * 10, model.options.atol * 10
    reason = outputs_match(got, want, rtol, atol)
    if reason and any(is_low_precision(w) for w in want):
        with model.replaying_rng():  # [Note: low-precision placements against a float32 reference]
            ref = float32_outputs(gm, inputs)
        if ref is not None:
            others = [(g, w) for g, w in zip(got, want) if not is_low_precision(w)]
            reason = within_reference(got, want, ref, rtol, atol) or outputs_match(
                [g for g, _ in others], [w for _, w in others], rtol, atol
            )
    if not reason:
        return choice
    logger.warning("torch_collage: assembled placement differs from eager (%s); running eager", reason)
    placement = single(e2e.graph, "eager", 0.0)
    return Choice(assemble(gm, placement, model), choice.measured_ms, "eager", choice.compared, placement)


def _outputs(gm: fx.GraphModule) -> Any:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]

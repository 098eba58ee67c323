"""End to end: assemble placements (compile each partition) and time them side by side, paired,
cached per comparison. ``EndToEnd`` is what the refinement and the end-to-end check ask."""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

from torch_collage.assembly import AssembledGraph, Step
from torch_collage.cost import CostModel
from torch_collage.graph import DataflowGraph
from torch_collage.search import Placement, merge_eager_runs
from torch_collage.subgraph import digest, tensor_signature

__all__ = ["CompareFn", "EndToEnd", "assemble", "e2e_many_ms"]

logger = logging.getLogger(__name__)

Assemble = Callable[[], AssembledGraph]  # builds (compiles) the placement only when it must be timed


# [Note: paired end-to-end rounds]
# The end-to-end check times its contenders alternating, in rounds, so that each round sees one
# machine state, and compares them paired: in each round every contender's time is divided by that
# round's geometric mean over the contenders, and a contender's cost is the median of those ratios
# over the rounds, scaled by the median round. Keeping each contender's best round instead lets one
# lucky round decide: on a 2-core machine whose speed drifted by a third within minutes, that picked
# OpenVINO for gpt2 where Inductor was faster in 11 of 12 paired trials. When the best two still lie
# within ``RUNOFF_MARGIN`` of each other, those two alone run up to ``RUNOFF_ROUNDS`` more rounds,
# stopping as soon as they separate: a near-tie costs a few more seconds instead of a coin flip.
RUNOFF_MARGIN = 0.03
RUNOFF_ROUNDS = 4

# [Note: end-to-end times are cached per comparison]
# A time is only comparable with the times measured beside it. So every comparison times all its
# members afresh, side by side, and its result is cached under the whole comparison (the graph, its
# inputs and every member's placement): a warm compile replays the same comparisons and gets the
# same answers without timing anything. Caching per placement instead let a comparison reuse a time
# measured alone minutes earlier, and a refinement then kept moves that only looked faster.
# Refinement pays for it: each move re-times the current placement beside it.


def e2e_many_ms(
    model: CostModel,
    graph: DataflowGraph,
    items: Sequence[tuple[Placement, Assemble]],
    rounds: int = 2,
    *,
    recheck: bool = False,
) -> list[float]:
    """End-to-end ms of each assembled placement, timed alternating over ``rounds`` rounds in rotated
    order, so they see the same machine state, and compared paired round by round, with a run-off
    between the best two when they are close ([Note: paired end-to-end rounds]). The result is cached
    for this comparison only ([Note: end-to-end times are cached per comparison]). Rounds after the
    first and the run-off are run only where the budget has time for them ([Note: the compile
    budget] in timing.py). ``recheck``: a warm compile's re-check, a few calls per timing, no
    run-off, nothing read from or written to the cache ([Note: quiet measurements])."""
    placeholders = [n for n in model.gm.graph.nodes if n.op == "placeholder"]
    args = model.args(placeholders)
    restore = model.restorer(placeholders, args)  # [Note: timing a graph that writes its inputs]
    group = _comparison_key(model, graph, [p for p, _ in items], args)
    # [Note: end-to-end times are cached per comparison]; measured afresh once a re-check contradicted it
    stored = None if recheck or model.refresh else model.cache.get_text(group)
    if stored is not None:
        try:
            hit = [float(ms) for ms in json.loads(stored)]
            if len(hit) == len(items):
                return hit
        except (ValueError, TypeError):
            pass  # unreadable: time again
    built = [assemble() for _, assemble in items]
    noisy = model.noisy
    samples: list[list[float]] = [[] for _ in items]
    repeats = _RECHECK_REPEATS if recheck else None

    failed: set[int] = set()

    def run_rounds(members: list[int], count: int) -> None:
        done = len(samples[members[0]])
        for r in range(done, done + count):
            k = r % len(members)  # the order rotates: none is always first after the previous compile
            for i in members[k:] + members[:k]:
                call = functools.partial(_call, built[i], args, restore)
                try:
                    samples[i].append(
                        model.time_call(call) if repeats is None else model.time_call(call, repeats)
                    )
                except Exception as exc:
                    if r > 0:  # it ran before: not a placement that cannot run
                        raise
                    failed.add(i)
                    _log_failure(items[i][0], graph, exc)

    start = time.perf_counter()
    run_rounds(list(range(len(items))), 1)
    order = [i for i in range(len(items)) if i not in failed]
    if not order:
        return [math.inf] * len(items)
    per_round = time.perf_counter() - start
    for left in range(rounds - 1, 0, -1):
        if not model.budget.fits(per_round):
            model.budget.skip("end-to-end rounds", left)
            break
        run_rounds(order, 1)
    ms = dict(zip(order, _paired_scores([samples[i] for i in order])))
    if len(order) > 1 and not recheck:
        finalists = sorted(order, key=ms.__getitem__)[:2]
        for _ in range(RUNOFF_ROUNDS):
            a, b = (ms[i] for i in finalists)
            if max(a, b) > min(a, b) * (1 + RUNOFF_MARGIN):
                break
            if not model.budget.fits(per_round * 2 / len(order)):
                model.budget.skip("end-to-end run-off rounds")
                break
            run_rounds(finalists, 1)
            ms.update(zip(finalists, _paired_scores([samples[i] for i in finalists])))
    out = [ms.get(i, math.inf) for i in range(len(items))]
    if model.noisy == noisy and not recheck:  # a comparison timed while the machine was busy is not kept
        model.cache.put_text(group, json.dumps(out))
    return out


_RECHECK_REPEATS = 3  # timed calls per timing in a warm compile's re-check


def _paired_scores(samples: Sequence[Sequence[float]]) -> list[float]:
    """Per contender, the median over rounds of its time over that round's geometric mean across the
    contenders, times the median round's geometric mean (rounds all contenders ran); see
    [Note: paired end-to-end rounds]. One contender: the median of its times."""
    n = min(len(s) for s in samples)
    refs = [math.exp(sum(math.log(s[r]) for s in samples) / len(samples)) for r in range(n)]
    scale = statistics.median(refs)
    return [statistics.median(s[r] / refs[r] for r in range(n)) * scale for s in samples]


def _log_failure(placement: Placement, graph: DataflowGraph, exc: Exception) -> None:
    """An assembled placement that raised when first timed is left out of the comparison (infinitely
    slow) rather than failing the compile: each partition was checked alone, but partitions
    together can still fail (a layout a later one was not traced for)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    logger.warning(
        "torch_collage: placement %s failed end to end, not using it: %s: %s",
        placement.describe(graph),
        type(exc).__name__,
        first,
    )


def _call(assembled: AssembledGraph, args: Sequence[Any], restore: Callable[[], None] | None) -> Any:
    if restore is not None:
        restore()
    return assembled(*args)


def _comparison_key(
    model: CostModel, graph: DataflowGraph, placements: Sequence[Placement], args: Sequence[Any]
) -> str:
    """The cache key of one side-by-side comparison: the graph, its inputs, the threads and each
    member's placement with its backends' versions, in order."""
    members = [
        f"{p.describe(graph)}|" + ",".join(f"{b}={model.versions[b]}" for b in p.backends) for p in placements
    ]
    return digest("e2e-group", str(model.gm.graph), tensor_signature(args), str(model.threads), *members)


# (model, graph, [(placement, assemble)], rounds=...) -> end-to-end ms of each: ``e2e_many_ms``'s signature
CompareFn = Callable[..., list[float]]


def assemble(gm: fx.GraphModule, placement: Placement, model: CostModel) -> AssembledGraph:
    """``placement`` compiled partition by partition; a partition that fails runs on eager (logged)."""
    steps = []
    for p in merge_eager_runs(placement).partitions:  # [Note: eager runs are one partition] in search.py
        part = model.compile(p.mask, p.backend)
        if part.fn is None:
            logger.warning("torch_collage: %s partition fell back to eager: %s", p.backend, part.reason)
            part = model.compile(p.mask, "eager")
        assert part.fn is not None, part.reason
        steps.append(Step(part.backend, part.fn, part.subgraph))
    return AssembledGraph(gm, steps)


class EndToEnd:
    """Assembles placements of one graph and times them side by side with ``compare``
    (``e2e_many_ms``: paired rounds, cached per comparison). A placement is compiled only when it
    must be timed or used, and the last comparison's placements stay built, since the next one
    (a refinement move beside the current placement) or the winner reuses one of them."""

    def __init__(self, gm: fx.GraphModule, model: CostModel, compare: CompareFn = e2e_many_ms) -> None:
        self.gm, self.model, self.graph, self._compare = gm, model, model.graph, compare
        self._built: dict[str, Assemble] = {}

    def lazy(self, placement: Placement) -> Assemble:
        """Assembles ``placement`` on its first call only (a warm compile builds just the winner)."""
        key = placement.describe(self.graph)
        if key not in self._built:
            self._built[key] = functools.cache(functools.partial(assemble, self.gm, placement, self.model))
        return self._built[key]

    def times(self, placements: Sequence[Placement], rounds: int = 2) -> list[float]:
        """End-to-end ms of each placement, timed side by side (a single one: timed alone)."""
        lazies = [self.lazy(p) for p in placements]
        keep = {p.describe(self.graph) for p in placements}
        self._built = {k: v for k, v in self._built.items() if k in keep}
        return self._compare(self.model, self.graph, list(zip(placements, lazies)), rounds=rounds)

    def recheck_times(self, placements: Sequence[Placement], rounds: int) -> list[float]:
        """End-to-end ms of each placement for a warm compile's re-check: a few calls per timing,
        paired rounds, nothing cached (``e2e_many_ms(recheck=True)``)."""
        items = [(p, self.lazy(p)) for p in placements]
        return e2e_many_ms(self.model, self.graph, items, rounds=rounds, recheck=True)

    def pair(self, a: Placement, b: Placement) -> tuple[float, float]:
        first, second = self.times([a, b])
        return first, second

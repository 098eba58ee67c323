"""Place one ATen graph, stage by stage; data flows one way:

    record eager values -> candidates -> measure (``measure``) -> search (``search``)
    -> merge measured runs (``measure``) -> refine (``refine``, optional) -> choose end to end,
    re-check a choice made from cached costs and verify against eager (``choose``) -> report
    (``report``)

All stages of one graph draw on one ``Budget`` of ``time_budget_s`` ([Note: the compile budget] in
timing.py).

A ``Placer`` runs the stages with the collaborators in its ``Stages`` (tests pass their own) and
holds what outlives one graph: the count of timings run and the warnings already given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from torch_collage.assembly import AssembledGraph
from torch_collage.backends.base import BackendSpec
from torch_collage.backends.registry import get_spec, registered_names
from torch_collage.cache import CostCache
from torch_collage.candidates import Candidate, enumerate_candidates
from torch_collage.choose import (
    AGREED_BEFORE,
    MIXED_MARGIN,
    Choice,
    Recheck,
    check_seconds,
    choose,
    recheck,
    single,
    verify,
)
from torch_collage.cost import CostModel, RngState, device_of, kept_rng, record_values
from torch_collage.endtoend import CompareFn, EndToEnd, e2e_many_ms
from torch_collage.graph import DataflowGraph
from torch_collage.measure import (
    FEWER_RUNTIMES,
    check_coverable,
    fewer_runtimes,
    measure_candidates,
    merge_measured,
    nearly_whole_placements,
    with_whole_graphs,
)
from torch_collage.options import CollageOptions
from torch_collage.refine import RefineFn, refine, refine_replayed
from torch_collage.report import GraphReport, graph_report
from torch_collage.rewrite import rewrite_for_placing
from torch_collage.search import Placement, search_cover
from torch_collage.segments import around_specialists, segment_candidates, specialists
from torch_collage.shapes import has_symbolic_inputs
from torch_collage.subgraph import digest
from torch_collage.timing import Budget, InterferenceProbe, QuietProbe

__all__ = ["Placer", "Stages", "default_placer", "measurement_count", "place_graph"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stages:
    """The search's exchangeable steps: ``search`` (the cover DP), ``refine`` (the measured local
    search) and ``compare`` (times assembled placements side by side)."""

    search: Any = search_cover  # (graph, candidates, cost_fn, switch_fn) -> Placement
    refine: RefineFn = refine
    compare: CompareFn = e2e_many_ms


class Placer:
    """Places graphs with ``stages``. ``measurements`` counts the timings its placements ran (a warm
    compile runs none); each unavailable backend and each backend failure is logged once."""

    def __init__(
        self, stages: Stages | None = None, probe: InterferenceProbe | QuietProbe | None = None
    ) -> None:
        self.stages = stages or Stages()
        self.probe = probe  # None: the process's shared probe ([Note: quiet measurements])
        self.measurements = 0
        self._warned_unavailable: set[str] = set()
        self._warned_failures: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        # structure -> the placement last chosen for it and the sizes it was placed at: [Note: a
        # graph generalised to a range is placed like the graph it came from]
        self._placed: OrderedDict[str, tuple[Placement, str]] = OrderedDict()

    def place(
        self, gm: fx.GraphModule, inputs: Sequence[Any], options: CollageOptions, kind: str = "inference"
    ) -> tuple[AssembledGraph, GraphReport]:
        """Search a placement of ``gm`` for ``inputs`` (real tensors) and assemble it."""
        budget = Budget(options.time_budget_s)  # [Note: the compile budget] in timing.py
        cache = CostCache(options.cache_dir)
        rng: dict[fx.Node, RngState] = {}
        done = rewrite_for_placing(gm, kind)  # [Note: rewrites before placing] in rewrite.py
        if done:
            logger.info("torch_collage: rewrote the %s graph before placing: %s", kind, done)
        try:
            with kept_rng(device_of(inputs)):  # [Note: random ops]
                graph = DataflowGraph.from_graph(gm.graph)
                values = record_values(gm, inputs, rng)
                specs = self.active_specs(options)
                model = CostModel(
                    gm, graph, values, specs, options, cache, self._warned_failures, rng, self.probe, budget
                )
                structure = _structure_key(graph, kind, options)
                like = self._placed.get(structure) if has_symbolic_inputs(gm) else None
                try:
                    if like is not None:
                        assembled, report, placement = self._place_like(gm, inputs, model, kind, *like)
                    else:
                        assembled, report, placement = self._place(gm, inputs, model, kind)
                    if placement is not None:
                        self._remember(structure, placement, _sizes(inputs))
                    return assembled, dataclasses.replace(report, rewrites=done) if done else report
                finally:
                    with self._lock:
                        self.measurements += model.measured
        finally:
            cache.close()

    def active_specs(self, options: CollageOptions) -> dict[str, BackendSpec]:
        """The backends to place on: the requested (or all registered) ones that are available, plus
        eager. One asked for by name but unavailable is logged once, with the reason."""
        names = list(options.backends or registered_names())
        specs = {"eager": get_spec("eager")}
        for name in names:
            spec = get_spec(name)
            ok, reason = spec.available()
            if ok:
                specs[name] = spec
            elif options.backends and name not in self._warned_unavailable:
                self._warned_unavailable.add(name)
                logger.warning("torch_collage: backend %s unavailable, not placing on it: %s", name, reason)
            else:
                logger.debug("torch_collage: backend %s unavailable: %s", name, reason)
        return specs

    def _remember(self, structure: str, placement: Placement, sizes: str) -> None:
        with self._lock:
            self._placed[structure] = (placement, sizes)
            self._placed.move_to_end(structure)
            while len(self._placed) > _REMEMBERED:
                self._placed.popitem(last=False)

    def _place_like(
        self,
        gm: fx.GraphModule,
        inputs: Sequence[Any],
        model: CostModel,
        kind: str,
        like: Placement,
        sizes: str,
    ) -> tuple[AssembledGraph, GraphReport, Placement | None]:
        """``like``, placed before for a graph of this structure at ``sizes``, assembled for this
        graph, timed beside eager once and verified; see [Note: a graph generalised to a range is
        placed like the graph it came from]."""
        start, graph = time.perf_counter(), model.graph
        e2e = EndToEnd(gm, model, self.stages.compare)
        eager = single(graph, "eager", math.inf)
        mine = like.partitions[0].backend if len(like.partitions) == 1 else "mixed"
        if mine == "eager":
            choice = Choice(e2e.lazy(eager)(), e2e.times([eager])[0], "eager", placement=eager)
        else:
            ms, eager_ms = e2e.times([like, eager], rounds=2)
            compared = {mine: ms, "eager": eager_ms}
            if eager_ms * (1 + MIXED_MARGIN) < ms:  # as a mixed placement must win: [Note: end-to-end check]
                logger.info(
                    "torch_collage: %s placement taken over %.3f ms, eager %.3f ms; using eager",
                    mine,
                    ms,
                    eager_ms,
                )
                choice = Choice(e2e.lazy(eager)(), eager_ms, "eager", compared, eager)
            else:
                choice = Choice(e2e.lazy(like)(), ms, mine, compared, like)
        if model.options.verify:
            choice = verify(e2e, choice, inputs)
        report = self._report(kind, model, like, choice, {}, {}, 0, start)
        return choice.assembled, dataclasses.replace(report, placed_like=sizes), None

    def _place(
        self, gm: fx.GraphModule, inputs: Sequence[Any], model: CostModel, kind: str
    ) -> tuple[AssembledGraph, GraphReport, Placement | None]:
        start, graph, options = time.perf_counter(), model.graph, model.options
        if graph.size == 0:
            empty = Choice(AssembledGraph(gm, []), 0.0, "eager")
            report = self._report(kind, model, Placement((), 0.0), empty, {}, {}, 0, start)
            return empty.assembled, report, None
        fast = options.mode == "fast"  # whole graphs only
        fine = [] if fast else enumerate_candidates(graph, list(model.specs.values()), options.max_depth)
        cands = with_whole_graphs(graph, fine, model)
        have = set(cands)
        coarse = [] if fast else segment_candidates(graph, model.specs.values(), options.segments)
        if not fast:  # [Note: regions around a specialist] in segments.py
            special = specialists(graph, model.specs.values())
            around = around_specialists(graph, model.specs.values(), options.max_depth)
            coarse = list(dict.fromkeys(coarse + around + [c for c in fine if c.backend in special]))
        cands += [c for c in coarse if c not in have]  # a short segment may equal a fine candidate
        capped = not math.isinf(options.time_budget_s)
        slack = _SLACK * options.time_budget_s if capped else 0.0
        mixes = not fast and sum(name != "eager" for name in model.specs) > 1  # [Note: fewer runtimes]
        spare = _FEWER_SHARE * options.time_budget_s if capped and mixes else 0.0

        def reserve(costs: dict[Candidate, float]) -> float:  # the seconds the stages after measuring need
            return check_seconds(_singles(graph, model, costs), options) + slack + spare

        def searched() -> Placement:
            placement = self.stages.search(graph, cands, lambda c: costs.get(c, math.inf), model.switch_cost)
            return merge_measured(placement, graph, model, costs, reserve(costs))

        costs = measure_candidates(cands, model, set(coarse), reserve, spare)
        check_coverable(graph, costs, model)
        placement = searched()
        e2e = EndToEnd(gm, model, self.stages.compare)
        if options.search == "dp+refine" and options.mode == "search" and len(model.specs) > 1:
            placement = refine_replayed(placement, e2e, costs, self.stages.refine, reserve(costs))
        singles = _singles(graph, model, costs)
        # every cost came from the cache, or the whole graphs' did: what the choice rests on
        warm = model.measured == 0 or bool(model.read_wholes)
        nearly = nearly_whole_placements(graph, model, costs)
        fewer = self._fewer_runtimes(placement, model, costs, singles)  # [Note: fewer runtimes] in measure.py
        if fewer is not None:
            nearly[FEWER_RUNTIMES] = fewer
        choice = choose(e2e, placement, singles, nearly)
        checked = None
        if warm:  # [Note: quiet measurements] in timing.py
            checked = self._recheck(e2e, choice, singles)
            if checked.contradicted:
                logger.warning("torch_collage: cached costs %s; measuring again", checked.outcome)
                singles = self._remeasure_singles(model, costs, singles)
                placement = searched()  # on the costs measured again
                choice = choose(e2e, placement, singles, nearly)
        if options.verify:
            choice = verify(e2e, choice, inputs)
        report = self._report(kind, model, placement, choice, singles, costs, len(cands), start, checked)
        return choice.assembled, report, choice.placement

    def _recheck(self, e2e: EndToEnd, choice: Choice, singles: dict[str, float]) -> Recheck:
        """``recheck`` of a choice made from cached costs, unless a re-check of the same choice on
        the same cached costs agreed before (kept in the cache): see [Note: quiet measurements]."""
        model = e2e.model
        ran = choice.placement.describe(model.graph) if choice.placement is not None else ""
        costs = json.dumps({"chosen": choice.measured_ms, **singles}, sort_keys=True)
        key = model.search_key("re-check agreed", choice.chosen, ran, costs)
        if model.cache.get_text(key) is not None:
            return Recheck(AGREED_BEFORE, {})
        checked = recheck(e2e, choice, singles)
        if checked.outcome.startswith("agreed"):
            model.cache.put_text(key, checked.outcome)
        return checked

    def _fewer_runtimes(
        self, placement: Placement, model: CostModel, costs: dict[Candidate, float], singles: dict[str, float]
    ) -> Placement | None:
        """The searched placement on fewer runtimes, where one exists and its compiles fit in the
        budget beyond the end-to-end check ([Note: fewer runtimes] in measure.py). The decision is
        cached with the search, so a warm compile replays the cold one's comparison."""
        found = fewer_runtimes(
            placement, costs, model.switch_cost, model.predicted_s, lambda b: model.specs[b].pool
        )
        if found is None:
            return None
        variant, seconds = found
        key = model.search_key("fewer runtimes", variant.describe(model.graph))
        decided = model.cache.get_text(key)
        if decided is None:
            decided = "1" if model.budget.fits(seconds, check_seconds(singles, model.options)) else "0"
            model.cache.put_text(key, decided)
        if decided == "1":
            return variant
        model.budget.skip("placement on fewer runtimes")
        return None

    def _remeasure_singles(
        self, model: CostModel, costs: dict[Candidate, float], singles: dict[str, float]
    ) -> dict[str, float]:
        """Each whole graph measured before, measured again (the cache is not read: ``refresh``)
        where the budget has time for it; the end-to-end comparisons after it are timed afresh too."""
        model.refresh = True
        out = dict(singles)
        for backend in singles:
            cand = Candidate(model.graph.full, backend)
            if cand not in costs:
                continue
            if backend == "eager" or model.budget.fits(model.predicted_s(cand) or 0.0):
                out[backend] = costs[cand] = model.cost(cand)
            else:
                model.budget.skip(f"whole graph on {backend}")
        return out

    def _report(
        self,
        kind: str,
        model: CostModel,
        searched: Placement,
        choice: Choice,
        singles: dict[str, float],
        costs: dict[Candidate, float],
        candidates: int,
        start: float,
        checked: Recheck | None = None,
    ) -> GraphReport:
        return graph_report(
            kind=kind,
            graph=model.graph,
            searched=searched,
            chosen=choice.chosen,
            ran=choice.placement,
            measured_ms=choice.measured_ms,
            singles=singles,
            costs=costs,
            candidates=candidates,
            measured=model.measured,
            search_s=model.budget.spent(),
            rejected=model.reasons,
            loaded=model.loaded,
            segments=model.options.segments,
            compared=choice.compared,
            noisy=model.noisy,
            budget=model.budget,
            recheck=checked.outcome if checked else "",
            recheck_ms=checked.times if checked else None,
        )


# [Note: a graph generalised to a range is placed like the graph it came from]
# Dynamo compiles a frame for the sizes of its first call, and when a later call brings other sizes
# it compiles the frame again with those sizes symbolic (automatic dynamic shapes): a decoder's
# ``generate()`` hands collage its first decode step at fixed sizes, then the same step for every
# cache length. The second graph computes what the first did, op for op, only for a range of sizes
# that includes the first one's. So a graph with symbolic sizes whose units carry the same ops with
# the same dataflow as a graph this placer placed before (same kind, same backends and options) is
# not searched again: the earlier choice is assembled for it (each partition compiled and checked
# against eager as always, for the range where its backend can: [Note: shape ranges] in
# shapes.py), timed once beside eager, which runs instead where it is faster by ``MIXED_MARGIN``
# (a re-timed tie is noise, not a reason to drop the searched choice), and verified. The earlier graph's
# sizes are in the range, so they serve as the range's representative size. ``GraphReport.placed_like``
# names them, and ``explain`` says the graph was not searched. Only graphs with symbolic sizes are
# placed this way: a new graph at other fixed sizes (``dynamic=False``) is the user's request for a
# placement per size. The placer keeps the last ``_REMEMBERED`` structures.
_REMEMBERED = 64


def _structure_key(graph: DataflowGraph, kind: str, options: CollageOptions) -> str:
    """Sizes left out: the units' ops and dataflow, the graph's kind and what decides a placement."""
    units = [f"{u[0].target}:{len(u)}:{graph.preds[i]:x}" for i, u in enumerate(graph.units)]
    chosen = (
        options.backends,
        options.mode,
        options.search,
        options.threads,
        options.segments,
        options.max_depth,
    )
    return digest("structure", kind, repr(chosen), *units)


def _sizes(inputs: Sequence[Any]) -> str:
    """``[1, 4, 8, 16], ...``: the sizes of the tensor inputs (the first few)."""
    shapes = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    more = f", ... ({len(shapes)} tensors)" if len(shapes) > _SHOWN_SIZES else ""
    return ", ".join(str(s) for s in shapes[:_SHOWN_SIZES]) + more


_SHOWN_SIZES = 4

# Of the budget, the share kept beyond the end-to-end check's predicted seconds, for the search,
# merging, assembly and verification ([Note: the compile budget] in timing.py).
_SLACK = 0.05
# Of the budget, the share kept for compiling the placement on fewer runtimes where the placement may
# mix runtimes ([Note: fewer runtimes] in measure.py): on a 32K-slot Llama decode step its eight
# Inductor layers needed 9 s of a 50 s budget, and they beat the searched mix by 13% end to end.
# The whole graphs, segments and nearly whole graphs are measured without it (one of them is the
# placement to beat); the small candidates after them leave it.
_FEWER_SHARE = 0.15


def _singles(graph: DataflowGraph, model: CostModel, costs: dict[Candidate, float]) -> dict[str, float]:
    """Each backend's whole-graph ms (inf: failed, or not measured)."""
    return {b: costs.get(Candidate(graph.full, b), math.inf) for b in model.specs}


_DEFAULT = Placer()


def default_placer() -> Placer:
    """The placer that ``torch.compile(..., backend="collage")`` and ``explain`` use unless given one."""
    return _DEFAULT


def measurement_count() -> int:
    """How many timings the default placer has run in this process (cache hits are not counted)."""
    return _DEFAULT.measurements


def place_graph(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    options: CollageOptions,
    kind: str = "inference",
    placer: Placer | None = None,
) -> tuple[AssembledGraph, GraphReport]:
    """Search a placement of ``gm`` for ``inputs`` (real tensors) with ``placer`` (the default one
    when None) and assemble it."""
    return (placer or _DEFAULT).place(gm, inputs, options, kind)

"""Which candidates are measured, in what order, under the time budget; and the measured merging of
the searched cover's same-backend runs. Every cost comes from the ``CostModel`` (cached, persistent).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from torch_collage.backends.base import BackendSpec
from torch_collage.candidates import Candidate
from torch_collage.cost import CostModel
from torch_collage.graph import DataflowGraph, bits
from torch_collage.search import Partition, Placement, merge_groups, merge_run

__all__ = [
    "FEWER_RUNTIMES",
    "FEWER_RUNTIMES_TOLERANCE",
    "LOCAL_SPEEDUP",
    "Progress",
    "ReserveFn",
    "UnplaceableGraph",
    "check_coverable",
    "fewer_runtimes",
    "measure_candidates",
    "merge_measured",
    "nearly_whole_placements",
    "rank_candidates",
    "remeasure",
    "search_key",
    "with_whole_graphs",
]

logger = logging.getLogger(__name__)

Costs = dict[Candidate, float]


def with_whole_graphs(graph: DataflowGraph, cands: list[Candidate], model: CostModel) -> list[Candidate]:
    """``cands`` plus the whole graph on every backend that supports all of it (the single-backend
    placements are always among the contenders), and on every other backend, its nearly whole
    graph with eager's singletons around it ([Note: nearly whole graphs])."""
    have = set(cands)
    for name, spec in model.specs.items():
        refused = _refused(graph, spec)
        mask = graph.full & ~refused
        if mask and (not refused or _nearly_whole(graph, refused)):
            extra = [Candidate(mask, name)] + [Candidate(1 << u, "eager") for u in bits(refused)]
            cands += [c for c in extra if c not in have]
            have.update(extra)
    return cands


# [Note: nearly whole graphs]
# A graph that writes its inputs ends in ``copy_`` nodes (a static KV cache's update, BatchNorm's
# running statistics in training), and only eager runs mutating ops. So no runtime could take such
# a graph whole, and its whole-graph contender, the placement most likely to win on a CPU where
# the runtimes differ by region less than a boundary costs, was never measured: a Llama decode
# step could only be cut into small pieces. Where the units a backend refuses are few (at most
# ``NEARLY_WHOLE_SHARE`` of the graph's) and the rest is convex (they are the graph's first or last
# steps, like a write-back epilogue), that rest is a candidate measured with the whole graphs, and
# eager's singletons for the refused units keep it coverable, also in ``mode="fast"``. The share is
# relative: an 8-layer Llama's decode graph writes 16 cache tensors back, and a cap of 8 units
# left Inductor, the fastest single backend at 512 slots, without a contender in collage.
NEARLY_WHOLE_SHARE = 0.1


def _refused(graph: DataflowGraph, spec: BackendSpec) -> int:
    return sum(1 << i for i, unit in enumerate(graph.units) if not spec.supports_node(unit[0]))


def _nearly_whole(graph: DataflowGraph, refused: int) -> bool:
    count = refused.bit_count()
    few = count <= max(8, NEARLY_WHOLE_SHARE * graph.size) and count < graph.size // 2
    return few and graph.is_convex(graph.full & ~refused)


def nearly_whole_placements(graph: DataflowGraph, model: CostModel, costs: Costs) -> dict[str, Placement]:
    """Each backend's measured nearly whole graph as a placement, eager's singletons for the refused
    units before or after it ([Note: nearly whole graphs]); keyed ``"<backend> (nearly whole)"``.
    A refused unit with an ancestor in the rest runs after it, the others before (the rest is convex,
    so no unit after it feeds it and no unit before it depends on it)."""
    out: dict[str, Placement] = {}
    for name, spec in model.specs.items():
        refused = _refused(graph, spec)
        rest = graph.full & ~refused
        ms = costs.get(Candidate(rest, name), math.inf)
        if not refused or not rest or not math.isfinite(ms):
            continue
        before = [u for u in bits(refused) if not graph.ancestors[u] & rest]
        after = [u for u in bits(refused) if graph.ancestors[u] & rest]
        eager = {u: costs.get(Candidate(1 << u, "eager"), math.inf) for u in (*before, *after)}
        if not all(math.isfinite(v) for v in eager.values()):
            continue
        parts = [Partition(1 << u, "eager", eager[u]) for u in before]
        parts += [Partition(rest, name, ms), *(Partition(1 << u, "eager", eager[u]) for u in after)]
        out[f"{name} (nearly whole)"] = Placement.priced(parts, model.switch_cost)
    return out


# [Note: fewer runtimes]
# Partition costs are measured alone, each with its weights still in the CPU's caches from its own
# previous repeat, and the switch costs on tiny probe graphs; assembled, every change of thread pool
# hands the cores from one pool to another (ONNX Runtime's and OpenVINO's pools are their own;
# eager, Inductor's C++ kernels and torch_cp's kernel share torch's, ``BackendSpec.threads``), and
# every partition reads its weights afresh. So backends whose partitions measured within a percent or
# two of each other are a coin flip for the search, and the flip decides how many thread pools the
# placement alternates between: on a 32K-slot Llama decode step ONNX Runtime's eight layers around
# torch_cp's attention measured 0.863 ms each and Inductor's 0.879 ms, yet Inductor's ran the step
# 13% faster end to end. The end-to-end check therefore also times a variant of the searched
# placement on fewer thread pools: for each backend that measured any of its partitions, every
# partition (eager's aside) that backend ran within ``FEWER_RUNTIMES_TOLERANCE`` of the partition's
# own cost moves to it; the variant that leaves the fewest pools (then the lowest predicted time) is a
# contender named ``FEWER_RUNTIMES``, and wins only as a mixed placement wins ([Note: a mixed
# placement must win clearly] in choose.py).
FEWER_RUNTIMES_TOLERANCE = 0.05
FEWER_RUNTIMES = "mixed, fewer runtimes"


def fewer_runtimes(
    placement: Placement,
    costs: Costs,
    switch: Callable[[str, str], float],
    predicted_s: Callable[[Candidate], float | None],
    pool: Callable[[str], str],
) -> tuple[Placement, float] | None:
    """The searched ``placement`` on fewer thread pools (``pool``: a backend's, see
    ``BackendSpec.pool``), priced with ``switch``, and the seconds its moved partitions will likely
    take to compile (``predicted_s``, the cost model's); None where no backend takes over partitions
    within the tolerance so that fewer pools are left ([Note: fewer runtimes])."""
    pools = len({pool(b) for b in placement.backends})
    targets = sorted({c.backend for c in costs if c.backend != "eager"})
    best: tuple[int, float, Placement, float] | None = None
    for target in targets:
        parts, seconds = [], 0.0
        for p in placement.partitions:
            ms = costs.get(Candidate(p.mask, target), math.inf)
            if p.backend not in ("eager", target) and ms <= p.cost_ms * (1 + FEWER_RUNTIMES_TOLERANCE):
                parts.append(Partition(p.mask, target, ms))
                seconds += predicted_s(Candidate(p.mask, target)) or 0.0
            else:
                parts.append(p)
        variant = Placement.priced(parts, switch)
        left = len({pool(b) for b in variant.backends})
        if left < pools and (best is None or (left, variant.predicted_ms) < best[:2]):
            best = (left, variant.predicted_ms, variant, seconds)
    return (best[2], best[3]) if best is not None else None


def measure_candidates(
    cands: list[Candidate],
    model: CostModel,
    coarse: set[Candidate],
    reserve: ReserveFn = lambda costs: 0.0,
    spare_s: float = 0.0,
) -> Costs:
    """Cost of the candidates worth measuring within the time budget, stage by stage: the whole
    graphs (eager first, then the others by their expected measuring time), eager's singletons
    (they keep a cover reachable and give each op's eager time), the ``coarse`` segments ([Note:
    coarse segments]), then the rest, the most promising first and certain losers never ([Note:
    candidates worth measuring]). Each step is taken only where its predicted seconds fit in what
    the budget has left beyond ``reserve(costs)``, the seconds the stages after measuring will need
    ([Note: the compile budget] in timing.py), of which ``spare_s`` only the small candidates after
    the whole graphs, segments and nearly whole graphs leave; what is left out is counted in
    ``model.budget``.

    [Note: a budget-cut search replays its cut]
    A warm compile measures nothing, so it is faster than the cold one and would get further within
    the same budget. So the candidates a cold search measured are cached, and a warm one measures
    exactly those: it finds every cost it needs in the cache. Except the whole and nearly whole
    graphs a cold search left out, the contenders every placement is judged against: a cold search
    on a busy machine predicted their compiles too slow for its budget, so a warm compile measures
    them where its own budget fits them, and the cut grows by them. Replaying that cut instead kept
    eager for resnet18 (97 ms) on a quiet machine where OpenVINO's whole graph ran 63 ms."""
    options = model.options
    key = search_key(model, "measure", f"{options.time_budget_s}:{options.max_candidates}:{len(cands)}")
    replay = _replayed(model.cache.get_text(key), cands)
    with Progress(model, len(cands), options.progress) as progress:
        if replay is not None:
            costs = {cand: progress.measure(cand) for cand in replay}
            refused = {name: _refused(model.graph, spec) for name, spec in model.specs.items()}
            full = model.graph.full
            contenders = [
                c
                for c in cands
                if c not in costs and not _essential(c) and c.mask | refused[c.backend] == full
            ]
            for cand in sorted(contenders, key=lambda c: model.predicted_s(c) or 0.0):
                if model.budget.fits(model.predicted_s(cand) or 0.0, reserve(costs) - spare_s):
                    costs[cand] = progress.measure(cand)
            if len(costs) == len(replay):
                return costs
        else:
            costs = _measure_budgeted(cands, model, coarse, reserve, progress, spare_s)
    model.cache.put_text(key, json.dumps([[str(c.mask), c.backend] for c in costs]))
    return costs


ReserveFn = Callable[[Costs], float]  # costs measured so far -> seconds to keep for the later stages

# [Note: candidates worth measuring]
# Measuring a candidate compiles it (Inductor: about a second for a few ops on 2 cores) and a cold
# search has hundreds, so the budget goes to the ones that could change the placement. Once every
# backend's whole graph and eager's time per op are measured, a candidate ``c`` on backend ``b``
# is bounded: its ops take about ``current = eager(c) * best / eager(all)`` in the best single
# placement (their share of eager's time, scaled to the fastest whole graph); ``b`` runs them in at
# least ``eager(c) * ratio_b / LOCAL_SPEEDUP`` (``ratio_b``: ``b``'s whole graph over eager's; a
# piece may run up to ``LOCAL_SPEEDUP`` times better than the whole does, and a backend that fails
# the whole graph is not bounded at all; eager runs a region no faster than its slowest op); and
# moving them to ``b`` adds two switches from the best backend. A candidate that saves nothing even
# so (``current - lower - switches <= 0``) is a certain loser and is not measured; the rest are
# measured by that saving, largest first, until the budget is spent. On a 4-layer BERT where
# Inductor's whole graph ran ~60x eager's time, that left every Inductor piece unmeasured.
LOCAL_SPEEDUP = 2.0


def _measure_budgeted(
    cands: list[Candidate],
    model: CostModel,
    coarse: set[Candidate],
    fine_reserve: ReserveFn,
    progress: Progress,
    spare_s: float,
) -> Costs:
    full, budget = model.graph.full, model.budget

    def reserve(costs: Costs) -> float:  # the whole, nearly whole graphs and segments may use the spare
        return fine_reserve(costs) - spare_s

    costs: Costs = {}
    refused = {name: _refused(model.graph, spec) for name, spec in model.specs.items()}
    # the whole graphs, and the nearly whole ones ([Note: nearly whole graphs]), measured after the
    # segments: a graph that writes its state can be placed from eager's ops and the regions around
    # a specialist ([Note: regions around a specialist] in segments.py), which repeat and cost a few
    # compiles, while each nearly whole graph is a whole compile (Llama's decode at 8K slots: the
    # three took the budget, and eager ran it at 7x the mix of runtimes and torch_cp).
    whole = [c for c in cands if c.mask == full and not _essential(c)]
    nearly = [
        c for c in cands if c.mask != full and c.mask | refused[c.backend] == full and not _essential(c)
    ]
    singles = [c for c in cands if _essential(c)]
    segments = [c for c in cands if c not in nearly and c in coarse and not _essential(c)]
    fine = [c for c in cands if c.mask | refused[c.backend] != full and c not in coarse and not _essential(c)]
    progress.stage("whole graphs", whole)
    for cand in sorted(whole, key=lambda c: (c.backend != "eager", model.predicted_s(c) or 0.0)):
        if cand.backend == "eager" or budget.fits(model.predicted_s(cand) or 0.0, reserve(costs)):
            costs[cand] = progress.measure(cand)
        else:
            budget.skip(f"whole graph on {cand.backend}")
            progress.skip(cand)
    # a cover needs eager's singletons only when eager's whole graph failed
    eager_whole = math.isfinite(costs.get(Candidate(full, "eager"), math.inf))
    for stage, group in (("eager ops", singles), ("segments", segments), ("nearly whole graphs", nearly)):
        progress.stage(stage, group)
        ordered = sorted(group, key=lambda c: model.predicted_s(c) or 0.0) if stage != "eager ops" else group
        for cand in ordered:
            forced = stage == "eager ops" and not eager_whole
            if forced or budget.fits(model.predicted_s(cand) or 0.0, reserve(costs)):
                costs[cand] = progress.measure(cand)
            else:
                budget.skip(stage)
                progress.skip(cand)
    if fine and not budget.fits(0.0, fine_reserve(costs)):  # no time left: not even for bounding them
        budget.skip("candidates", len(fine))
        progress.skip(*fine)
        return costs
    ranked, losers = rank_candidates(fine, model, costs)
    budget.skip("certain losers", len(losers))
    progress.stage("candidates", ranked)
    progress.skip(*losers)
    measured = 0
    for cand in ranked:
        if measured < model.options.max_candidates and budget.fits(
            model.predicted_s(cand) or 0.0, fine_reserve(costs)
        ):
            costs[cand] = progress.measure(cand)
            measured += 1
        else:
            budget.skip("candidates" if measured < model.options.max_candidates else "over max_candidates")
            progress.skip(cand)
    return costs


def rank_candidates(
    fine: list[Candidate], model: CostModel, costs: Costs
) -> tuple[list[Candidate], list[Candidate]]:
    """``fine`` ordered by the most they could save, largest first, and the certain losers apart
    ([Note: candidates worth measuring]). Without eager's time per op or any whole graph measured
    nothing is bounded: ``fine`` keeps its order, smallest first."""
    full = model.graph.full
    eager = {c.lowest: ms for c, ms in costs.items() if c.backend == "eager" and c.size == 1}
    total = sum(ms for ms in eager.values() if math.isfinite(ms))
    wholes = {c.backend: ms for c, ms in costs.items() if c.mask == full and math.isfinite(ms)}
    if not wholes or total <= 0:
        return sorted(fine, key=lambda c: (c.size, c.mask)), []
    best_backend = min(wholes, key=lambda b: wholes[b])
    scale = wholes[best_backend] / total
    keep: list[tuple[float, Candidate]] = []
    losers: list[Candidate] = []
    for cand in fine:
        ops = [eager.get(u, math.nan) for u in bits(cand.mask)]
        if not all(math.isfinite(ms) for ms in ops):
            keep.append((0.0, cand))  # no eager time to bound it by: measured last
            continue
        if cand.backend == "eager":
            lower = max(ops)
        elif cand.backend in wholes:
            lower = sum(ops) * wholes[cand.backend] / total / LOCAL_SPEEDUP
        else:
            lower = 0.0
        switches = 0.0 if cand.backend == best_backend else 2 * model.switch_cost(best_backend, cand.backend)
        saving = sum(ops) * scale - lower - switches
        if saving > 0:
            keep.append((saving, cand))
        else:
            losers.append(cand)
    keep.sort(key=lambda sc: (-sc[0], sc[1].size, sc[1].mask))
    return [c for _, c in keep], losers


def _replayed(stored: str | None, cands: list[Candidate]) -> list[Candidate] | None:
    """The candidates a cold search measured ([Note: a budget-cut search replays its cut]), or None
    when none are stored (or they do not parse, or name a candidate not among ``cands``)."""
    if stored is None:
        return None
    have = set(cands)
    try:
        out = [Candidate(int(mask), str(backend)) for mask, backend in json.loads(stored)]
    except (ValueError, TypeError):
        return None
    return out if all(c in have for c in out) else None


class UnplaceableGraph(RuntimeError):
    """No backend could run some node of the graph, not even eager; the message names it and why."""


def check_coverable(graph: DataflowGraph, costs: Costs, model: CostModel) -> None:
    """Raise ``UnplaceableGraph`` naming the first node that no measured candidate covers, with each
    backend's reason for it, instead of letting the search fail without saying where."""
    covered = 0
    for cand, ms in costs.items():
        if math.isfinite(ms):
            covered |= cand.mask
    missing = graph.full & ~covered
    if not missing:
        return
    unit = (missing & -missing).bit_length() - 1
    node = graph.units[unit][0]
    reasons = {b: r for (mask, b), r in model.reasons.items() if mask >> unit & 1}
    why = "; ".join(f"{b}: {r}" for b, r in sorted(reasons.items())) or "no backend supports it"
    raise UnplaceableGraph(
        f"torch_collage cannot place node {node.name!r} ({node.op} {node.target}) on any backend: {why}"
    )


def _essential(cand: Candidate) -> bool:
    return cand.backend == "eager" and cand.size == 1


class Progress:
    """A progress bar over one graph's candidates: the stage, how many are done, and the seconds
    left as predicted from what measuring each backend's candidates took so far in this search
    (never more than the budget has left); off with option ``progress=False`` and for fewer than
    50 candidates. ``measure(cand)`` is ``model.cost(cand)`` counted on the bar."""

    def __init__(self, model: CostModel, total: int, enabled: bool) -> None:
        self.model, self._stage = model, ""
        self._todo: list[Candidate] = []
        self._bar = _bar(total, enabled and total >= 50)
        self._shown = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def stage(self, name: str, todo: list[Candidate]) -> None:
        self._stage, self._todo = name, list(todo)
        self._bar.set_description_str(f"collage: {name}", refresh=False)
        self._update(force=True)

    def measure(self, cand: Candidate) -> float:
        ms = self.model.cost(cand)
        self.skip(cand)
        return ms

    def skip(self, *cands: Candidate) -> None:
        done = set(cands)
        self._todo = [c for c in self._todo if c not in done]
        self._bar.update(len(cands))
        self._update()

    def eta_s(self) -> float | None:
        """Predicted seconds to measure what is left of this stage (None: nothing measured to go by),
        capped at what the budget has left."""
        predictions = [self.model.predicted_s(c) for c in self._todo]
        if any(p is None for p in predictions):
            return None
        return min(sum(p for p in predictions if p is not None), max(0.0, self.model.budget.left()))

    def _update(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._bar.disable or (not force and now - self._shown < 0.5):
            return
        self._shown = now
        eta = self.eta_s()
        left = self.model.budget.left()
        budget = f"; budget {left:.0f} s left" if math.isfinite(left) else ""
        self._bar.set_postfix_str(f"~{eta:.0f} s to go{budget}" if eta is not None else f"?{budget}")


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    fmt = "{desc}: {n_fmt}/{total_fmt} candidates [{elapsed}{postfix}]"
    return tqdm(total=total, desc="collage", bar_format=fmt, disable=not enabled, postfix="?")


def merge_measured(
    placement: Placement, graph: DataflowGraph, model: Any, costs: Costs, reserve_s: float = 0.0
) -> Placement:
    """The searched cover with each run of touching same-backend partitions merged into one region,
    where that region measures no slower than its parts (``model``: ``cost``, ``switch_cost``,
    ``budget`` and ``predicted_s``). A region whose measuring does not fit in the budget beyond
    ``reserve_s`` stays apart, priced as its parts ([Note: the compile budget] in timing.py).

    [Note: merged regions are measured]
    Merging the cover's consecutive same-backend partitions saves calls and lets the backend fuse
    across them, but a merged region is a new subgraph with a cost of its own, and it can be slower
    than its parts summed: on dlrm with 4 segments two OpenVINO segments beat ONNX Runtime's whole
    graph, while merged they were OpenVINO's whole graph, 8.85 ms against ONNX Runtime's 7.74 ms.
    Each merged region is therefore measured and kept only where it is no slower than the sum of
    its parts; otherwise, or where it fails to compile, the parts stay separate partitions run one
    after the other on the same backend."""
    parts: list[Partition] = []
    for group in merge_groups(placement, graph):
        if len(group) == 1:
            parts.append(group[0])
            continue
        run = merge_run(group)  # priced as the sum of its parts
        if run.backend == "eager":  # [Note: eager runs are one partition] in search.py
            parts.append(run)
            continue
        cand = Candidate(run.mask, run.backend)
        if cand not in costs and model.was_cut(f"merge {cand.mask} {cand.backend}"):
            model.budget.skip("merged regions")
            parts.extend(group)
            continue
        if cand not in costs and not model.budget.fits(model.predicted_s(cand) or 0.0, reserve_s):
            model.cut(f"merge {cand.mask} {cand.backend}", "merged regions")
            parts.extend(group)
            continue
        if cand not in costs:
            costs[cand] = model.cost(cand)
        if costs[cand] <= run.cost_ms:
            parts.append(Partition(run.mask, run.backend, costs[cand]))
        else:
            logger.debug(
                "torch_collage: %s region of %d partitions kept apart: %.3f ms merged, %.3f ms apart",
                cand.backend, len(group), costs[cand], run.cost_ms,
            )  # fmt: skip
            parts.extend(group)
    return Placement.priced(parts, model.switch_cost)


def remeasure(placement: Placement, model: CostModel, costs: Costs) -> Placement:
    """``placement`` priced with each partition's measured cost ([Note: refined regions are measured]
    in refine.py); a partition that fails alone keeps its predicted cost."""
    parts = []
    for p in placement.partitions:
        cand = Candidate(p.mask, p.backend)
        if cand not in costs:
            costs[cand] = model.cost(cand)
        cost = costs[cand] if math.isfinite(costs[cand]) else p.cost_ms
        parts.append(Partition(p.mask, p.backend, cost))
    return Placement.priced(parts, model.switch_cost)


def search_key(model: CostModel, *parts: str) -> str:
    """Cache key of a budgeted search step: the graph, its inputs, the backends, threads and ``parts``."""
    return model.search_key(*parts)

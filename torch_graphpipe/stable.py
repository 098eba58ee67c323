"""Planning that gives the same plan when profiled costs move within their spread.

[Note: plans that reproduce]
Operator times measured on a shared machine move from one profile to the next, and a planner that
takes them as exact picks a different partition each time: the binary search lands on whichever of
several near-equal bottlenecks the noise made smallest, identical branches swap places in the cost
order, and a candidate plan wins by a fraction of a percent (taken as exact, cost tables of the zoo's
CANDLE-Uno, DLRM and MMT whose operator times are scaled by +-5% give a different 8-stage plan in
nearly every draw). So planning uses what a profile knows, and no more:

* Profiling keeps, per operator, the median of its samples, their interquartile range
  (``OpCost.fwd_spread_ms`` / ``bwd_spread_ms``), how many samples there were (``OpCost.samples``)
  and a signature of the work (module type and configuration or function, input shapes and dtypes);
  operators with one signature pool their samples (torch_graphpipe/profile.py).
* The planner plans on pooled costs (:func:`planning_costs`): the operators of one signature get the
  median of their medians and spreads, and their samples add up. Identical branches then cost exactly
  the same, and every tie between them is broken by position, never by noise or dict order.
* A median of ``n`` samples is known to about ``NOTCH * IQR / sqrt(n)`` (the notch of a box plot,
  about a 95% interval). The planning margin (:func:`planning_margin`) is that uncertainty for a
  stage of average time: the root sum of squares over signature groups (a group moves as one, and is
  counted as if it landed in one stage), relative to the mean stage time. A table without spreads
  (built by hand) has margin zero: only float rounding (``TIE``) is noise there.
* Wherever comparing costs decides the plan's structure, differences within the margin count as
  equal and structure decides: branches of a parallel part are ordered by cost, with runs of costs
  within the combined margin kept in position order (:func:`by_cost`); the late input of a join stage
  is the highest-numbered among those within the margin (torch_graphpipe/stage_graph.py); the DAG
  search also runs with slack on its bottleneck (the margin, at least ``CostTable.tolerance``), so its
  partition does not hinge on which of several near-equal bottlenecks the noise made smallest.
* Whole plans are compared by simulated step, never by a proxy, and taken in a fixed order (see
  [Note: DAG plan candidates] in torch_graphpipe/plan_search.py; micro-batch counts ascending): the
  plan kept is the first whose step is within the plan noise of the fastest candidate's
  (:func:`first_within`), the greedy ``W`` placement replaces the fixed one only when faster by more
  than the plan noise (:func:`ahead`).

[Note: plan noise]
The plan noise (:func:`plan_noise`) is the combined margin of two plans (``sqrt(2)`` times the
margin), but at most ``MAX_PLAN_NOISE`` (5%). The margin is the uncertainty of one stage; a plan's
step adds up every stage over every micro-batch, and two plans of one cost table share their
operators' errors, so their simulated steps move together and the difference between them is mostly
structure (depth, bubbles, which stage is the bottleneck), which noise does not move. A profile taken
on a loaded machine has margins of 10-16% (interquartile ranges of 8-10% of the median, 11 samples);
counted in full between whole plans, such a margin kept plans the same simulation rated 1.17-1.35x
slower (the zoo's DLRM: the DAG search's wide plan, 7 stages of in-flight 2, over the chain split laid
out as a DAG; see tests/torch_graphpipe/test_plan_stability.py). With the cap, whatever the spread,
the plan kept is simulated at most ``MAX_PLAN_NOISE`` slower than the fastest candidate, and planning
reproduces where the candidates are either that close or clearly apart. The margin still counts in
full where it compares parts of one plan (branch order, late inputs) or only proposes candidates
(the DAG search's slack, the chain split windows of [Note: chain split candidates] in
torch_graphpipe/plan_search.py).

The price is bounded by the plan noise: a plan simulated slower than the fastest candidate by less
than it may be kept (the micro-batch count: at least ``CostTable.tolerance``, which prefers larger
micro-batches). Chain splits (``stage_graph="chain"``, the chain candidates of a DAG plan, and the
splits torch's chain schedules run) are proposed within the margin and chosen by simulation, see
[Note: stable chain splits] in torch_graphpipe/chain.py; the ``W`` placement of a zero-bubble schedule
in [Note: W placement within the margin] in torch_graphpipe/zero_bubble.py.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import TypeVar

from torch_graphpipe.profile import CostTable, OpCost

__all__ = [
    "MAX_PLAN_NOISE",
    "NOTCH",
    "TIE",
    "ahead",
    "by_cost",
    "combined_margin",
    "first_within",
    "plan_noise",
    "planning_costs",
    "planning_margin",
    "uncertainty_ms",
]

T = TypeVar("T")
TIE = 1e-9  # relative difference that is float rounding, not cost
NOTCH = 1.57  # median +- NOTCH * IQR / sqrt(samples): about a 95% interval (McGill, Tukey, Larsen 1978)
MAX_PLAN_NOISE = 0.05  # the most the margin counts between whole plans' steps ([Note: plan noise])


def uncertainty_ms(op: OpCost) -> float:
    """How far ``op``'s forward + backward median may be off: ``NOTCH * IQR / sqrt(samples)``."""
    return NOTCH * (op.fwd_spread_ms + op.bwd_spread_ms) / math.sqrt(max(1, op.samples))


def planning_costs(costs: CostTable) -> CostTable:
    """``costs`` with the operators of each signature pooled: each gets the median of the group's
    medians and spreads, and the group's samples; see [Note: plans that reproduce]."""
    groups: dict[str, list[str]] = {}
    for name, op in costs.ops.items():
        if op.signature:
            groups.setdefault(op.signature, []).append(name)
    ops = dict(costs.ops)
    for names in groups.values():
        if len(names) < 2:
            continue
        members = [costs.ops[n] for n in names]
        pooled: dict[str, float] = {
            f: statistics.median(getattr(m, f) for m in members)
            for f in ("fwd_ms", "bwd_ms", "wgt_ms", "fwd_spread_ms", "bwd_spread_ms")
        }
        pooled["wgt_ms"] = min(pooled["wgt_ms"], pooled["bwd_ms"])
        samples = sum(m.samples for m in members)
        for n in names:
            ops[n] = dataclasses.replace(costs.ops[n], **pooled, samples=samples)  # type: ignore[arg-type]
    return dataclasses.replace(costs, ops=ops)


def planning_margin(costs: CostTable, num_stages: int) -> float:
    """Relative uncertainty of a stage of average time (0 without spreads); see [Note: plans that
    reproduce]. ``costs`` are planning costs (pooled)."""
    total = sum(op.fwd_ms + op.bwd_ms for op in costs.ops.values())
    if total <= 0:
        return 0.0
    per_group: dict[str, float] = {}
    for name, op in costs.ops.items():
        key = op.signature or "\0" + name
        per_group[key] = per_group.get(key, 0.0) + uncertainty_ms(op)  # a group moves together
    variance = sum(u * u for u in per_group.values())
    return math.sqrt(num_stages * variance) / total


def combined_margin(margin: float) -> float:
    """The relative uncertainty of the difference of two times each uncertain by ``margin`` (root sum
    of squares), at least float rounding."""
    return max(math.sqrt(2) * margin, TIE)


def plan_noise(margin: float) -> float:
    """The relative difference in simulated step within which two whole plans count as equal: their
    combined ``margin``, at most ``MAX_PLAN_NOISE``; see [Note: plan noise]."""
    return min(combined_margin(margin), max(MAX_PLAN_NOISE, TIE))


def ahead(candidate: float, incumbent: float, margin: float) -> bool:
    """``candidate`` (a whole plan's simulated step) beats ``incumbent`` by more than the plan noise
    (see :func:`plan_noise`)."""
    return candidate < incumbent * (1 - plan_noise(margin))


def first_within(times: Sequence[float], noise: float) -> int:
    """The index of the first of ``times`` (whole plans' simulated steps, in the order of preference)
    within ``noise`` (relative) of the fastest; see [Note: plan noise]."""
    if not times:
        raise ValueError("first_within needs at least one time")
    fastest = min(times)
    return next(i for i, t in enumerate(times) if t <= fastest * (1 + noise))


def by_cost(items: Sequence[T], costs: Sequence[float], margin: float) -> list[T]:
    """``items`` costliest first, where costs that follow each other within the combined ``margin``
    (see :func:`combined_margin`) count as equal: such a run of items comes in reverse position order
    (the earliest last), whatever noise ordered it."""
    ranked = sorted(range(len(items)), key=lambda i: (-costs[i], -i))
    runs: list[list[int]] = []
    for i in ranked:
        if runs and costs[i] >= costs[runs[-1][-1]] * (1 - combined_margin(margin)):
            runs[-1].append(i)
        else:
            runs.append([i])
    return [items[i] for run in runs for i in sorted(run, reverse=True)]

"""Zero-bubble DAG schedules as data: built, validated, round-tripped, simulated, drawn, planned
(see [Note: zero-bubble DAG schedule]). Their gradients: test_runtime.py."""

from __future__ import annotations

import dataclasses
import random

import pytest
from _gp_graphs import two_chains

from torch_graphpipe import (
    Action,
    CommModel,
    CostTable,
    OpCost,
    Schedule,
    ScheduleError,
    build_1f1b,
    plan_graph,
    plot_timeline,
    simulate,
    validate_schedule,
)
from torch_graphpipe.zero_bubble import build_zero_bubble

CHAIN = [(0, 1), (1, 2), (2, 3)]
DIAMOND = [(0, 1), (0, 2), (1, 3), (2, 3)]
TWO_BRANCHES = [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7), (3, 7)]


def _zb(stages, edges, m, late=(), f=1.0, b=2.0, w=1.0, **kw):
    return build_zero_bubble(
        stages, edges, m, late, fwd=[f] * stages, bwd=[b] * stages, wgt=[w] * stages, **kw
    )


@pytest.mark.parametrize(
    ("stages", "edges", "late"),
    [(1, [], ()), (4, CHAIN, ()), (4, DIAMOND, ()), (4, DIAMOND, ((3, 1),)), (8, TWO_BRANCHES, ((7, 3),))],
)
@pytest.mark.parametrize("microbatches", [1, 3, 8])
def test_zero_bubble_schedules_validate_and_round_trip(stages, edges, late, microbatches):
    schedule = _zb(stages, edges, microbatches, late)
    validate_schedule(schedule)
    assert Schedule.parse(str(schedule)) == schedule
    base = build_1f1b(stages, edges, microbatches, late)
    for s in range(stages):  # the 1F1B order of F/B and every message is kept; W's are added
        assert [a for a in schedule.programs[s] if a.kind != "W"] == list(base.programs[s])
        ws = [a.microbatch for a in schedule.programs[s] if a.kind == "W"]
        assert sorted(ws) == list(range(microbatches))


def test_w_round_trips_and_is_backward_compute():
    a = Action.parse("3W2")
    assert str(a) == "3W2" and a.is_compute and a.phase == "B"
    with pytest.raises(ValueError):
        Action.parse("3W2>1")


def test_validator_rejects_misplaced_or_missing_w():
    schedule = _zb(4, CHAIN, 4)
    prog = list(schedule.programs[2])
    w0 = next(i for i, a in enumerate(prog) if a.kind == "W" and a.microbatch == 0)
    missing = dataclasses.replace(
        schedule, programs=(*schedule.programs[:2], tuple(prog[:w0] + prog[w0 + 1 :]), *schedule.programs[3:])
    )
    with pytest.raises(ScheduleError, match="no W for micro-batch 0"):
        validate_schedule(missing)
    early = [prog[w0], *prog[:w0], *prog[w0 + 1 :]]  # W of micro-batch 0 before its forward and backward
    moved = dataclasses.replace(
        schedule, programs=(*schedule.programs[:2], tuple(early), *schedule.programs[3:])
    )
    with pytest.raises(ScheduleError, match="in this order"):
        validate_schedule(moved)


@pytest.mark.parametrize("microbatches", [4, 8, 12])
def test_weight_gradients_fill_the_chain_bubbles(microbatches):
    """Chain of 4, F = B = W = 1: 1F1B takes (M + 3) * 3; ZB-H1 takes 3M + 3 (its bubble is a third)."""
    fwd, bwd, wgt = [1.0] * 4, [2.0] * 4, [1.0] * 4
    one = simulate(build_1f1b(4, CHAIN, microbatches), fwd, bwd)
    zb = simulate(_zb(4, CHAIN, microbatches), fwd, bwd, wgt=wgt)
    assert one.iteration_time == pytest.approx((microbatches + 3) * 3)
    assert zb.iteration_time == pytest.approx(3 * microbatches + 3)
    assert max(zb.peak_in_flight) <= 4  # ZB-H1's memory: at most the first stage's 1F1B count


def test_zero_bubble_on_two_branches_beats_dag_1f1b():
    """DESIGN's worked example (two branches of four stages, loss stage split at the other branch)."""
    late = ((7, 3),)
    fwd, bwd, wgt = [1.0] * 8, [2.0] * 8, [1.0] * 8
    one = simulate(build_1f1b(8, TWO_BRANCHES, 8, late), fwd, bwd)
    zb = simulate(_zb(8, TWO_BRANCHES, 8, late), fwd, bwd, wgt=wgt)
    assert one.iteration_time == pytest.approx(33)
    assert zb.iteration_time < one.iteration_time - 3


def test_max_in_flight_bounds_the_held_microbatches():
    rng = random.Random()
    fwd = [rng.uniform(0.5, 1.5) for _ in range(4)]
    bwd = [2 * f for f in fwd]
    wgt = [b * rng.uniform(0.2, 0.8) for b in bwd]
    for cap in ([4, 3, 2, 1], [4, 4, 4, 4], [6, 6, 6, 6]):
        schedule = build_zero_bubble(4, CHAIN, 8, fwd=fwd, bwd=bwd, wgt=wgt, max_in_flight=cap)
        validate_schedule(schedule)
        result = simulate(schedule, fwd, bwd, wgt=wgt)
        assert all(p <= c for p, c in zip(result.peak_in_flight, cap)), (result.peak_in_flight, cap)
    with pytest.raises(ValueError, match="at least its 1F1B warm-up"):
        build_zero_bubble(4, CHAIN, 8, fwd=fwd, bwd=bwd, wgt=wgt, max_in_flight=[3, 3, 2, 1])
    with pytest.raises(ValueError, match="share of bwd"):
        build_zero_bubble(4, CHAIN, 8, fwd=fwd, bwd=bwd, wgt=[b + 1 for b in bwd])


def test_timeline_draws_w_boxes(tmp_path):
    result = simulate(_zb(4, DIAMOND, 4), [1.0] * 4, [2.0] * 4, wgt=[1.0] * 4)
    assert any(e.kind == "W" for row in result.timeline for e in row)
    path = plot_timeline(result, tmp_path / "zb.png")
    assert path.stat().st_size > 1000


def _random_costs(graph) -> CostTable:
    """Fresh random costs: forward 0.5-1.5, backward twice that, 30-100% of it in weight gradients."""
    rng = random.Random()
    ops = {}
    for n in graph.nodes:
        f = rng.uniform(0.5, 1.5)
        ops[n.name] = OpCost(fwd_ms=f, bwd_ms=2 * f, wgt_ms=f * rng.uniform(0.3, 1.0), out_bytes=64)
    return CostTable(ops=ops, comm=CommModel.free())


def test_planner_builds_and_simulates_zero_bubble():
    graph = two_chains()
    costs = _random_costs(graph)
    one = plan_graph(graph, costs, 8, 8)
    zb = plan_graph(graph, costs, 8, 8, schedule_kind="zero_bubble")
    assert one.schedule_kind == "1f1b" and zb.schedule_kind == "zero_bubble"
    validate_schedule(zb.schedule)
    assert "zero_bubble schedule" in str(zb)
    assert zb.simulate().iteration_time < one.simulate().iteration_time
    assert zb.simulate().busy_time(0) == pytest.approx(one.simulate().busy_time(0))  # W moves, never adds
    with pytest.raises(ValueError, match="schedule_kind"):
        plan_graph(graph, costs, 8, 8, schedule_kind="zb")  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule_kind", ["1f1b", "zero_bubble"])
def test_action_costs_are_what_the_simulator_charges(schedule_kind):
    """``Plan.action_costs`` (what an emulated device runs each action for) is the simulator's charge
    for every box of the timeline, split join stages (FL/BL) and W actions included, and a stage's
    actions add up to its forward and backward cost per micro-batch."""
    graph = two_chains()
    plan = plan_graph(graph, _random_costs(graph), 8, 8, schedule_kind=schedule_kind)
    costs = plan.action_costs()
    kinds = set()
    for row in plan.simulate().timeline:
        for box in row:
            assert box.end - box.start == pytest.approx(costs[(box.stage, box.kind)]), box
            kinds.add(box.kind)
    assert {"FL", "BL"} <= kinds and ("W" in kinds) == (schedule_kind == "zero_bubble")
    for s, stage in enumerate(plan.stages):
        assert sum(costs[(s, k)] for k in ("F", "FL")) == pytest.approx(stage.cost.fwd_ms)
        assert sum(costs[(s, k)] for k in ("B", "BL", "W")) == pytest.approx(stage.cost.bwd_ms)

"""Plans that reproduce: costs moving within their spread give the same plan ([Note: plans that reproduce])."""

import dataclasses
import random

import pytest
import torch
import torch.nn as nn
from _gp_costs import flop_costs, noisy, zoo_case
from _gp_graphs import two_chains

from torch_graphpipe import CommModel, CostTable, OpCost, capture, plan_graph, profile_graph
from torch_graphpipe.plan_types import ScheduleKind, StageGraphKind
from torch_graphpipe.stable import ahead, by_cost, planning_costs, planning_margin

pytest.importorskip("torch_zoo")


def _plans(
    name: str,
    level: float,
    per_signature: bool = False,
    stage_graph: StageGraphKind = "dag",
    schedule_kind: ScheduleKind = "1f1b",
    num_stages: int = 8,
) -> set[tuple[tuple[tuple[str, ...], ...], str]]:
    """The distinct (partition, schedule string) over five noisy cost tables of zoo model ``name``."""
    captured, inputs = zoo_case(name)
    base = flop_costs(captured, inputs)
    out = set()
    for seed in range(5):
        costs = noisy(base, level, seed, per_signature=per_signature)
        p = plan_graph(captured.graph, costs, num_stages, 8, stage_graph, schedule_kind=schedule_kind)
        out.add((tuple(s.node_names for s in p.stages), str(p.schedule)))
    return out


@pytest.mark.parametrize("level", [0.05, 0.10])
@pytest.mark.parametrize("name", ["candle_uno", "dlrm", pytest.param("mmt", marks=pytest.mark.slow)])
@pytest.mark.parametrize("per_signature", [False, True], ids=["per_op", "per_signature"])
def test_noisy_profiles_give_one_plan(name, level, per_signature):
    # Every operator's times (or every signature group's) scaled by its own factor in 1 +- level, five
    # draws (the planner before [Note: plans that reproduce] gave five different plans per operator).
    plans = _plans(name, level, per_signature)
    assert len(plans) == 1, f"{name} at +-{level:.0%}: {len(plans)} different plans over 5 draws"


@pytest.mark.parametrize(
    ("name", "num_stages"),
    [("dlrm", 4), ("dlrm", 8), ("dlrm", 16), ("candle_uno", 4), ("candle_uno", 8)]
    + [pytest.param("mmt", s, marks=pytest.mark.slow) for s in (4, 8, 16)],
)
def test_noisy_profiles_give_one_chain_split(name, num_stages):
    # The chain split (GraphPipe's chain plan and the split torch's chain schedules run, with 1 or 2
    # stages per rank): the smallest exact bottleneck moved a cut by one operator between draws.
    plans = _plans(name, 0.05, stage_graph="chain", num_stages=num_stages)
    assert len(plans) == 1, f"{name}, {num_stages} stages: {len(plans)} different chain splits over 5 draws"


@pytest.mark.parametrize("stage_graph", ["dag", "chain"])
@pytest.mark.parametrize("name", ["candle_uno", "dlrm"])
def test_noisy_profiles_give_one_zero_bubble_schedule(name, stage_graph):
    # The W placement of a zero-bubble schedule compares message arrival with the stage's clock: taken
    # as exact, the noise decided which W filled which bubble.
    plans = _plans(name, 0.05, stage_graph=stage_graph, schedule_kind="zero_bubble")
    assert len(plans) == 1, f"{name} zero-bubble ({stage_graph}): {len(plans)} different plans over 5 draws"


def test_profile_keeps_spread_samples_and_signature():
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    captured = capture(model)
    costs = profile_graph(captured.graph_module, captured.graph, (torch.randn(4, 16),), repeats=5)
    ops = [costs.ops[n.name] for n in captured.graph.nodes]
    assert all(op.samples == 5 and op.fwd_spread_ms >= 0 and op.bwd_spread_ms >= 0 for op in ops)
    lin0, tanh0, lin1, tanh1, lin2 = ops
    assert lin0.signature == lin1.signature != lin2.signature  # same module config and shapes
    assert tanh0.signature == tanh1.signature
    assert (lin0.fwd_ms, lin0.fwd_spread_ms) == (lin1.fwd_ms, lin1.fwd_spread_ms)  # pooled samples
    assert planning_margin(costs, 2) > 0


def test_planning_costs_pool_one_signature():
    rng = random.Random(0)
    ops = {
        f"op{i}": OpCost(
            fwd_ms=rng.uniform(1, 2), bwd_ms=rng.uniform(2, 4), fwd_spread_ms=0.1, signature="lin"
        )
        for i in range(5)
    } | {"other": OpCost(fwd_ms=7.0, bwd_ms=9.0)}
    pooled = planning_costs(CostTable(ops=ops)).ops
    fwd = sorted(ops[f"op{i}"].fwd_ms for i in range(5))[2]
    assert all(pooled[f"op{i}"].fwd_ms == fwd and pooled[f"op{i}"].samples == 5 for i in range(5))
    assert pooled["other"] == ops["other"]


def test_margin_is_zero_without_spread_and_grows_with_it():
    graph = two_chains()
    exact = CostTable(ops={n.name: OpCost(fwd_ms=1, bwd_ms=2) for n in graph.nodes})
    assert planning_margin(exact, 4) == 0
    spread = dataclasses.replace(
        exact,
        ops={k: dataclasses.replace(v, fwd_spread_ms=0.1, bwd_spread_ms=0.2) for k, v in exact.ops.items()},
    )
    more = dataclasses.replace(
        spread,
        ops={k: dataclasses.replace(v, fwd_spread_ms=0.2, bwd_spread_ms=0.4) for k, v in spread.ops.items()},
    )
    assert 0 < planning_margin(spread, 4) < planning_margin(more, 4)
    many = dataclasses.replace(
        spread, ops={k: dataclasses.replace(v, samples=16) for k, v in spread.ops.items()}
    )
    assert planning_margin(many, 4) == pytest.approx(planning_margin(spread, 4) / 4)


def test_ahead_and_by_cost():
    assert ahead(0.9, 1.0, 0.05) and not ahead(0.95, 1.0, 0.05) and not ahead(1.0, 1.0, 0.0)
    assert ahead(1.0 - 1e-6, 1.0, 0.0)
    # within the margin: position order, the earliest last; clearly cheaper ones after
    assert by_cost("abcd", [10.0, 10.2, 5.0, 9.9], 0.05) == ["d", "b", "a", "c"]
    assert by_cost("abcd", [10.0, 10.2, 5.0, 9.9], 0.0) == ["b", "a", "d", "c"]


def test_equal_branches_keep_position_order_under_noise():
    # Two identical branches: whichever the noise made costlier, the same branch keeps its tail with
    # the join ([Note: branch tail with the join]).
    graph = two_chains()
    rng = random.Random(7)
    plans = set()
    for _ in range(6):
        ops = {
            n.name: OpCost(fwd_ms=f, bwd_ms=2 * f, fwd_spread_ms=0.05 * f, bwd_spread_ms=0.1 * f)
            for n in graph.nodes
            for f in [1 + rng.uniform(-0.03, 0.03)]
        }
        p = plan_graph(graph, CostTable(ops=ops, comm=CommModel.free()), 5, 8, "dag")
        plans.add(tuple(s.node_names for s in p.stages))
    assert len(plans) == 1

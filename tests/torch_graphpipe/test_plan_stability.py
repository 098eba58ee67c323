"""Noisy profiles never get a plan the simulation rates clearly slower ([Note: plan noise])."""

import dataclasses
import random

import pytest
from _gp_costs import flop_costs, zoo_case

from torch_graphpipe import CostTable, plan_graph, plan_stages
from torch_graphpipe.assemble import assemble
from torch_graphpipe.plan_types import StageGraphKind
from torch_graphpipe.stable import MAX_PLAN_NOISE, first_within, plan_noise
from torch_graphpipe.stage_cost import StageCostModel

pytest.importorskip("torch_zoo")

SEEDS = 8


def _wide(costs: CostTable, level: float, spread: float, seed: int) -> CostTable:
    """``costs`` with every operator's times scaled by its own factor in ``1 +- level`` and reporting an
    interquartile range of about ``spread`` of its time over 11 samples (a loaded machine's profile:
    planning margins of 8-11% on the zoo models at 6-8 stages)."""
    rng = random.Random(seed)
    ops = {}
    for name in sorted(costs.ops):
        c = costs.ops[name]
        f, w = 1 + rng.uniform(-level, level), spread * rng.uniform(0.5, 1.5)
        ops[name] = dataclasses.replace(
            c,
            fwd_ms=c.fwd_ms * f,
            bwd_ms=c.bwd_ms * f,
            wgt_ms=c.wgt_ms * f,
            fwd_spread_ms=c.fwd_ms * w,
            bwd_spread_ms=c.bwd_ms * w,
            samples=11,
        )
    return dataclasses.replace(costs, ops=ops)


@pytest.mark.parametrize(
    ("name", "num_stages", "stage_graph"),
    [("dlrm", 8, "dag"), ("candle_uno", 8, "dag"), ("candle_uno", 6, "dag"), ("resnet18", 6, "chain")],
)
def test_noisy_profiles_never_keep_a_clearly_slower_plan(name, num_stages, stage_graph: StageGraphKind):
    # Each draw is planned on its noisy table and its partition simulated on the exact one. With the
    # margin deciding between whole plans, DLRM kept the DAG search's wide plan (7 stages of in-flight
    # 2) over the chain split 1.17x faster in some draws, CANDLE-Uno at 6 stages a plan 1.3x slower,
    # and ResNet-18's chain split within a 25-58% margin was up to 1.35x slower.
    captured, inputs = zoo_case(name)
    graph, exact = captured.graph, flop_costs(captured, inputs)
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    steps = []
    for seed in range(SEEDS):
        p = plan_graph(graph, _wide(exact, 0.05, 0.6, seed), num_stages, 8, stage_graph)
        assert p.margin > 0.05  # the margin is wider than the plan noise
        masks = [sum(1 << index[n] for n in s.node_names) for s in p.stages]
        if stage_graph == "chain":
            model = StageCostModel(graph, exact)
            steps.append(
                assemble(graph, exact, model, masks, 8, "chain", 0.0, "1f1b").simulate().iteration_time
            )
        else:
            steps.append(plan_stages(graph, exact, masks, 8).simulate().iteration_time)
    best = min(steps)
    assert max(steps) <= best * 1.05, (
        f"{name}: simulated steps {[round(s / best, 3) for s in steps]} x the best"
    )


def test_plan_noise_is_the_combined_margin_capped():
    assert plan_noise(0.0) > 0 and plan_noise(0.01) == pytest.approx(0.01 * 2**0.5)
    assert plan_noise(0.2) == MAX_PLAN_NOISE
    # the first within the noise of the fastest, never one clearly slower than it
    assert first_within([1.03, 1.0, 0.99], 0.05) == 0
    assert first_within([1.2, 1.0, 0.99], plan_noise(0.2)) == 1
    with pytest.raises(ValueError, match="at least one"):
        first_within([], 0.05)

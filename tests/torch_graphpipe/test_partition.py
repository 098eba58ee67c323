import dataclasses
import random
import time

import pytest
from _gp_graphs import (
    brute_force,
    in_family,
    integer_costs,
    random_dag,
    random_fork_join,
    random_sp_graph,
    two_chains,
)

from torch_graphpipe import CostTable, OpCost, OpGraph, build_1f1b, plan_graph, simulate, validate_schedule
from torch_graphpipe.candidates import CandidateTree
from torch_graphpipe.chain import partition_chain
from torch_graphpipe.partition import partition_dag
from torch_graphpipe.sp import decompose
from torch_graphpipe.stage_cost import StageCostModel
from torch_graphpipe.stage_graph import build_stage_graph


def _dag_value(graph, costs, stages, budget=None):
    model = StageCostModel(graph, costs)
    root = decompose(graph)
    result = partition_dag(root, model, stages, memory_budget_bytes=budget)
    sg = build_stage_graph(graph, model, result.stages, output_edges=False)  # the search's model
    return result, sg, (max(c.time_ms for c in sg.costs), max(sg.in_flight))


@pytest.mark.parametrize("seed", range(40))
def test_dag_search_is_exact_over_its_family(seed):
    rng = random.Random(seed)
    graph = random_sp_graph(rng.randint(3, 7), rng)
    costs = integer_costs(graph, rng)
    stages = rng.randint(1, len(graph))
    root = decompose(graph)
    assert not root.forced
    tree = CandidateTree(root, StageCostModel(graph, costs))
    result, sg, value = _dag_value(graph, costs, stages)
    assert in_family(list(result.stages), root, tree)
    assert value == brute_force(graph, costs, stages, keep=lambda m: in_family(m, root, tree))
    assert result.depth == max(sg.in_flight)
    best_any = brute_force(graph, costs, stages)
    assert best_any is not None and value >= best_any


@pytest.mark.parametrize("seed", range(15))
def test_dag_search_with_memory_budget(seed):
    rng = random.Random(100 + seed)
    graph = random_sp_graph(rng.randint(3, 7), rng)
    costs = integer_costs(graph, rng)
    stages = rng.randint(1, len(graph))
    root = decompose(graph)
    tree = CandidateTree(root, StageCostModel(graph, costs))
    family = lambda m: in_family(m, root, tree)
    unbounded = brute_force(graph, costs, stages, keep=family)
    for budget in (4000, 6000, 9000, 14000):
        expected = brute_force(graph, costs, stages, budget=budget, keep=family)
        if expected is None:
            with pytest.raises(ValueError, match="memory_budget_bytes"):
                _dag_value(graph, costs, stages, budget)
            continue
        _, sg, value = _dag_value(graph, costs, stages, budget)
        assert value == expected and value >= unbounded
        for cost, in_flight in zip(sg.costs, sg.in_flight):
            assert cost.memory_bytes(in_flight, costs.param_copies) <= budget


@pytest.mark.parametrize("seed", range(15))
def test_chain_search_is_exact_on_a_chain(seed):
    rng = random.Random(200 + seed)
    n = rng.randint(2, 8)
    graph = OpGraph.from_edges([f"c{i}" for i in range(n)], [(f"c{i}", f"c{i + 1}") for i in range(n - 1)])
    costs = integer_costs(graph, rng)
    stages = rng.randint(1, n)
    model = StageCostModel(graph, costs)
    chain = partition_chain(graph, model, stages)
    _, _, dag_value = _dag_value(graph, costs, stages)
    assert (chain.bottleneck_ms, stages) == brute_force(graph, costs, stages) == dag_value


@pytest.mark.parametrize("seed", range(20))
def test_stages_convex_and_acyclic_on_any_dag(seed):
    rng = random.Random(300 + seed)
    graph = random_dag(rng.randint(2, 14), rng)
    costs = integer_costs(graph, rng)
    stages = rng.randint(1, len(graph))
    for kind in ("dag", "chain"):
        plan = plan_graph(graph, costs, stages, 4, kind)  # asserts convexity and acyclicity inside
        names = [name for s in plan.stages for name in s.node_names]
        assert sorted(names) == sorted(n.name for n in graph.nodes)
        assert all(graph.is_convex(sum(1 << graph.index[n] for n in s.node_names)) for s in plan.stages)
        validate_schedule(plan.schedule)


def test_non_series_parallel_graph_is_ordered():
    graph = OpGraph.from_edges(["a", "b", "c", "d"], [("a", "c"), ("b", "c"), ("b", "d")])
    assert decompose(graph).forced
    plan = plan_graph(graph, integer_costs(graph, random.Random(0)), 3, 4)
    assert plan.num_stages == 3


def test_dag_beats_chain_on_parallel_branches():
    costs = CostTable(ops={n.name: OpCost(fwd_ms=1, bwd_ms=2) for n in two_chains().nodes})
    dag = plan_graph(two_chains(), costs, 8, 8, "dag")
    chain = plan_graph(two_chains(), costs, 8, 8, "chain")
    assert dag.bottleneck_ms == chain.bottleneck_ms == 3
    assert max(s.in_flight for s in dag.stages) == 5  # 4, plus the output edge to the loss stage
    assert [s.in_flight for s in chain.stages] == list(range(8, 0, -1))


def _branchy_graph(num_nodes: int, rng: random.Random) -> OpGraph:
    """stem -> blocks of parallel branches (chains with skip edges) -> join -> ..."""
    names, edges, prev, i = [], [], None, 0
    while i < num_nodes:
        join_inputs = []
        for _ in range(rng.randint(2, 5)):
            tail = prev
            for _ in range(rng.randint(2, 8)):
                names.append(f"x{i}")
                if tail is not None:
                    edges.append((tail, f"x{i}"))
                if prev is not None and rng.random() < 0.1:
                    edges.append((prev, f"x{i}"))
                tail, i = f"x{i}", i + 1
            join_inputs.append(tail)
        names.append(f"x{i}")
        edges.extend((t, f"x{i}") for t in join_inputs)
        prev, i = f"x{i}", i + 1
    return OpGraph.from_edges(names, edges)


@pytest.mark.parametrize("stages", [4, 8, 16])
def test_planning_200_nodes_stays_fast(stages):
    rng = random.Random(7)
    graph = _branchy_graph(200, rng)
    costs = integer_costs(graph, rng)
    for kind in ("dag", "chain"):
        start = time.perf_counter()
        plan = plan_graph(graph, costs, stages, 2 * stages, kind)
        # A guard against a blow-up in the search, not a timing: alone this takes 0.03-0.44 s on the
        # 2-core machines, but one CI run (2026-12-06, AMD EPYC) took 1.02 s for dag/4 against the old
        # 1.0 s bound. Planning times are reported by benchmarks/bench_graphpipe.py.
        assert time.perf_counter() - start < 5.0, (kind, stages, plan.planning_time_s)
        assert plan.num_stages == stages


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_stages": 5}, "num_stages=5 is more than"),
        ({"num_stages": 0}, "num_stages"),
        ({"num_microbatches": 0}, "num_microbatches"),
        ({"stage_graph": "tree"}, "stage_graph"),
    ],
)
def test_bad_arguments(kwargs, match):
    graph = OpGraph.from_edges(["a", "b", "c", "d"], [("a", "b"), ("b", "c"), ("c", "d")])
    args = {"num_stages": 2, "num_microbatches": 2, "stage_graph": "dag", **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_graph(graph, integer_costs(graph, random.Random(0)), **args)


def _free_join(graph, rng):
    """Integer costs with a free join (``a + b`` costs nothing), where a branch tail may join it."""
    costs = integer_costs(graph, rng)
    return dataclasses.replace(costs, ops={**costs.ops, "join": OpCost(out_bytes=1000)})


@pytest.mark.parametrize("seed", range(12))
def test_dag_search_is_exact_over_its_family_with_branch_tails(seed):
    """[Note: branch tail with the join]: on fork-join graphs, every stage count, with and without a
    memory budget (the per-``t`` head tables and the forward head table must agree)."""
    rng = random.Random(1000 + seed)
    graph = random_fork_join(rng)
    costs = _free_join(graph, rng)
    root = decompose(graph)
    tree = CandidateTree(root, StageCostModel(graph, costs))
    family = lambda m: in_family(m, root, tree)
    for stages in range(2, len(graph)):
        for budget in (None, 9000, 1e9):
            expected = brute_force(graph, costs, stages, budget=budget, keep=family)
            if expected is None:
                with pytest.raises(ValueError, match="memory_budget_bytes"):
                    _dag_value(graph, costs, stages, budget)
                continue
            result, sg, value = _dag_value(graph, costs, stages, budget)
            assert in_family(list(result.stages), root, tree)
            assert value == expected, (stages, budget)
            assert result.depth == max(sg.in_flight)


def test_branch_tail_goes_with_the_join():
    """Two branches of 4 unit ops and a free join on 8 stages: the balanced plan keeps a branch's last op
    with the join (path of 5 stages), which the old family could not form (its best had a bottleneck of
    2 ops or a chain of 8)."""
    names = [f"{b}{i}" for b in "ab" for i in range(4)] + ["join"]
    edges = [(f"{b}{i}", f"{b}{i + 1}") for b in "ab" for i in range(3)] + [("a3", "join"), ("b3", "join")]
    graph = OpGraph.from_edges(names, edges)
    costs = CostTable(ops={n: OpCost(fwd_ms=1, bwd_ms=2) for n in names} | {"join": OpCost()})
    result, _, (bottleneck, depth) = _dag_value(graph, costs, 8)
    assert (bottleneck, depth) == (3, 5)
    joint = next(m for m in result.stages if m >> graph.index["join"] & 1)
    assert bin(joint).count("1") == 2  # the join and one branch's last op
    dag = plan_graph(graph, costs, 8, 8, "dag")
    chain = plan_graph(graph, costs, 8, 8, "chain")
    assert sorted(s.in_flight for s in dag.stages) == [1, 2, 2, 3, 3, 4, 4, 5]
    # the join stage is split at the other branch (see [Note: late inputs]): its branch op runs before
    # the other branch's value arrives and the other branch gets its gradient before that op's
    # backward, so each branch pipelines like a 4-stage chain, (8 + 3) x 3 = 33 (DESIGN's worked
    # example); unsplit it would be 4 forwards of fill + 8 x (1 + 2) + 4 backwards of drain = 36
    joint_stage = next(s for s in dag.stages if "join" in s.node_names)
    assert joint_stage.late_node_names == ("join",) and joint_stage.late_pred is not None
    assert dag.simulate().iteration_time == 33 and chain.simulate().iteration_time == 45
    unsplit = build_1f1b(8, dag.edges, 8)
    fwd, bwd = [s.cost.fwd_ms for s in dag.stages], [s.cost.bwd_ms for s in dag.stages]
    assert simulate(unsplit, fwd, bwd).iteration_time == 36

"""A DAG plan is never predicted slower than the chain plan ([Note: DAG plan candidates])."""

import random

import pytest
from _gp_graphs import integer_costs, random_sp_graph

from torch_graphpipe import CommModel, CostTable, OpCost, OpGraph, plan_graph, validate_schedule


def _two_branches_joined(length: int = 4) -> OpGraph:
    """Two chains of ``length`` operators joined by one cheap operator (``a(x) + b(x)``)."""
    names = [f"{b}{i}" for b in "ab" for i in range(length)] + ["join"]
    edges = [(f"{b}{i}", f"{b}{i + 1}") for b in "ab" for i in range(length - 1)]
    edges += [("a3", "join"), ("b3", "join")]
    return OpGraph.from_edges(names, edges)


def test_join_of_two_branches():
    graph = _two_branches_joined()
    ops = {n.name: OpCost(fwd_ms=1, bwd_ms=2) for n in graph.nodes} | {"join": OpCost()}
    costs = CostTable(ops=ops, comm=CommModel.free())
    dag = plan_graph(graph, costs, 8, 8, "dag")
    chain = plan_graph(graph, costs, 8, 8, "chain")
    assert dag.simulate().iteration_time < chain.simulate().iteration_time
    assert dag.bottleneck_ms == chain.bottleneck_ms == 3


@pytest.mark.parametrize("seed", range(10))
def test_dag_plan_never_simulates_slower_than_chain_split_as_dag(seed):
    rng = random.Random(900 + seed)
    graph = random_sp_graph(rng.randint(6, 16), rng)
    costs = integer_costs(graph, rng)
    stages = rng.randint(2, min(6, len(graph)))
    dag = plan_graph(graph, costs, stages, 2 * stages, "dag")
    chain = plan_graph(graph, costs, stages, 2 * stages, "chain")
    validate_schedule(dag.schedule)
    assert dag.simulate().iteration_time <= chain.simulate().iteration_time * 1.0001

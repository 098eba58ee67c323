"""The schedule that runs is the one planned: built once, simulated, validated and executed as is
(see [Note: output edges] in torch_graphpipe/stage_graph.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from _gp_dist import init_gloo, shared_seed, spawn
from _gp_graphs import two_chains
from _gp_models import CASES

from torch_graphpipe import CommModel, CostTable, GraphPipe, OpCost, capture, plan_graph, plan_stages
from torch_graphpipe.groups import stages_from_module_groups
from torch_graphpipe.routing import route, with_routing
from torch_graphpipe.schedule import build_1f1b
from torch_graphpipe.validate import validate_schedule


def _costs(graph, seed: int) -> CostTable:
    gen = torch.Generator().manual_seed(seed)
    ops = {}
    for n in graph.nodes:
        fwd = float(torch.rand(1, generator=gen)) + 0.1
        ops[n.name] = OpCost(fwd_ms=fwd, bwd_ms=2 * fwd, out_bytes=256)
    return CostTable(ops=ops, comm=CommModel.free())


def _explicit_plan(case_name: str, num_microbatches: int, seed: int):
    case = CASES[case_name]
    captured = capture(case.build())
    masks = stages_from_module_groups(captured.graph, case.partition)
    return captured, plan_stages(captured.graph, _costs(captured.graph, seed), masks, num_microbatches)


def test_plan_has_the_output_edges():
    """Stage 1 of multi_output produces an output but the loss is computed on stage 2: the planned stage
    graph has the edge 1 -> 2, routing finds the same edges, and the schedule stays the planned one."""
    captured, planned = _explicit_plan("multi_output", 4, 0)
    assert planned.edges == ((0, 1), (0, 2), (1, 2))
    assert planned.stages[1].in_flight == 2  # stage 1 is no longer a sink: it waits for stage 2
    routing = route(planned, captured.graph)
    assert routing.edges == planned.edges and routing.loss_stage == 2
    executed = with_routing(planned, routing, {})
    assert executed.schedule == planned.schedule
    validate_schedule(executed.schedule)


def test_planner_dag_has_the_output_edges():
    captured = capture(CASES["multi_output"].build())
    planned = plan_graph(captured.graph, _costs(captured.graph, 1), 3, 6)
    assert route(planned, captured.graph).edges == planned.edges == planned.schedule.edges


def test_a_plan_without_its_output_edges_is_refused():
    """A plan whose schedule lacks the edge an output travels on is an error, never rebuilt quietly."""
    captured, planned = _explicit_plan("multi_output", 2, 0)
    edges = ((0, 1), (0, 2))
    stale = dataclasses.replace(
        planned, edges=edges, edge_bytes=(0, 0), schedule=build_1f1b(3, edges, planned.num_microbatches)
    )
    with pytest.raises(ValueError, match=r"needed but not planned: \[\(1, 2\)\]"):
        with_routing(stale, route(stale, captured.graph), {})


def _run_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    try:
        seed = shared_seed()
        for k, (name, m) in enumerate([("multi_output", 4), ("skip", 5)]):
            _check_executed_is_simulated(CASES[name], name, m, seed + k)
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def _check_executed_is_simulated(case, name: str, num_microbatches: int, seed: int) -> None:
    rank = dist.get_rank()
    _, planned = _explicit_plan(name, num_microbatches, seed)
    simulated = planned.simulate()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    inputs, target = case.batch(2 * num_microbatches, gen)
    for partition in (planned, case.partition):  # the plan itself; the same stages from module names
        gp = GraphPipe(
            case.build(), example_inputs=inputs, loss_fn=case.loss, num_microbatches=num_microbatches,
            partition=partition, costs=_costs(capture(case.build()).graph, seed),
        )  # fmt: skip
        assert gp.plan.schedule == planned.schedule, f"{name}: the executed plan's schedule was rebuilt"
        gp.runtime.executed = []
        gp.step(*inputs, target=target)
        executed = gp.runtime.executed
        assert tuple(executed) == planned.schedule.programs[rank], f"{name}: rank {rank} ran another program"
        computed = [(a.kind, a.microbatch) for a in executed if a.is_compute]
        assert computed == [(e.kind, e.microbatch) for e in simulated.timeline[rank]], name
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [str(a) for a in executed])
        assert [" ".join(p) for p in everyone] == [
            " ".join(str(a) for a in prog) for prog in planned.schedule.programs
        ]


@pytest.mark.distributed
def test_every_rank_executes_the_simulated_schedule():
    """Each rank's executed actions are the planned (and simulated) schedule's program, on a plan whose
    output travels on an extra edge (multi_output) and on one with a split join stage (skip)."""
    spawn(_run_worker, 3)


def test_memory_budget_counts_the_output_edges():
    """Two independent branches: the loss stage needs both outputs, so branch a's stages hold one
    micro-batch more than the DAG search counts (it sees the data edges only). The budget is checked
    on the planned stage graph: 6000 bytes fit the search's model but not the schedule that runs."""
    graph = two_chains(4)
    costs = CostTable(
        ops={n.name: OpCost(fwd_ms=1, bwd_ms=2, out_bytes=1000) for n in graph.nodes}, param_copies=1.0
    )
    with pytest.raises(
        ValueError, match=r"smallest stage that does not fit, stage 2 \(a1\), needs 8000 bytes with 4 micro"
    ):
        plan_graph(graph, costs, 8, 8, memory_budget_bytes=6000)
    planned = plan_graph(graph, costs, 8, 8, memory_budget_bytes=8000)
    assert list(planned.simulate().peak_in_flight) == [s.in_flight for s in planned.stages]
    assert all(s.cost.memory_bytes(s.in_flight, 1.0) <= 8000 for s in planned.stages)

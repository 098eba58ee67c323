import itertools

import pytest
from _gp_graphs import two_chains

from torch_graphpipe import CommModel, CostTable, OpCost, build_1f1b, plan_graph, plot_timeline, simulate


def _worked_example(stage_graph):
    graph = two_chains(4)
    costs = CostTable(ops={n.name: OpCost(fwd_ms=1, bwd_ms=2) for n in graph.nodes}, comm=CommModel.free())
    return plan_graph(graph, costs, num_stages=8, num_microbatches=8, stage_graph=stage_graph)


def test_worked_example_graph_vs_chain():
    """DESIGN: F=1, B=2, 8 micro-batches, 2 branches x 4 stages: 33 as a graph, 45 as a chain.

    The loss needs both branches' outputs on one stage (the last of branch b): the last stage of branch
    a sends its output there (see [Note: output edges]), so branch a's stages hold one micro-batch more
    than branch b's; the loss stage is split at that edge ([Note: late inputs]), so the time stays 33."""
    dag_plan = _worked_example("dag")
    dag, chain = dag_plan.simulate(), _worked_example("chain").simulate()
    assert dag.iteration_time == 33
    assert chain.iteration_time == 45
    assert chain.iteration_time / dag.iteration_time == pytest.approx(1.36, abs=0.005)
    assert dag.peak_in_flight[0] == 5 and chain.peak_in_flight[0] == 8
    assert sorted(dag.peak_in_flight) == [1, 2, 2, 3, 3, 4, 4, 5]
    assert dag_plan.schedule.late == ((7, 6),) and (6, 7) in dag_plan.edges
    assert dag.bubble_fraction == pytest.approx(1 - 24 / 33)
    assert chain.bubble_fraction == pytest.approx(1 - 24 / 45)


@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (2, 5), (4, 4), (4, 9), (6, 3)])
def test_chain_1f1b_formula(stages, microbatches):
    schedule = build_1f1b(stages, [(i, i + 1) for i in range(stages - 1)], microbatches)
    result = simulate(schedule, [1.0] * stages, [2.0] * stages)
    assert result.iteration_time == (microbatches + stages - 1) * 3
    assert list(result.peak_in_flight) == [min(stages - i, microbatches) for i in range(stages)]
    assert 0.0 <= result.bubble_fraction < 1.0


def test_communication_delays_the_step():
    schedule = build_1f1b(2, [(0, 1)], 2)
    free = simulate(schedule, [1.0, 1.0], [2.0, 2.0])
    slow = simulate(schedule, [1.0, 1.0], [2.0, 2.0], {(0, 1): 0.5})
    assert free.iteration_time == 9
    assert slow.iteration_time == pytest.approx(10.0)  # one forward and one backward hop on the critical path


def test_timeline_boxes_do_not_overlap():
    result = _worked_example("dag").simulate()
    for s, row in enumerate(result.timeline):
        assert len(row) == (32 if s == 7 else 16)  # the split loss stage runs F, FL, BL, B
        for a, b in itertools.pairwise(row):
            assert a.end <= b.start


def test_timeline_png(tmp_path):
    path = plot_timeline(_worked_example("dag").simulate(), tmp_path / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_count_mismatch():
    with pytest.raises(ValueError, match="need 2"):
        simulate(build_1f1b(2, [(0, 1)], 1), [1.0], [1.0])


def test_late_part_costs_are_taken_from_the_stage():
    """Branch A is stage 0 then stage 3, branch B stages 1 and 2, and stage 3 also joins them for free.
    Split at stage 2, stage 3 starts A's unit before B's value arrives and B gets its gradient before
    that unit's backward: 2 x 2 blocks pipeline like 2-stage chains, (4 + 1) x 3 = 15, vs 18 unsplit
    (and 21 as a 4-stage chain). The costs add up the same."""
    edges, fwd, bwd = [(0, 3), (1, 2), (2, 3)], [1.0] * 4, [2.0] * 4
    whole = simulate(build_1f1b(4, edges, 4), fwd, bwd)
    split = simulate(build_1f1b(4, edges, 4, late=[(3, 2)]), fwd, bwd, late_cost={3: (0.0, 0.0)})
    assert (whole.iteration_time, split.iteration_time) == (18.0, 15.0)
    assert split.busy_time(3) == whole.busy_time(3) == 12.0
    kinds = {e.kind for e in split.timeline[3]}
    assert kinds == {"F", "FL", "B", "BL"}
    with pytest.raises(ValueError, match="late_cost"):
        simulate(build_1f1b(4, edges, 4, late=[(3, 2)]), fwd, bwd, late_cost={3: (2.0, 0.0)})


def test_message_cost_occupies_both_stages():
    """Two stages, one micro-batch: F0, send | recv, F1, B1, send | recv, B0 = 6 units + 4 messages."""
    schedule = build_1f1b(2, [(0, 1)], 1)
    assert simulate(schedule, [1.0, 1.0], [2.0, 2.0]).iteration_time == 6.0
    assert simulate(schedule, [1.0, 1.0], [2.0, 2.0], message_cost=0.25).iteration_time == 7.0
    assert simulate(schedule, [1.0, 1.0], [2.0, 2.0], {(0, 1): 0.5}, message_cost=0.25).iteration_time == 8.0
    with pytest.raises(ValueError, match="message_cost"):
        simulate(schedule, [1.0, 1.0], [2.0, 2.0], message_cost=-1.0)

"""The simulator's calibration: a trace made with known overrun, message cost and latency is fitted back."""

import itertools
import random

import pytest

from torch_graphpipe import (
    CommModel,
    CostTable,
    OpCost,
    OpGraph,
    Plan,
    SimulationResult,
    plan_graph,
    plan_stages,
)
from torch_graphpipe.calibrate import Calibration, fit_calibration, simulate_calibrated, traced_result
from torch_graphpipe.graph import mask_of


def _chain_plan(rng: random.Random, stages: int, microbatches: int) -> Plan:
    names = [f"op{i}" for i in range(2 * stages)]
    graph = OpGraph.from_edges(names, itertools.pairwise(names))
    ops = {}
    for n in names:
        fwd = rng.uniform(0.5, 2.0)
        ops[n] = OpCost(fwd_ms=fwd, bwd_ms=fwd * rng.uniform(1.5, 2.5), out_bytes=1024)
    return plan_graph(graph, CostTable(ops=ops, comm=CommModel.free()), stages, microbatches, "chain")


def _as_trace(result: SimulationResult, t0_s: float) -> list[list[tuple[str, int, float, float]]]:
    """What ``StageRuntime.events`` would record for the simulated step (seconds, from ``t0_s``)."""
    return [
        [(e.kind, e.microbatch, t0_s + e.start / 1e3, t0_s + e.end / 1e3) for e in row]
        for row in result.timeline
    ]


@pytest.mark.parametrize("seed", range(4))
def test_fit_recovers_the_calibration_of_a_simulated_step(seed):
    rng = random.Random()
    stages, microbatches = rng.randint(3, 5), rng.randint(4, 9)
    plan = _chain_plan(rng, stages, microbatches)
    true = Calibration(
        overrun_ms=rng.uniform(0.01, 0.3),
        message_ms=rng.uniform(0.01, 0.2),
        latency_ms=rng.uniform(0.05, 0.5),
    )
    step = simulate_calibrated(plan, true)
    fitted = fit_calibration(_as_trace(step, rng.uniform(100.0, 1000.0)), plan)
    what = f"{stages} stages, {microbatches} micro-batches, {true}: fitted {fitted}"
    assert fitted.overrun_ms == pytest.approx(true.overrun_ms, abs=1e-6), what
    # a waiting consumer starts one send, one latency and one receive after its producer finished
    wait = 2 * fitted.message_ms + fitted.latency_ms
    assert wait == pytest.approx(2 * true.message_ms + true.latency_ms, abs=1e-6), what
    # how the wait splits into message cost and latency is a median over gaps: exact on ~99.7% of
    # random draws, off on the rest (a gap taken for message work also held latency)
    assert fitted.message_ms > 0, what
    again = simulate_calibrated(plan, fitted)
    assert again.iteration_time == pytest.approx(step.iteration_time, rel=0.01), what
    assert again.iteration_time > plan.simulate().iteration_time  # overruns and messages cost time


def test_traced_result_reads_a_trace_like_the_simulator():
    rng = random.Random()
    plan = _chain_plan(rng, 4, 6)
    step = simulate_calibrated(plan, Calibration(overrun_ms=0.1, message_ms=0.05, latency_ms=0.2))
    read = traced_result(_as_trace(step, rng.uniform(100.0, 1000.0)))
    first = min(e.start for row in step.timeline for e in row)
    assert read.iteration_time == pytest.approx(step.iteration_time - first, rel=1e-9)
    assert read.peak_in_flight == step.peak_in_flight == (4, 3, 2, 1)
    assert 0.0 < read.bubble_fraction < 1.0
    for got, want in zip(read.timeline, step.timeline):
        assert [(e.kind, e.microbatch) for e in got] == [(e.kind, e.microbatch) for e in want]
        assert [e.end - e.start for e in got] == pytest.approx([e.end - e.start for e in want], abs=1e-6)


def test_fit_rejects_split_stages_and_foreign_traces():
    graph = OpGraph.from_edges(
        ["a", "b", "c", "e", "d"], [("a", "b"), ("a", "c"), ("c", "e"), ("e", "d"), ("b", "d")]
    )
    costs = CostTable(ops={n.name: OpCost(fwd_ms=1, bwd_ms=2) for n in graph.nodes}, comm=CommModel.free())
    stages = [mask_of([graph.index[n] for n in names]) for names in (["a"], ["b"], ["c"], ["e", "d"])]
    dag = plan_stages(graph, costs, stages, 4)
    assert dag.schedule.late == ((3, 1),), "the join stage is split at its late input from stage 1"
    with pytest.raises(ValueError, match="without split stages"):
        fit_calibration(_as_trace(dag.simulate(), 0.0), dag)
    chain = _chain_plan(random.Random(), 3, 4)
    trace = _as_trace(chain.simulate(), 0.0)
    with pytest.raises(ValueError, match="trace has 2 stages, the plan 3"):
        fit_calibration(trace[:2], chain)
    with pytest.raises(ValueError, match="trace of stage 1 has 7 compute actions, its program 8"):
        fit_calibration([trace[0], trace[1][:-1], trace[2]], chain)
    with pytest.raises(ValueError, match="latency_ms must be >= 0"):
        Calibration(latency_ms=-1.0)

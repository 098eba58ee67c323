"""Memory-aware planning: held activations predicted from profiles and measured on real gloo steps
(see [Note: held activations], [Note: measured memory]), micro-batch size and count chosen with the
partition under a budget (see [Note: memory-aware micro-batching]), and the error when nothing fits."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
from _gp_dist import init_gloo, shared_seed, spawn
from _gp_graphs import two_chains
from _gp_models import CASES

import torch_graphpipe
from torch_graphpipe import CommModel, CostTable, GraphPipe, OpCost, choose_microbatches
from torch_graphpipe.memory import HeldActivations, _available_cpu_bytes, default_memory_budget

TOLERANCE = 0.15  # predicted vs measured held bytes per stage


def _affine_costs(graph, rng: random.Random, size: int, act: int) -> CostTable:
    """Costs of a micro-batch of ``size`` samples: a per-call overhead plus per-sample work."""
    ops = {}
    for n in graph.nodes:
        f = 0.5 + 0.05 * size * rng.uniform(0.8, 1.2)
        ops[n.name] = OpCost(fwd_ms=f, bwd_ms=2 * f, out_bytes=act * size, param_bytes=1000, saves=(n.name,))
    return CostTable(ops=ops, comm=CommModel.free(), microbatch_size=size, param_copies=2.0)


def test_budget_chooses_smaller_microbatches_and_fits():
    graph = two_chains(4)
    seed = random.randrange(2**31)
    low, high = (_affine_costs(graph, random.Random(seed), size, 100) for size in (1, 64))
    free = choose_microbatches(graph, low, high, 8, 64)
    assert free.num_microbatches * free.microbatch_size == 64
    sizes = []
    for budget in (None, 40_000, 20_000, 10_000):
        p = choose_microbatches(graph, low, high, 8, 64, memory_budget_bytes=budget)
        if budget is not None:
            assert max(p.peak_bytes) <= budget, (budget, p.peak_bytes)
            assert f"memory budget {budget / 1e6:.4g} MB" in str(p)
        assert f"{p.num_microbatches} micro-batches of {p.microbatch_size}" in str(p)
        assert "peak" in str(p)
        sizes.append(p.microbatch_size)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], sizes


def test_budget_nothing_fits_names_the_stage_or_operator():
    graph = two_chains(4)
    costs = _affine_costs(graph, random.Random(), 8, 100)
    need = costs.param_copies * 1000 + 2 * 800  # one operator: its input and output, one micro-batch
    with pytest.raises(ValueError, match=r"operator \w+ alone needs 3600 bytes"):
        torch_graphpipe.plan_graph(graph, costs, 8, 8, memory_budget_bytes=need - 1)
    with pytest.raises(
        ValueError, match=r"smallest stage that does not fit, stage \d+ \(\w+\), needs \d+ bytes"
    ):
        torch_graphpipe.plan_graph(graph, costs, 8, 8, memory_budget_bytes=need + 1)


def test_auto_microbatches_profiles_and_fits():
    case = CASES["fork_join"]
    x, _ = case.batch(32, torch.Generator().manual_seed(random.randrange(2**31)))
    p = torch_graphpipe.plan(case.build(), x, 4, "auto", repeats=1)
    assert p.num_microbatches * p.microbatch_size == 32 and len(p.peak_bytes) == 4
    tight = torch_graphpipe.plan(
        case.build(), x, 4, "auto", memory_budget_bytes=max(p.peak_bytes) * 0.9, repeats=1
    )
    assert max(tight.peak_bytes) <= max(p.peak_bytes) * 0.9


def _measure_worker(rank: int, world: int, init: str, names: list[str]) -> None:
    init_gloo(rank, world, init)
    try:
        seed = shared_seed()
        for k, name in enumerate(names):
            _check_measured(CASES[name], name, seed + k, "1f1b")
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def _check_measured(case, name: str, seed: int, kind: str) -> None:
    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = case.build()
    x, y = case.batch(32 * world, torch.Generator().manual_seed(seed))
    gp = GraphPipe(
        model, example_inputs=x, loss_fn=case.loss, num_microbatches=2 * world, partition=case.partition,
        schedule_kind=kind,
    )  # fmt: skip
    gp.runtime.memory = HeldActivations()
    gp.step(*x, target=y)
    stage = gp.plan.stages[gp.stage]
    params = stage.cost.param_bytes * 4.0  # CostTable's default param_copies
    predicted = gp.plan.peak_bytes[gp.stage] - params
    measured = gp.runtime.memory.peak_bytes
    assert measured > 0
    assert abs(measured - predicted) <= TOLERANCE * measured, (
        f"{name} ({kind}) stage {gp.stage}: predicted {predicted:.0f} held bytes, measured {measured}"
    )


@pytest.mark.distributed
def test_predicted_held_memory_matches_measured():
    """Per stage, the plan's predicted peak of held activations is within 15% of the peak measured on a
    real step (1F1B; profiled costs, so the prediction uses what each operator saves). A zero-bubble
    stage holds more than predicted between B and W (measured 5632 against 4608 bytes on skip's stage 1),
    and a loss function that saves more than the model output adds to the loss stage (cross-entropy's
    log-probabilities: measured 2372 against 1856 on multi_output's stage 2): neither is modelled yet."""
    spawn(_measure_worker, 3, ["skip"])


def _auto_worker(rank: int, world: int, init: str) -> None:
    """``GraphPipe(num_microbatches="auto")``: the default budget is the host's available memory shared
    by its ranks ([Note: default memory budget]); the chosen count trains like one process; a budget
    nothing fits fails on every rank with the stage and its bytes; an explicit partition needs a count."""
    init_gloo(rank, world, init)
    try:
        budget, how = default_memory_budget(dist.group.WORLD, torch.device("cpu"))
        expected = _available_cpu_bytes() / world  # all ranks on this host, one CPU
        assert abs(budget - expected) <= 0.2 * expected and f"shared by {world} ranks" in how, (budget, how)
        case = CASES["fork_join"]
        seed = shared_seed()
        torch.manual_seed(seed)
        model = case.build()
        ref = copy.deepcopy(model)
        x, y = case.batch(8 * world, torch.Generator().manual_seed(seed))
        gp = GraphPipe(model, example_inputs=x, loss_fn=case.loss, num_microbatches="auto")
        m = gp.num_microbatches
        assert m == gp.plan.num_microbatches and m * gp.plan.microbatch_size == 8 * world, (m, str(gp.plan))
        assert gp.plan.memory_budget_bytes is not None and "memory budget" in str(gp.plan)
        loss = gp.step(*x, target=y)
        ref_loss = case.loss(ref(*x), y)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.item(), rtol=1e-5, atol=0)
        grads = dict(ref.named_parameters())
        for name, p in gp.module.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        with pytest.raises(
            ValueError, match=r"num_microbatches='auto'.*(stage \d+|operator \w+).*needs \d+ bytes"
        ):
            GraphPipe(case.build(), example_inputs=x, loss_fn=case.loss, num_microbatches="auto",
                      memory_budget_bytes=100)  # fmt: skip
        with pytest.raises(ValueError, match="partition='auto'"):
            GraphPipe(case.build(), example_inputs=x, loss_fn=case.loss, num_microbatches="auto",
                      partition=case.partition)  # fmt: skip
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_graphpipe_auto_microbatches_default_budget():
    spawn(_auto_worker, 4)

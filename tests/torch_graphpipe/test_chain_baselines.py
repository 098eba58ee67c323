"""Every torch chain schedule the benchmark compares against trains the chain stages correctly: losses
and gradients equal single-process training (see [Note: chain baseline] in benchmarks/graphpipe_baseline.py)."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from _gp_dist import init_gloo, shared_seed, spawn
from _gp_models import CASES

import torch_graphpipe
from benchmarks.graphpipe_baseline import SPLIT_BACKWARD, TORCH_SCHEDULES, ChainBaseline, stage_ranks
from torch_graphpipe import CommModel, CostTable, OpCost, capture

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-5, 1e-6


def test_stage_ranks():
    assert stage_ranks(6, 3, "loop") == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2}
    assert stage_ranks(6, 3, "v") == {0: 0, 1: 1, 2: 2, 3: 2, 4: 1, 5: 0}
    with pytest.raises(ValueError, match="do not divide"):
        stage_ranks(5, 2, "loop")


def _check(case_name: str, schedule: str, seed: int) -> None:
    world = dist.get_world_size()
    case = CASES[case_name]
    torch.manual_seed(seed)
    model = case.build()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    graph = capture(model).graph
    costs = CostTable(
        ops={n.name: OpCost(fwd_ms=1.0, bwd_ms=2.0) for n in graph.nodes}, comm=CommModel.free()
    )
    num_stages = TORCH_SCHEDULES[schedule][0] * world
    m = 2 * num_stages
    chain = torch_graphpipe.plan_graph(graph, costs, num_stages, m, "chain")
    batches = [case.batch(2 * m, gen) for _ in range(2)]
    actions: list[tuple[int, str]] = []

    @contextlib.contextmanager
    def record(stage: int, kind: str):
        actions.append((stage, kind))
        yield

    base = ChainBaseline(
        model, example_inputs=batches[0][0], loss_fn=case.loss, plan=chain, schedule=schedule,
        around_action=record,
    )  # fmt: skip
    for inputs, target in batches:  # two accumulation steps
        loss = base.step(*inputs, target=target)
        ref_loss = case.loss(ref(*inputs), target)
        ref_loss.backward()
        if base.is_last:
            torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0, msg=schedule)
    # every compute action ran inside around_action: per stage and step M forwards and M backwards,
    # whole (B) or as an input-gradient (I) and a weight-gradient (W) part; split only where asked
    for s in base.local:
        kinds = Counter(k for t, k in actions if t == s)
        assert kinds["F"] == kinds["B"] + kinds["I"] == 2 * m and kinds["I"] == kinds["W"], (
            schedule,
            s,
            kinds,
        )
        assert set(kinds) <= {"F", "B", "I", "W"} and (kinds["W"] > 0) == (schedule in SPLIT_BACKWARD), kinds
    ref_params = dict(ref.named_parameters())
    mine = []
    for stage in base.stage_modules:
        for name, p in stage.named_parameters():
            mine.append(name.removeprefix("inner."))
            torch.testing.assert_close(
                p.grad,
                ref_params[name].grad,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda msg, n=name: f"{schedule} {n}: {msg}",
            )
    held: list = [None] * world
    dist.all_gather_object(held, mine)
    assert sorted(n for part in held for n in part) == sorted(ref_params), schedule


def _worker(rank: int, world: int, init: str, case_name: str) -> None:
    init_gloo(rank, world, init)
    try:
        seed = shared_seed()
        for k, schedule in enumerate(TORCH_SCHEDULES):
            _check(case_name, schedule, seed + k)
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case_name", ["skip", "concat"])
def test_every_torch_schedule_matches_one_process(case_name):
    """A skip edge travelling along the chain; every stage reading a model input."""
    spawn(_worker, 2, case_name)

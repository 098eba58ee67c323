"""GraphPipe over real gloo process groups, compared with single-process training.

Semantics checked (see [Note: runtime semantics]): ``gp.step(batch)`` accumulates into ``.grad`` the
gradient of the batch's mean loss, exactly like ``loss_fn(model(batch), target).backward()`` in one
process; two ``step`` calls before ``optimizer.step()`` accumulate two batches, like two
``backward()`` calls. Every rank checks its own parameters' gradients; rank 0 checks that the ranks
together hold every parameter once.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _gp_dist import init_gloo, spawn
from _gp_models import CASES, Case, Untraceable

import torch_graphpipe
from benchmarks.graphpipe_baseline import ChainBaseline
from torch_graphpipe import CommModel, CostTable, GraphCaptureError, GraphPipe, OpCost, PeerError, capture

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-5, 1e-6


def _assert_grads(gp: GraphPipe, ref: nn.Module, what: str) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in gp.module.named_parameters():
        assert p.grad is not None, f"{what}: {name} has no gradient"
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=RTOL, atol=ATOL, msg=f"{what}: {name}")
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(n for n, _ in gp.module.named_parameters()))
    held = [n for part in names for n in part]  # every parameter once per replica
    expected = sorted(ref_params) * gp.data_parallel
    assert sorted(held) == sorted(expected), f"{what}: ranks hold {held}, model has {sorted(ref_params)}"


def _check_training(case: Case, partition, num_microbatches: int, seed: int, **kwargs) -> GraphPipe:
    world = dist.get_world_size()
    torch.manual_seed(seed)  # same model and data on every rank
    gen = torch.Generator().manual_seed(seed)
    model = case.build()
    ref = copy.deepcopy(model)
    batches = [case.batch(4 * world, gen) for _ in range(3)]
    gp = GraphPipe(
        model, example_inputs=batches[0][0], loss_fn=case.loss, num_microbatches=num_microbatches,
        partition=partition, **kwargs,
    )  # fmt: skip
    what = f"partition={partition} M={num_microbatches}"
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    params = list(gp.parameters())  # a stage of parameter-free operators has none
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for inputs, target in batches[:2]:  # two accumulation steps
        loss = gp.step(*inputs, target=target)
        ref_loss = case.loss(ref(*inputs), target)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0, msg=what)
    _assert_grads(gp, ref, what)
    if opt is not None:
        opt.step(), opt.zero_grad()
    ref_opt.step(), ref_opt.zero_grad()
    inputs, target = batches[2]
    loss = gp.step(*inputs, target=target if gp.stage == gp.loss_stage else None)
    ref_loss = case.loss(ref(*inputs), target)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0, msg=what)
    _assert_grads(gp, ref, what + " after an optimizer step")
    _check_inference_and_state(gp, case, ref, inputs, what)
    return gp


def _check_inference_and_state(gp: GraphPipe, case: Case, ref: nn.Module, inputs, what: str) -> None:
    with torch.no_grad():
        torch.testing.assert_close(gp(*inputs), ref(*inputs), rtol=RTOL, atol=ATOL, msg=what)
    state = gp.state_dict()
    for name, value in gp.module.state_dict().items():  # exactly what the ranks hold
        assert torch.equal(state[name], value), f"{what}: {name}"
    plain = case.build()
    plain.load_state_dict(state)  # strict: the full model's keys
    for name, value in ref.state_dict().items():  # equal to one-process training
        torch.testing.assert_close(
            plain.state_dict()[name], value, rtol=RTOL, atol=ATOL, msg=f"{what}: {name}"
        )
    fresh = case.build()  # other weights (the RNG moved on)
    gp.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gp(*inputs), fresh(*inputs), rtol=RTOL, atol=ATOL, msg=what)


def _train_worker(rank: int, world: int, init: str, case_name: str) -> None:
    init_gloo(rank, world, init)
    try:
        case = CASES[case_name]
        for seed, m in enumerate(sorted({1, world, 2 * world})):  # micro-batches from 1 to 2x the stages
            gp = _check_training(case, case.partition, m, seed)
            # a stage joining branches runs in two parts ([Note: late inputs]) on these partitions; on
            # multi_output the loss stage is split at the edge bringing it the other head's output
            split = {"skip": {2: 0}, "fork_join_tail": {2: 1}, "multi_output": {2: 1}}.get(case_name, {})
            assert dict(gp.plan.schedule.late) == split, gp.plan.schedule.late
            assert (gp.parts is not None) == (rank in split)
        if case_name in ("fork_join", "multi_output"):  # the planner's partition (profiled on rank 0)
            gp = _check_training(case, "auto", world, 7)
            assert gp.plan.num_stages == world and gp.plan.stage_graph == "dag"
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_training_matches_one_process(case_name):
    spawn(_train_worker, len(CASES[case_name].partition), case_name)


def _check_around_action(gp: GraphPipe, case: Case, world: int) -> None:
    """``around_action`` wraps every compute action of the program, in order, once per step."""
    seen: list[tuple[str, int, str]] = []

    @contextlib.contextmanager
    def record(a):
        seen.append(("enter", a.microbatch, a.kind))
        yield
        seen.append(("exit", a.microbatch, a.kind))

    gp.runtime.around_action = record
    inputs, target = case.batch(4 * world, torch.Generator().manual_seed(1))
    gp.step(*inputs, target=target if gp.stage == gp.loss_stage else None)
    gp.runtime.around_action = None
    program = [(a.microbatch, a.kind) for a in gp.runtime.program if a.is_compute]
    assert seen == [(e, *a) for a in program for e in ("enter", "exit")]


def _zero_bubble_worker(rank: int, world: int, init: str, names: list[str]) -> None:
    """Backwards split into input gradients (B) and weight gradients (W, placed in the bubbles): the
    same losses and gradients as one process (see [Note: split backward])."""
    init_gloo(rank, world, init)
    try:
        for seed, name in enumerate(names):
            case = CASES[name]
            graph = capture(case.build()).graph
            rng = torch.Generator().manual_seed(seed)
            ops = {}
            for n in graph.nodes:  # random costs: the W's land in different places for every draw
                f = float(torch.rand(1, generator=rng)) + 0.1
                ops[n.name] = OpCost(fwd_ms=f, bwd_ms=2 * f, wgt_ms=f * float(torch.rand(1, generator=rng)))
            costs = CostTable(ops=ops, comm=CommModel.free())
            gp = _check_training(
                case, case.partition, 2 * world, seed, costs=costs, schedule_kind="zero_bubble"
            )
            assert gp.plan.schedule_kind == "zero_bubble" and gp.runtime.split_backward
            _check_around_action(gp, case, world)
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "names",
    [["chain", "concat"], ["skip", "multi_output"]],
    ids=["4 stages", "3 stages with split join stages"],
)
def test_zero_bubble_training_matches_one_process(names):
    spawn(_zero_bubble_worker, len(CASES[names[0]].partition), names)


def _chain_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    try:
        case = CASES["skip"]
        graph = capture(case.build()).graph
        costs = CostTable(
            ops={n.name: OpCost(fwd_ms=1.0, bwd_ms=2.0, out_bytes=256) for n in graph.nodes},
            comm=CommModel.free(),
        )
        gp = _check_training(case, "auto", 2 * world, 3, stage_graph="chain", costs=costs)
        assert gp.plan.stage_graph == "chain"
        assert gp.plan.edges == tuple((i, i + 1) for i in range(world - 1))
        passed_on = [v for _, values in gp.route.send for v in values if v not in gp.route.node_names]
        if rank == 1:
            assert "a" in passed_on, "the skip edge from block a must pass through the middle stage"
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def test_chain_stage_graph_trains():
    spawn(_chain_worker, 3)


def _baseline_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    try:
        for seed, name in enumerate(["skip", "concat"]):  # a skip edge; every stage reading a model input
            _check_baseline(CASES[name], world, seed)
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def _check_baseline(case: Case, world: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = case.build()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    graph = capture(model).graph
    costs = CostTable(
        ops={n.name: OpCost(fwd_ms=1.0, bwd_ms=2.0) for n in graph.nodes}, comm=CommModel.free()
    )
    chain = torch_graphpipe.plan_graph(graph, costs, world, 2 * world, "chain")
    batches = [case.batch(4 * world, gen) for _ in range(2)]
    baseline = ChainBaseline(model, example_inputs=batches[0][0], loss_fn=case.loss, plan=chain)
    for inputs, target in batches:  # two accumulation steps
        loss = baseline.step(*inputs, target=target)
        ref_loss = case.loss(ref(*inputs), target)
        ref_loss.backward()
        if baseline.is_last:
            torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in baseline.stage_modules[0].named_parameters():
        torch.testing.assert_close(
            p.grad, ref_params[name].grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_chain_baseline_matches_one_process():
    """The Schedule1F1B baseline of the benchmark trains the same chain stages correctly."""
    spawn(_baseline_worker, 3)


def _zoo_worker(rank: int, world: int, init: str) -> None:
    from torch_zoo import get_model

    init_gloo(rank, world, init)
    try:
        for name in ("mmt", "dlrm", "candle_uno"):
            zoo = get_model(name)
            model = zoo.build("tiny").train()
            ref = copy.deepcopy(model)
            x, y = (
                zoo.example_inputs("tiny", 4 * world, seed=1),
                zoo.example_target("tiny", 4 * world, seed=1),
            )
            graph = capture(model).graph  # fixed costs: profiling MMT's 800 operators is slow here
            costs = CostTable(ops={n.name: OpCost(fwd_ms=1.0, bwd_ms=2.0, out_bytes=64) for n in graph.nodes})
            gp = GraphPipe(model, example_inputs=x, loss_fn=zoo.loss_fn, num_microbatches=world, costs=costs)
            loss = gp.step(*x, target=y)
            ref_loss = zoo.loss_fn(ref(*x), y)
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss.item(), rtol=RTOL, atol=0, msg=name)
            _assert_grads(gp, ref, name)
            plain = zoo.build("tiny", seed=3)
            plain.load_state_dict(gp.state_dict())  # strict, non-persistent buffers (DLRM's) left out
            gp.load_state_dict(zoo.build("tiny", seed=3).state_dict())
        dist.barrier()  # all ranks done before any tears the group down (gloo may abort otherwise)
    finally:
        dist.destroy_process_group()


def _data_parallel_worker(rank: int, world: int, init: str) -> None:
    """3 stages (the last split at a late input) x 2 replicas: each replica trains half of every batch."""
    init_gloo(rank, world, init)
    try:
        case = CASES["skip"]
        for seed, m in enumerate((1, 3)):
            gp = _check_training(case, case.partition, m, seed, data_parallel=2)
            assert (gp.stage, gp.replica) == divmod(rank, 2) and gp.plan.num_stages == 3
            assert (gp.parts is not None) == (gp.stage == 2)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_parallel_stages_match_one_process():
    """Losses, gradients (averaged over the replicas), inference and checkpoints equal one process."""
    spawn(_data_parallel_worker, 6)


def test_zoo_multi_branch_models_train():
    pytest.importorskip("torch_zoo")
    spawn(_zoo_worker, 3)


def _errors_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    try:
        case = CASES["fork_join"]
        (x,), y = case.batch(8, torch.Generator().manual_seed(0))
        kw = {"example_inputs": (x,), "loss_fn": case.loss}
        with pytest.raises(ValueError, match="does not split into num_microbatches=3"):
            GraphPipe(case.build(), num_microbatches=3, **kw)
        with pytest.raises(ValueError, match="partition has 4 stages but the process group has 2 ranks"):
            GraphPipe(case.build(), num_microbatches=2, partition=case.partition, **kw)
        with pytest.raises(ValueError, match="only 1 operators"):
            GraphPipe(nn.Linear(8, 4), num_microbatches=2, **kw)
        with pytest.raises(GraphCaptureError, match=r"x\.sum\(\) > 0"):
            GraphPipe(
                Untraceable(), num_microbatches=2, example_inputs=(torch.randn(4, 4),), loss_fn=case.loss
            )
        with pytest.raises(ValueError, match="2 ranks, which do not split into data_parallel=3"):
            GraphPipe(case.build(), num_microbatches=2, data_parallel=3, **kw)
        with pytest.raises(ValueError, match="data_parallel=2 replica shards of num_microbatches=3"):
            GraphPipe(case.build(), num_microbatches=3, data_parallel=2, **kw)
        with pytest.raises(ValueError, match="data_parallel must be an int"):
            GraphPipe(case.build(), num_microbatches=2, data_parallel=0, **kw)
        with pytest.raises(ValueError, match="no operator calls"):
            GraphPipe(case.build(), num_microbatches=2, partition=[["stem", "left"], ["rite", "head"]], **kw)
        gp = GraphPipe(
            case.build(), num_microbatches=2, partition=[["stem", "left"], ["right", "head"]], **kw
        )
        with pytest.raises(ValueError, match="batch size 7"):
            gp.step(x[:7], target=y[:7])
        dist.barrier()  # no rank sent anything above (both raised after agreeing, see [Note: ranks agree first])
        loss = gp.step(x, target=y)
        assert loss > 0
        dist.barrier()  # both ranks are done before either tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def test_bad_input_fails_before_communication():
    spawn(_errors_worker, 2)


def _dead_peer_worker(rank: int, world: int, init: str, how: str) -> None:
    init_gloo(rank, world, init, timeout_s=3.0)
    case = CASES["chain"]
    (x,), y = case.batch(8, torch.Generator().manual_seed(0))
    gp = GraphPipe(case.build(), example_inputs=(x,), loss_fn=case.loss, num_microbatches=2,
                   partition=[["layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "layers.5",
                                                                   "layers.6", "layers.7"]])  # fmt: skip
    dist.barrier()
    if rank == 1 and how == "exit":
        os._exit(0)  # dies without a word
    if rank == 1:
        time.sleep(4.5)  # alive, silent: rank 0 times out
        os._exit(0)
    start = time.perf_counter()
    with pytest.raises(PeerError, match="global rank 1") as info:
        gp.step(x, target=y)
    print(f"{how}: failed after {time.perf_counter() - start:.1f} s: {info.value}")


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_dead_peer_fails_with_its_rank(how):
    spawn(_dead_peer_worker, 2, how)


def test_public_api():
    assert torch_graphpipe.GraphPipe is GraphPipe
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed"):
        GraphPipe(nn.Linear(2, 2), example_inputs=(torch.randn(2, 2),), loss_fn=None, num_microbatches=1)

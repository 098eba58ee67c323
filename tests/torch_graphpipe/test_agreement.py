"""Ranks agree before they act (see [Note: ranks agree first]), over real gloo process groups.

A step whose ranks passed different batches, and a load whose state dict one rank cannot take, fail
with the same error on every rank and change nothing on any rank.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
import torch.distributed as dist
from _gp_dist import init_gloo, shared_seed, spawn
from _gp_models import CASES

from torch_graphpipe import GraphPipe

pytestmark = pytest.mark.distributed

TWO_STAGES = [["stem", "left"], ["right", "head"]]


def _expect_everywhere(call, error: type[Exception], pattern: str) -> str:
    """``call()`` raises ``error`` matching ``pattern`` on this rank; every rank got the same message."""
    with pytest.raises(error, match=pattern) as info:
        call()
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, str(info.value))
    assert len(set(messages)) == 1, messages
    return messages[0]


def _no_gradients(gp: GraphPipe, what: str) -> None:
    assert all(p.grad is None for p in gp.module.parameters()), f"{what}: a step ran on rank {gp.rank}"


def _step_worker(rank: int, world: int, init: str) -> None:
    """2 stages x 2 replicas: rank r runs stage r // 2, replica r % 2; ranks 2 and 3 compute the loss."""
    init_gloo(rank, world, init)
    try:
        case = CASES["fork_join"]
        rng = random.Random(shared_seed())
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        (x,), y = case.batch(8, gen)
        torch.manual_seed(rng.randrange(2**31))  # the same model on every rank
        model = case.build()
        ref = copy.deepcopy(model)
        gp = GraphPipe(model, example_inputs=(x,), loss_fn=case.loss, num_microbatches=2,
                       partition=TWO_STAGES, data_parallel=2)  # fmt: skip
        k = rng.choice([2, 3, 4])  # rank 3's batch is k times as large
        (big,), big_y = case.batch(8 * k, gen)
        inputs = big if rank == 3 else x
        _expect_everywhere(
            lambda: gp.step(inputs, target=big_y if rank == 3 else y),
            ValueError,
            re.escape(
                f"rank 3 (stage 1, replica 1) passed inputs[0]: torch.float32[{8 * k}, 8] "
                "where rank 0 (stage 0, replica 0) passed inputs[0]: torch.float32[8, 8]"
            ),
        )
        odd = rng.randrange(world)  # one rank passes float64 inputs
        inputs = x.double() if rank == odd else x
        _expect_everywhere(
            lambda: gp.step(inputs, target=y),
            ValueError,
            re.escape(f"stage {odd // 2}, replica {odd % 2}) passed inputs[0]: torch.float64[8, 8] where"),
        )
        cut = rng.randrange(1, 4)  # the replicas of the loss stage pass targets of different widths
        _expect_everywhere(
            lambda: gp.step(x, target=y[:, :cut] if rank == 2 else y),
            ValueError,
            r"rank [23] \(stage 1, replica [01]\) passed target: torch.float32\[8, [1-4]\] where rank [23]",
        )
        gp.train(rank != 1)
        _expect_everywhere(
            lambda: gp.step(x, target=y),
            ValueError,
            re.escape(
                "rank 1 (stage 0, replica 1) is in eval mode where rank 0 (stage 0, replica 0) is in training"
            ),
        )
        gp.train()
        _expect_everywhere(
            lambda: gp.step(x, target=None if rank == 2 else y),
            ValueError,
            re.escape("rank 2 (stage 1, replica 0): rank 2 (stage 1) computes the loss: pass target="),
        )
        _expect_everywhere(lambda: gp(big if rank == 0 else x), ValueError, r"GraphPipe\.forward: .*rank 0 ")
        _no_gradients(gp, "after the failed steps")
        loss = gp.step(x, target=y)  # the pipeline is intact: nothing was sent above
        ref_loss = case.loss(ref(x), y)
        torch.testing.assert_close(loss, ref_loss.item(), rtol=1e-5, atol=0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_batches_all_fail_before_sending():
    spawn(_step_worker, 4)


def _owned_key(gp: GraphPipe, rng: random.Random) -> tuple[int, str]:
    """A random rank and a random key of the state it owns (the same on every rank)."""
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(gp.module.state_dict()))
    owner = rng.randrange(len(keys))
    return owner, rng.choice(keys[owner])


def _snapshot(gp: GraphPipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gp.module.state_dict().items()}


def _unchanged(gp: GraphPipe, before: dict[str, torch.Tensor], what: str) -> None:
    for k, v in gp.module.state_dict().items():
        assert torch.equal(v, before[k]), f"{what}: rank {gp.rank} loaded {k}"


def _load_worker(rank: int, world: int, init: str) -> None:
    init_gloo(rank, world, init)
    try:
        case = CASES["fork_join"]
        rng = random.Random(shared_seed())
        torch.manual_seed(rng.randrange(2**31))  # the same weights on every rank
        (x,), _ = case.batch(8, torch.Generator().manual_seed(rng.randrange(2**31)))
        gp = GraphPipe(case.build(), example_inputs=(x,), loss_fn=case.loss, num_microbatches=2,
                       partition=TWO_STAGES)  # fmt: skip
        torch.manual_seed(rng.randrange(2**31))  # other weights, the same on every rank
        fresh = case.build()
        before = _snapshot(gp)
        owner, key = _owned_key(gp, rng)
        partial = {k: v for k, v in fresh.state_dict().items() if k != key}
        _expect_everywhere(
            lambda: gp.load_state_dict(partial),
            RuntimeError,
            re.escape(f"nothing loaded on any rank: rank {owner} (stage {owner}): missing ['{key}']"),
        )
        _unchanged(gp, before, f"strict load without {key}")
        extra = {**fresh.state_dict(), "tail.weight": torch.randn(3)}
        _expect_everywhere(
            lambda: gp.load_state_dict(extra), RuntimeError, re.escape("unexpected ['tail.weight']")
        )
        _unchanged(gp, before, "strict load with an unexpected key")
        owner, key = _owned_key(gp, rng)
        wrong = {**fresh.state_dict(), key: torch.randn(fresh.state_dict()[key].numel() + 1)}
        _expect_everywhere(
            lambda: gp.load_state_dict(wrong, strict=False),
            RuntimeError,
            re.escape(f"rank {owner} (stage {owner}): size mismatch for {key}"),
        )
        _unchanged(gp, before, f"load with a wrong shape for {key}")
        result = gp.load_state_dict(partial, strict=False)  # loads the rest everywhere
        assert result.missing_keys == [k for k in gp.module.state_dict() if k not in partial]
        gp.load_state_dict(fresh.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(gp(x), fresh(x), rtol=1e-5, atol=1e-6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_load_that_fails_on_one_rank_loads_nothing_anywhere():
    spawn(_load_worker, 2)

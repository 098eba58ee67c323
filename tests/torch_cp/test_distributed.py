"""Cache parallelism over real gloo process groups: every rank holds a shard of the KV cache."""

import pytest
import torch
import torch.distributed as dist

import torch_cp
from tests.torch_cp._dist import run_on_ranks

pytestmark = pytest.mark.distributed


def _worker(rank, world, shard_sizes, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(shard_sizes)
    q = torch.randn(2, 8, 2, 64, generator=g)
    k, v = torch.randn(2, 2, total, 64, generator=g), torch.randn(2, 2, total, 64, generator=g)
    start = sum(shard_sizes[:rank])
    k_local, v_local = (
        k[:, :, start : start + shard_sizes[rank]],
        v[:, :, start : start + shard_sizes[rank]],
    )
    for opts in ({}, {"is_causal": True}, {"is_causal": True, "window": 33, "softcap": 4.0}):
        ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
        for merge in ("all_gather", "all_reduce"):
            out, lse = torch_cp.attention(
                q,
                k_local,
                v_local,
                enable_gqa=True,
                group=dist.group.WORLD,
                return_lse=True,
                merge=merge,
                **opts,
            )
            assert (out.double() - ref_out).abs().max() <= 2e-6 * v.abs().max(), (rank, opts, merge)
            assert (lse.double() - ref_lse).abs().max() <= 1e-5, (rank, opts, merge)
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(x, gathered[0]) for x in gathered), "ranks disagree"


@pytest.mark.parametrize("shard_sizes", [[150, 150], [300, 0, 7], [1, 1]])
def test_sharded_cache_gives_exact_attention_on_every_rank(shard_sizes):
    run_on_ranks(_worker, len(shard_sizes), shard_sizes, len(shard_sizes))


_MISMATCH = {  # what rank 1 passes differently, and the words every rank's error must hold
    "head_dim": ({"d": 32}, ["head_dim differs", "rank 0: 64", "rank 1: 32"]),
    "q_len": ({"sq": 3}, ["q_len differs", "rank 1: 3"]),
    "batch": ({"b": 1}, ["batch differs", "rank 1: 1"]),
    "merge": ({"merge": "all_reduce"}, ["merge differs", "rank 1: 'all_reduce'"]),
    "window": ({"window": 8}, ["window differs"]),
}


def _call(rank, b=2, sq=1, d=64, merge="all_gather", window=None, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(b, 4, sq, d, generator=g)
    k, v = torch.randn(b, 2, 30, d, generator=g), torch.randn(b, 2, 30, d, generator=g)
    return q, k, v, {"enable_gqa": True, "group": dist.group.WORLD, "merge": merge, "window": window}


def _mismatch_worker(rank, world, which):
    changes, words = _MISMATCH.get(which, ({"merge": "foo"}, []))
    q, k, v, opts = _call(rank, **(changes if rank == 1 else {}))
    try:
        torch_cp.attention(q, k, v, **opts)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError(f"rank {rank}: no ValueError for a {which} mismatch")
    if which == "invalid_merge":
        words = ["merge must be one of"] if rank == 1 else ["rank(s) [1]"]
    assert all(w in message for w in words), (rank, message)
    # the group is still in step: a matching call afterwards is exact
    q, k, v, opts = _call(rank, seed=7)
    everything = [torch.empty_like(k) for _ in range(world)], [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(everything[0], k)
    dist.all_gather(everything[1], v)
    q0 = [torch.empty_like(q) for _ in range(world)]
    dist.all_gather(q0, q)
    out = torch_cp.attention(q0[0], k, v, **opts)
    ref_out, _ = torch_cp.attention_reference(q0[0], torch.cat(everything[0], 2), torch.cat(everything[1], 2))
    assert (out.double() - ref_out).abs().max() <= 2e-6 * max(x.abs().max() for x in everything[1]), rank


@pytest.mark.parametrize("which", [*_MISMATCH, "invalid_merge"])
def test_ranks_that_disagree_raise_on_every_rank(which):
    run_on_ranks(_mismatch_worker, 2, which)


def _nan_shard_worker(rank, world, merge):
    q, k, v, _ = _call(0, seed=11)  # the same queries on every rank
    k, v = _call(rank, seed=20)[1:3]
    if rank == 1:
        k = torch.full_like(k, float("nan"))
    out, lse = torch_cp.attention(
        q, k, v, enable_gqa=True, group=dist.group.WORLD, merge=merge, return_lse=True
    )
    assert out.isnan().all() and lse.isnan().all(), (
        f"rank {rank}: the NaN shard vanished in the {merge} merge"
    )
    kv_lens = torch.full((2,), 0 if rank == 1 else 30)  # rank 1 now holds an empty shard of NaN slots
    out, lse = torch_cp.attention(
        q, k, v, enable_gqa=True, group=dist.group.WORLD, merge=merge, return_lse=True, kv_lens=kv_lens
    )
    k0, v0 = _call(0, seed=20)[1:3]
    ref_out, ref_lse = torch_cp.attention_reference(q, k0, v0)
    assert (out.double() - ref_out).abs().max() <= 2e-6 * v0.abs().max(), (rank, merge)
    assert (lse.double() - ref_lse).abs().max() <= 1e-5, (rank, merge)


@pytest.mark.parametrize("merge", ["all_gather", "all_reduce"])
def test_a_nan_shard_makes_every_rank_nan_and_an_empty_one_does_not(merge):
    run_on_ranks(_nan_shard_worker, 2, merge)

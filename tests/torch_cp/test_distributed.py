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

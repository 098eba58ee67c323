"""Cache parallelism over real gloo process groups: every rank holds a shard of the KV cache."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch_cp

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, shard_sizes, seed):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard_sizes", [[150, 150], [300, 0, 7], [1, 1]])
def test_sharded_cache_gives_exact_attention_on_every_rank(shard_sizes):
    mp.spawn(
        _worker, args=(len(shard_sizes), _free_port(), shard_sizes, len(shard_sizes)), nprocs=len(shard_sizes)
    )

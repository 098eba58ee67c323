import pytest
import torch
import torch.distributed as dist

import torch_cp
from tests.torch_cp._dist import run_on_ranks


def _decode_and_check(cache, world, rank, seed):
    """Prefill 37 tokens then decode 1 token at a time; every step must equal full attention."""
    g = torch.Generator().manual_seed(seed)
    total = 37 + 9
    k_all, v_all = torch.randn(2, 2, total, 32, generator=g), torch.randn(2, 2, total, 32, generator=g)
    q_all = torch.randn(2, 8, total, 32, generator=g)
    steps = [(0, 37)] + [(t, t + 1) for t in range(37, total)]
    for a, b in steps:
        out = cache.attend(0, q_all[:, :, a:b], k_all[:, :, a:b], v_all[:, :, a:b])
        ref, _ = torch_cp.attention_reference(
            q_all[:, :, a:b], k_all[:, :, :b], v_all[:, :, :b], is_causal=True
        )
        assert (out.double() - ref).abs().max() <= 2e-6 * v_all.abs().max(), (rank, a, b)
    assert cache.seq_len(0) == total
    assert abs(cache.local_len(0) - total / world) <= cache.block_size
    assert torch.equal(
        cache.positions(0) // cache.block_size % world, torch.full((cache.local_len(0),), rank)
    )


def test_single_rank_cache_decodes_exactly():
    _decode_and_check(torch_cp.ShardedKVCache(1, block_size=4), 1, 0, seed=1)


def _worker(rank, world):
    _decode_and_check(torch_cp.ShardedKVCache(1, group=dist.group.WORLD, block_size=4), world, rank, seed=2)


@pytest.mark.distributed
def test_sharded_cache_over_three_ranks_decodes_exactly():
    run_on_ranks(_worker, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        torch_cp.ShardedKVCache(0)
    cache = torch_cp.ShardedKVCache(2)
    with pytest.raises(ValueError, match="layer"):
        cache.update(2, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    with pytest.raises(ValueError, match="empty"):
        cache.local(1)
    with pytest.raises(ValueError, match="alike"):
        cache.update(0, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 2, 8))

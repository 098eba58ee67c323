import pytest
import torch
import torch.distributed as dist

from tests.torch_cp._dist import run_on_ranks

transformers = pytest.importorskip("transformers")
import torch_cp.hf  # noqa: E402


def _models():
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    torch_cp.hf.register()
    ours = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="torch_cp").eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _generate(model, ids, cache):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True, cache=cache, pad_token_id=0,
        )  # fmt: skip


def _check_against_sdpa(group):
    ref, ours = _models()
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    want = _generate(ref, ids, transformers.DynamicCache())
    cache = torch_cp.hf.ShardedCache(group=group, block_size=4)
    got = _generate(ours, ids, cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    world = dist.get_world_size(group) if group is not None else 1
    total = ids.shape[1] + 5  # the last generated token is never fed back
    assert cache.get_seq_length() == total
    assert abs(cache.layers[0].shard.length - total / world) <= 4


def test_generate_matches_sdpa_on_one_rank():
    _check_against_sdpa(None)


def _worker(rank, world):
    _check_against_sdpa(dist.group.WORLD)
    ref, ours = _models()
    ids, attention_mask = _left_padded_batch()
    want = _generate_padded(ref, ids, attention_mask, transformers.DynamicCache())
    cache = torch_cp.hf.ShardedCache(group=dist.group.WORLD, block_size=4)
    assert torch.equal(_generate_padded(ours, ids, attention_mask, cache).sequences, want.sequences)


@pytest.mark.distributed
def test_generate_with_cache_sharded_over_two_ranks_matches_sdpa():
    """Also with a left-padded batch: each rank keeps its shard's columns of the padding mask."""
    run_on_ranks(_worker, 2)


def _left_padded_batch():
    """Two prompts of 9 and 17 tokens, the shorter one left-padded with zeros; fresh random tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 17), generator=g)
    attention_mask = torch.ones_like(ids)
    ids[0, :8], attention_mask[0, :8] = 0, 0
    return ids, attention_mask


def _generate_padded(model, ids, attention_mask, cache):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, output_logits=True,
            return_dict_in_generate=True, cache=cache, pad_token_id=0,
        )  # fmt: skip


@pytest.mark.parametrize("cache", ["dynamic", "sharded"])
def test_left_padded_batch_generates_the_tokens_of_sdpa(cache):
    ref, ours = _models()
    ids, attention_mask = _left_padded_batch()
    want = _generate_padded(ref, ids, attention_mask, transformers.DynamicCache())
    # the padding matters: without the mask, the padded row's tokens differ
    unpadded = _generate_padded(ref, ids, torch.ones_like(ids), transformers.DynamicCache())
    assert not torch.equal(unpadded.sequences[0], want.sequences[0])
    ours_cache = transformers.DynamicCache() if cache == "dynamic" else torch_cp.hf.ShardedCache(block_size=4)
    got = _generate_padded(ours, ids, attention_mask, ours_cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sharded_cache_is_a_transformers_cache_class():
    assert isinstance(torch_cp.hf.ShardedCache, type)
    cache = torch_cp.hf.ShardedCache(block_size=4)
    assert isinstance(cache, transformers.Cache) and isinstance(cache, torch_cp.hf.ShardedCache)
    assert type(cache) is type(torch_cp.hf.ShardedCache())  # one class, not one per call
    with pytest.raises(ValueError, match="block_size"):
        torch_cp.hf.ShardedCache(block_size=0)

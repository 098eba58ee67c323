"""Hugging Face transformers integration: ``attn_implementation="torch_cp"`` with a sharded cache.

    import torch_cp.hf
    torch_cp.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="torch_cp")
    cache = torch_cp.hf.ShardedCache(group=dist.group.WORLD)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

Every rank runs the same model on the same tokens (weights replicated); each keeps only its shard of
the KV cache, and attention over the whole cache is merged exactly across ranks (see
:func:`torch_cp.attention`). Without a :class:`ShardedCache` the implementation attends locally.

Limitations: transformers builds no mask for a custom implementation, so padding masks (a 2-D
``attention_mask`` with zeros) are not applied: use batches of equal-length sequences.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
import torch.distributed as dist

from torch_cp.attention import attention
from torch_cp.cache import LayerShard

__all__ = ["ShardedCache", "register"]

# The (cache, layer) of the latest update: read by the attention call of that same layer.
_ACTIVE: contextvars.ContextVar[tuple[Any, int] | None] = contextvars.ContextVar(
    "torch_cp_hf_active", default=None
)


def _transformers():
    try:
        import transformers
        from transformers import cache_utils
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("torch_cp.hf needs transformers: pip install 'torch-collage[hf]'") from err
    return transformers, cache_utils


def _layer_class():
    _, cache_utils = _transformers()

    class ShardedLayer(cache_utils.CacheLayerMixin):
        """One layer's shard of the KV cache (block-cyclic over the ranks)."""

        is_sliding = False

        def __init__(self, rank: int, world: int, block_size: int) -> None:
            super().__init__()
            self.shard, self.rank, self.world, self.block_size = LayerShard(), rank, world, block_size

        def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.shard.deal(key_states, value_states, self.rank, self.world, self.block_size)
            n = self.shard.length
            self.keys, self.values = self.shard.k[:, :, :n], self.shard.v[:, :, :n]
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
            return self.shard.seen + query_length, 0

        def get_seq_length(self) -> int:
            return self.shard.seen

        def get_max_length(self) -> int:
            return -1

    return ShardedLayer


def ShardedCache(*, group: dist.ProcessGroup | None = None, block_size: int = 16):
    """A transformers ``Cache`` that keeps only this rank's shard of every layer's keys and values."""
    _, cache_utils = _transformers()
    layer_cls = _layer_class()
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1

    class _ShardedCache(cache_utils.Cache):
        def __init__(self) -> None:
            super().__init__(layer_class_to_replicate=lambda: layer_cls(rank, world, block_size))
            self.group = group

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            _ACTIVE.set((self, layer_idx))
            return out

    return _ShardedCache()


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, L, D]`` -> ``[B, T, Hq, D]``."""
    active = _ACTIVE.get()
    group = kv_pos = q_pos = None
    if active is not None and active[1] == getattr(module, "layer_idx", None):
        cache, layer_idx = active
        shard = cache.layers[layer_idx].shard
        group = cache.group
        kv_pos = shard.pos[: shard.length].expand(query.shape[0], -1)
        q_pos = torch.full((query.shape[0],), shard.seen - query.shape[2], device=query.device)
    out = attention(
        query, key, value, is_causal=getattr(module, "is_causal", True), scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1], group=group, kv_pos=kv_pos, q_pos=q_pos,
        softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window"),
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers ``"torch_cp"`` as a transformers attention implementation (idempotent)."""
    transformers, _ = _transformers()
    transformers.AttentionInterface.register("torch_cp", _attention_forward)

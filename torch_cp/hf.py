"""Hugging Face transformers integration: ``attn_implementation="torch_cp"`` with a sharded cache.

    import torch_cp.hf
    torch_cp.hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="torch_cp")
    cache = torch_cp.hf.ShardedCache(group=dist.group.WORLD)
    out = model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=64)

Every rank runs the same model on the same tokens (weights replicated); each keeps only its shard of
the KV cache, and attention over the whole cache is merged exactly across ranks (see
:func:`torch_cp.attention`). Without a :class:`ShardedCache` the implementation attends locally.

Padding: :func:`register` also registers transformers' SDPA mask builder under ``"torch_cp"``, so a
padded batch (a 2-D ``attention_mask`` with zeros) reaches the attention as the boolean mask SDPA
gets, and runs on the kernels (see [Note: skipping hidden tiles] in csrc/cpu/decode_attention.cpp).

Importing this module works without transformers; :func:`register` and :class:`ShardedCache` then
raise ImportError naming the extra to install.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
import torch.distributed as dist

from torch_cp.attention import attention
from torch_cp.cache import LayerShard

try:
    import transformers
    from transformers import cache_utils, masking_utils
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    transformers = cache_utils = masking_utils = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

__all__ = ["ShardedCache", "ShardedLayer", "register"]

# The (cache, layer) of the latest update: read by the attention call of that same layer, which it
# recognises by its key tensor (a later call with another cache, in the same context, is not fooled).
_ACTIVE: contextvars.ContextVar[tuple[Any, int] | None] = contextvars.ContextVar(
    "torch_cp_hf_active", default=None
)


def _require_transformers() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "torch_cp.hf needs transformers: pip install 'torch-collage[hf]'"
        ) from _IMPORT_ERROR


class ShardedLayer(cache_utils.CacheLayerMixin if cache_utils else object):  # type: ignore[misc]
    """One layer's shard of the KV cache (block-cyclic over the ranks, see :class:`torch_cp.ShardedKVCache`)."""

    is_sliding = False

    def __init__(self, rank: int, world: int, block_size: int) -> None:
        _require_transformers()
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
        """The mask covers every global position so far: ``_attention_forward`` keeps this shard's columns."""
        return self.shard.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.shard.seen

    def get_max_length(self) -> int:
        return -1


class ShardedCache(cache_utils.Cache if cache_utils else object):  # type: ignore[misc]
    """A transformers ``Cache`` that keeps only this rank's shard of every layer's keys and values.

    Args:
        group: the process group the cache is sharded over; None keeps the whole cache here.
        block_size: tokens per block of the block-cyclic layout.
    """

    def __init__(self, *, group: dist.ProcessGroup | None = None, block_size: int = 16) -> None:
        _require_transformers()
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"ShardedCache: block_size must be a positive int, got {block_size!r}")
        rank = dist.get_rank(group) if group is not None else 0
        world = dist.get_world_size(group) if group is not None else 1
        super().__init__(layer_class_to_replicate=lambda: ShardedLayer(rank, world, block_size))
        self.group = group

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _ACTIVE.set((self, layer_idx))
        return out


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, L, D]`` -> ``[B, T, Hq, D]``.

    ``attention_mask``: None (causal, nothing padded) or the bool ``[B, 1, T, kv_length]`` mask of
    transformers' SDPA mask builder (causal and padding together), applied as SDPA applies it; with a
    :class:`ShardedCache` its columns are global positions, of which this rank's keys are taken.
    """
    active = _ACTIVE.get()
    group = kv_pos = q_pos = None
    mask = attention_mask
    if active is not None and key is active[0].layers[active[1]].keys:
        cache, layer_idx = active
        shard = cache.layers[layer_idx].shard
        group = cache.group
        positions = shard.pos[: shard.length]
        kv_pos = positions.expand(query.shape[0], -1)
        q_pos = torch.full((query.shape[0],), shard.seen - query.shape[2], device=query.device)
        if mask is not None:
            mask = mask.index_select(-1, positions.to(mask.device))
    out = attention(
        query, key, value, attn_mask=mask, is_causal=mask is None and getattr(module, "is_causal", True),
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1], group=group, kv_pos=kv_pos, q_pos=q_pos,
        softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window"),
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers ``"torch_cp"`` as a transformers attention implementation, with SDPA's boolean mask
    builder as its mask function (so padding masks reach it); idempotent."""
    _require_transformers()
    transformers.AttentionInterface.register("torch_cp", _attention_forward)
    masking_utils.AttentionMaskInterface.register("torch_cp", masking_utils.sdpa_mask)

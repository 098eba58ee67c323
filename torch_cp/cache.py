"""`ShardedKVCache`: the KV cache of a batch of sequences, sharded along the sequence over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch_cp.attention import attention

__all__ = ["LayerShard", "ShardedKVCache"]


class LayerShard:
    """This rank's keys, values and their global positions for one layer, in buffers that double."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = torch.empty(0, dtype=torch.int64)
        self.length = 0  # local tokens held
        self.seen = 0  # global tokens appended so far

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        if self.k is None:
            shape = (*k.shape[:2], 0, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
            self.pos = torch.empty(0, dtype=torch.int64, device=k.device)
        assert self.k is not None and self.v is not None and self.pos is not None
        need = self.length + k.shape[2]
        if need > self.k.shape[2]:
            self._grow(max(need, 2 * self.k.shape[2], 16))
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.pos[self.length : need] = positions
        self.length = need

    def deal(self, k: torch.Tensor, v: torch.Tensor, rank: int, world: int, block_size: int) -> None:
        """Appends the new tokens ``[B, Hkv, T, D]`` that the block-cyclic layout gives to ``rank``."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"ShardedKVCache.update: k and v must be [B, Hkv, T, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        positions = torch.arange(self.seen, self.seen + k.shape[2], device=k.device)
        mine = (positions // block_size) % world == rank
        self.append(k[:, :, mine], v[:, :, mine], positions[mine])
        self.seen += k.shape[2]

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            new = t.new_empty((*t.shape[:2], capacity, t.shape[3]))
            new[:, :, : self.length] = t[:, :, : self.length]
            return new

        assert self.k is not None and self.v is not None and self.pos is not None
        self.k, self.v = grown(self.k), grown(self.v)
        pos = self.pos.new_empty(capacity)
        pos[: self.length] = self.pos[: self.length]
        self.pos = pos


class ShardedKVCache:
    """Per-layer KV cache whose sequence axis is split over the ranks of ``group``, kept balanced.

    Every rank computes the same new keys and values (the weights are replicated under cache
    parallelism) and calls :meth:`update` with them; each rank keeps only its share. Tokens are
    dealt out block-cyclically: global position ``p`` lives on rank ``(p // block_size) % world``, so
    the shards never differ by more than ``block_size`` tokens. Attention over the whole cache is
    :meth:`attend` (exact, identical on every rank).

    Args:
        num_layers: number of attention layers.
        group: the process group to shard over; ``None`` keeps the whole cache here (one rank).
        block_size: tokens per block of the block-cyclic layout.
    """

    def __init__(
        self, num_layers: int, *, group: dist.ProcessGroup | None = None, block_size: int = 16
    ) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"ShardedKVCache: num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"ShardedKVCache: block_size must be a positive int, got {block_size!r}")
        self.group = group
        self.block_size = block_size
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self._layers = [LayerShard() for _ in range(num_layers)]

    def _layer(self, layer: int) -> LayerShard:
        if not 0 <= layer < len(self._layers):
            raise ValueError(f"ShardedKVCache: layer must be in [0, {len(self._layers)}), got {layer}")
        return self._layers[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``k``, ``v`` ``[B, Hkv, T, D]`` (the same on every rank); returns this rank's shard ``[B, Hkv, L_local, D]``."""
        self._layer(layer).deal(k, v, self.rank, self.world, self.block_size)
        return self.local(layer)

    def local(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys and values of ``layer``: ``[B, Hkv, L_local, D]`` views."""
        shard = self._layer(layer)
        if shard.k is None or shard.v is None:
            raise ValueError(f"ShardedKVCache: layer {layer} is empty; call update() first")
        return shard.k[:, :, : shard.length], shard.v[:, :, : shard.length]

    def positions(self, layer: int) -> torch.Tensor:
        """Global positions of this rank's tokens of ``layer``: ``[L_local]`` int64."""
        shard = self._layer(layer)
        if shard.pos is None:
            raise ValueError(f"ShardedKVCache: layer {layer} is empty; call update() first")
        return shard.pos[: shard.length]

    def seq_len(self, layer: int = 0) -> int:
        """Tokens appended to ``layer`` over all ranks."""
        return self._layer(layer).seen

    def local_len(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held by this rank."""
        return self._layer(layer).length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """Appends ``k``/``v`` to ``layer``, then attends ``q`` ``[B, Hq, T, D]`` to the whole cache.

        The ``T`` queries are the last ``T`` positions; keyword arguments go to :func:`torch_cp.attention`
        (``is_causal`` defaults to True). Returns ``[B, Hq, T, D]`` in ``q.dtype`` (with ``return_lse``,
        also the lse).
        """
        k_local, v_local = self.update(layer, k, v)
        kwargs.setdefault("is_causal", True)
        kwargs.setdefault("enable_gqa", q.shape[1] != k.shape[1])
        kv_pos = self.positions(layer).expand(q.shape[0], -1)
        q_pos = torch.full((q.shape[0],), self.seq_len(layer) - q.shape[2], device=q.device)
        return attention(q, k_local, v_local, group=self.group, kv_pos=kv_pos, q_pos=q_pos, **kwargs)  # type: ignore[return-value]

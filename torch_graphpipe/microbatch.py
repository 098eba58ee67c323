"""Splitting a batch into micro-batches and joining micro-batch outputs back (dim 0 is the batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["join_outputs", "split_batch"]


def split_batch(value: Any, num_microbatches: int, what: str) -> list[Any]:
    """``value`` (a pytree) cut into ``num_microbatches`` equal parts along dim 0 of every tensor.

    Tensors without a batch dimension (0-d) and non-tensor leaves are shared by every part. Raises
    ``ValueError`` naming ``what`` when a batch size is not divisible.
    """
    leaves, treespec = pytree.tree_flatten(value)
    columns: list[Sequence[Any]] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] % num_microbatches:
                where = what if len(leaves) == 1 else f"{what} (leaf {i})"
                raise ValueError(
                    f"{where} has batch size {leaf.shape[0]}, which does not split into "
                    f"num_microbatches={num_microbatches} equal micro-batches"
                )
            columns.append(leaf.chunk(num_microbatches, dim=0))
        else:
            columns.append([leaf] * num_microbatches)
    return [pytree.tree_unflatten([col[j] for col in columns], treespec) for j in range(num_microbatches)]


def join_outputs(outputs: Sequence[Any]) -> Any:
    """Inverse of :func:`split_batch` for model outputs: tensors concatenated along dim 0.

    0-d tensors and non-tensor leaves are taken from the first micro-batch.
    """
    flat = [pytree.tree_flatten(o) for o in outputs]
    treespec = flat[0][1]
    joined = []
    for i, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            joined.append(torch.cat([leaves[i] for leaves, _ in flat], dim=0))
        else:
            joined.append(leaf)
    return pytree.tree_unflatten(joined, treespec)

"""`merge_states`: the exact merge of attention partial states (public API)."""

from __future__ import annotations

import math

import torch

from torch_cp import _ops
from torch_cp.reference import merge_states_reference

__all__ = ["merge_states"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(out: torch.Tensor, lse: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or not isinstance(lse, torch.Tensor):
        raise TypeError(
            f"merge_states: out and lse must be tensors, got {type(out).__name__}, {type(lse).__name__}"
        )
    if out.dim() < 2:
        raise ValueError(f"merge_states: out must be [N, ..., D], got shape {tuple(out.shape)}")
    if tuple(lse.shape) != tuple(out.shape[:-1]):
        raise ValueError(
            f"merge_states: lse must have shape out.shape[:-1] = {tuple(out.shape[:-1])}, got {tuple(lse.shape)}"
        )
    if out.dtype not in _DTYPES:
        raise ValueError(f"merge_states: out must be a floating dtype in {_DTYPES}, got {out.dtype}")
    if not lse.is_floating_point():
        raise ValueError(f"merge_states: lse must be floating point (float32), got {lse.dtype}")
    if out.device != lse.device:
        raise ValueError(f"merge_states: out is on {out.device} but lse is on {lse.device}")


def merge_states(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N attention partial states over disjoint key sets into the exact full-attention state.

    Args:
        out: ``[N, B, H, Sq, D]`` (any number of middle dims) partial outputs, float32/float16/bfloat16/
            float64; each part normalised over its own keys.
        lse: ``[N, B, H, Sq]`` log-sum-exp of each part's scaled scores, **natural log**; ``-inf`` marks
            an empty part. Computed in float32.

    Returns:
        ``(out, lse)``: ``out [B, H, Sq, D]`` in ``out.dtype``, ``lse [B, H, Sq]`` float32 (float64, and
        computed in float64, when ``out`` is float64). Rows whose parts are all empty give ``out = 0``
        and ``lse = -inf``, never NaN; an empty part's ``out`` is never read. A part whose ``lse`` is NaN
        (or ``+inf``), or a NaN in the ``out`` of a non-empty part, makes the row NaN: a NaN partial
        never vanishes (see [Note: merge of partial states] in csrc/cpu/merge.h).
    """
    _check(out, lse)
    if out.dtype == torch.float64:
        return merge_states_reference(out, lse.to(torch.float64))
    lse32 = lse.to(torch.float32)
    if (
        not _ops.HAS_CPU_KERNELS
        or out.device.type not in ("cpu", "cuda")
        or (out.device.type == "cuda" and not _ops.HAS_CUDA_KERNELS)
    ):
        return merge_states_reference(out, lse32)
    n, rows_shape, dim = out.shape[0], out.shape[1:-1], out.shape[-1]
    rows = math.prod(rows_shape)
    merged, merged_lse = _ops.merge_states_op(out.reshape(n, rows, dim), lse32.reshape(n, rows))
    return merged.reshape(*rows_shape, dim), merged_lse.reshape(rows_shape)

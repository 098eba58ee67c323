"""Launches the Triton kernels: block sizes, the number of key splits, grids.

These are plain functions on real tensors; :mod:`torch_cp.triton.ops` registers them as custom ops.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from torch_cp.triton._decode_kernel import decode_split_kernel
from torch_cp.triton._merge_kernel import merge_kernel

__all__ = ["INTERPRETED", "MAX_HEAD_DIM", "choose_splits", "decode_partial", "merge_partials"]

INTERPRETED: bool = isinstance(decode_split_kernel, InterpretedFunction)
"""True when triton was imported with ``TRITON_INTERPRET=1``: the kernels then run on CPU tensors."""

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # BLOCK_D is the next power of two >= D (at least 16, for tl.dot)
_MAX_BLOCK_R = 64  # query rows per program; larger GQA groups x Sq use more row blocks
_MIN_KEYS_PER_SPLIT = 512  # a split below this spends more on launch and merge than it saves
_MAX_SPLITS = 128


def _block_n(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 32


def choose_splits(requested: int, programs: int, kv_len: int, device: torch.device) -> int:
    """Key splits per (batch row, KV head): ``requested`` if > 0, else enough to fill the device.

    On CUDA the grid aims at two programs per SM; elsewhere (the interpreter) at four programs.
    """
    if requested > 0:
        return min(requested, _MAX_SPLITS)
    target = 4
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(target / max(1, programs))
    return max(1, min(want, kv_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def _scales(scale: float, softcap: float) -> tuple[float, float]:
    """``(qk_scale, cap2)`` of the kernel: scores in base 2 (see [Note: Triton decode kernel])."""
    if softcap > 0.0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


def _lowp_dot(dtype: torch.dtype, interpreted: bool) -> bool:
    """Tensor-core products in the cache's dtype (see **Precision** in [Note: Triton decode kernel])."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreted)


def decode_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    kv_pos: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    scale: float,
    softcap: float,
    is_causal: bool,
    window: int,
    splits: int,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partial attention states.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, L, D]``, one dtype (float32/float16/bfloat16), last dim
            contiguous; kv_lens ``[B]`` int or None; kv_pos ``[B, L]`` int or None; q_pos ``[B]`` int,
            needed when ``is_causal`` or ``window >= 0`` (``window < 0``: none); ``softcap`` 0: off.
        splits: number of key splits ``S >= 1``.
        attn_mask: None, or a bool or float32 mask broadcastable to ``[B, Hq, Sq, L]`` (see **Masks**
            in [Note: Triton decode kernel]).

    Returns:
        ``out [S, B, Hq, Sq, D]`` float32 and ``lse [S, B, Hq, Sq]`` float32, natural log; a split
        with no visible key has ``out = 0``, ``lse = -inf``.
    """
    b, hq, sq, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    out = q.new_empty((splits, b, hq, sq, d), dtype=torch.float32)
    lse = q.new_empty((splits, b, hq, sq), dtype=torch.float32)
    rows = hq // hkv * sq
    if out.numel() == 0:
        return out, lse
    block_r = min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(rows)))
    grid = (b * hkv, splits, triton.cdiv(rows, block_r))
    qk_scale, cap2 = _scales(scale, softcap)
    masked = is_causal or window >= 0
    mask = None
    if attn_mask is not None:  # bool as uint8 (0 hides), read through the strides of its expansion
        mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        mask = mask.expand(b, hq, sq, kv_len)
    # Absent optional tensors are never read (their flags are off); lse stands in for their pointers.
    lens_arg, pos_arg, qpos_arg, mask_arg = (lse if t is None else t for t in (kv_lens, kv_pos, q_pos, mask))
    mask_strides = (0, 0, 0, 0) if mask is None else mask.stride()
    decode_split_kernel[grid](
        q, k, v, lens_arg, pos_arg, qpos_arg, mask_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), 0 if kv_pos is None else kv_pos.stride(0), *mask_strides,
        hkv, hq // hkv, sq, kv_len, d, b * hq * sq, qk_scale, cap2, max(window, 0),
        HAS_LENS=kv_lens is not None, HAS_POS=masked and kv_pos is not None, SOFTCAP=softcap > 0.0,
        CAUSAL=is_causal, WINDOW=window >= 0, HAS_MASK=mask is not None,
        MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool, LOWP_DOT=_lowp_dot(q.dtype, INTERPRETED),
        BLOCK_R=block_r, BLOCK_N=_block_n(q.device), BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out, lse


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge over the first axis: ``out [N, M, D]``, ``lse [N, M]`` float32 (natural log).

    Returns ``(out [M, D]`` in ``out_dtype`` (default ``out.dtype``), ``lse [M]`` float32``)``.
    """
    n, rows, dim = out.shape
    out, lse = out.contiguous(), lse.contiguous()
    res = out.new_empty((rows, dim), dtype=out_dtype or out.dtype)
    res_lse = lse.new_empty((rows,))
    if rows == 0 or dim == 0:
        return res, res_lse.fill_(float("-inf"))
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(1, min(16, 4096 // block_d))
    merge_kernel[(triton.cdiv(rows, block_m),)](
        out, lse, res, res_lse, n, rows, dim, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4
    )
    return res, res_lse

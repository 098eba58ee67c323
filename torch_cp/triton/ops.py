"""The Triton kernels as ``torch.library`` custom ops in the ``torch_cp`` namespace, with fake impls.

``torch_cp::triton_decode_attention`` has the schema of ``torch_cp::decode_attention`` (the C++/CUDA
op); ``torch_cp::triton_merge_states`` that of ``torch_cp::merge_states``.

They are ``custom_op`` wrappers around the launches rather than ``triton_op``: under
``TRITON_INTERPRET=1`` (how they are tested on CPU) ``wrap_triton`` hands back the interpreted
function, which cannot run on the fake tensors ``triton_op`` traces its body with, so the tested
registration would differ from the GPU one. As custom ops, Inductor calls them as opaque kernels.
"""

from __future__ import annotations

import torch

from torch_cp._checks import check_decode_op_args
from torch_cp.triton.launch import INTERPRETED, MAX_HEAD_DIM, choose_splits, decode_partial, merge_partials

__all__ = ["decode_attention", "merge_states", "unsupported_reason"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str:
    """Why the Triton decode kernel cannot take ``q [B, Hq, Sq, D]``, ``k [B, Hkv, L, D]``; "" if it can."""
    if q.device.type != "cuda" and not INTERPRETED:
        return f"tensors are on {q.device}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 before importing triton"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not one of float32, float16, bfloat16"
    if not 0 < q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (q {tuple(q.shape)}) is not in [1, {MAX_HEAD_DIM}]"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"q heads {q.shape[1]} are not a multiple of k heads {k.shape[1]}"
    return ""


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _as_int64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int64).contiguous()


def _compact_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` bool or float32, without the broadcast (stride 0) extent of an expanded mask."""
    for dim in range(attn_mask.dim()):
        if attn_mask.stride(dim) == 0 and attn_mask.shape[dim] > 1:
            attn_mask = attn_mask.narrow(dim, 0, 1)
    return attn_mask if attn_mask.dtype in (torch.bool, torch.float32) else attn_mask.float()


def _trim_to_mask(
    kv_lens: torch.Tensor | None, attn_mask: torch.Tensor, batch: int, kv_len: int
) -> torch.Tensor:
    """``kv_lens`` cut at each row's last key that the mask shows to some query: keys past it are
    hidden anyway, and the splits then share only the keys before it (a static cache's hidden tail
    costs nothing). On the device, without a synchronisation."""
    shown = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    shown = (
        shown.reshape((1,) * (4 - shown.dim()) + tuple(shown.shape)).any(dim=2).any(dim=1)
    )  # [B | 1, L | 1]
    if kv_len == 0:
        return torch.zeros(batch, dtype=torch.int64, device=shown.device)
    ends = torch.arange(1, kv_len + 1, device=shown.device) * shown  # [B | 1, L]
    lens = ends.amax(dim=-1).expand(batch).contiguous()  # the kernel reads lens_ptr + b
    return lens if kv_lens is None else torch.minimum(lens, kv_lens.clamp(0, kv_len))


@torch.library.custom_op("torch_cp::triton_decode_attention", mutates_args=())
def decode_attention(
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
    num_splits: int,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode attention with log-sum-exp, on Triton.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, L, D]``; one dtype (float32/float16/bfloat16),
            ``Hq % Hkv == 0``, ``D <= 256``.
        kv_lens: ``[B]`` int, valid keys per row (default ``L``). kv_pos: ``[B, L]`` int key positions
            (default ``0..L-1``). q_pos: ``[B]`` int, position of query 0; required when ``is_causal``
            or ``window >= 0``. See [Note: key and query positions] in torch_cp/reference.py.
        scale: score scale. softcap: ``s -> softcap·tanh(s / softcap)``; 0 turns it off.
        window: sliding window (key visible when ``pos > q - window``); ``< 0``: none.
        num_splits: key splits per (row, KV head); 0 chooses from the device size.
        attn_mask: bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Sq, L]``;
            ``-inf`` hides a key. Tiles of keys no query sees are not read.

    Returns:
        ``out [B, Hq, Sq, D]`` float32 and ``lse [B, Hq, Sq]`` float32, **natural log**; a query with no
        visible key has ``out = 0``, ``lse = -inf``.
    """
    op = "triton_decode_attention"
    check_decode_op_args(
        op, q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask
    )
    reason = unsupported_reason(q, k)
    if reason:
        raise ValueError(f"{op}: {reason}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, hq, sq, d = q.shape
    kv_lens = _as_int64(kv_lens)
    if attn_mask is not None:
        attn_mask = _compact_mask(attn_mask)
        kv_lens = _trim_to_mask(kv_lens, attn_mask, b, k.shape[2])
    splits = choose_splits(num_splits, b * k.shape[1], k.shape[2], q.device)
    out, lse = decode_partial(
        q, k, v, kv_lens, _as_int64(kv_pos), _as_int64(q_pos), scale, softcap, is_causal, window, splits,
        attn_mask,
    )  # fmt: skip
    if splits == 1:
        return out[0], lse[0]
    merged, merged_lse = merge_partials(out.view(splits, -1, d), lse.view(splits, -1), torch.float32)
    return merged.view(b, hq, sq, d), merged_lse.view(b, hq, sq)


@decode_attention.register_fake
def _decode_attention_fake(
    q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask=None
):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torch_cp::triton_merge_states", mutates_args=())
def merge_states(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of N partial states on Triton: ``out [N, M, D]``, ``lse [N, M]`` float32 natural log.

    Returns ``out [M, D]`` in ``out.dtype`` and ``lse [M]`` float32; all-empty rows give 0 and ``-inf``.
    """
    if out.dim() != 3 or tuple(lse.shape) != tuple(out.shape[:2]) or lse.dtype != torch.float32:
        raise ValueError(
            f"triton_merge_states: expected out [N, M, D] and float32 lse [N, M], got out {tuple(out.shape)}, "
            f"lse {tuple(lse.shape)} {lse.dtype}"
        )
    if out.dtype not in _DTYPES:
        raise ValueError(
            f"triton_merge_states: out dtype {out.dtype} is not one of float32, float16, bfloat16"
        )
    if out.device != lse.device:
        raise ValueError(f"triton_merge_states: out is on {out.device} but lse is on {lse.device}")
    return merge_partials(out, lse)


@merge_states.register_fake
def _merge_states_fake(out, lse):
    return out.new_empty(out.shape[1:]), lse.new_empty(lse.shape[1:])

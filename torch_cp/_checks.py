"""Validation of `torch_cp.attention` arguments: clear errors naming the argument and its shape."""

from __future__ import annotations

import torch

__all__ = ["check_attention_args"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"attention: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head dim (dim 3)"
        )


def _check_heads(q: torch.Tensor, k: torch.Tensor, enable_gqa: bool) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"attention: q heads ({hq}, q {tuple(q.shape)}) must be a multiple of k heads ({hkv})"
        )
    if hq != hkv and not enable_gqa:
        raise ValueError(f"attention: q has {hq} heads and k has {hkv}; pass enable_gqa=True for GQA/MQA")


def _check_lengths(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or tuple(t.shape) != shape:
        raise ValueError(f"attention: {name} must be an integer tensor of shape {shape}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"attention: {name} is on {t.device} but q is on {device}")


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_attention_args(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, positions) -> None:
    """Raises ValueError/TypeError for arguments `torch_cp.attention` cannot take."""
    _check_qkv(q, k, v)
    _check_heads(q, k, enable_gqa)
    if dropout_p != 0.0:
        raise ValueError(
            f"attention: dropout_p must be 0.0 (decode attention has no dropout), got {dropout_p}"
        )
    if attn_mask is not None and is_causal:
        raise ValueError("attention: pass either attn_mask or is_causal=True, not both")
    b, kv_len = q.shape[0], k.shape[2]
    _check_lengths("kv_lens", positions.get("kv_lens"), (b,), q.device)
    _check_lengths("kv_pos", positions.get("kv_pos"), (b, kv_len), q.device)
    _check_lengths("q_pos", positions.get("q_pos"), (b,), q.device)
    window = positions.get("window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"attention: window must be a positive int or None, got {window!r}")

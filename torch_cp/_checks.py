"""Validation of `torch_cp.attention` arguments: clear errors naming the argument and its value.

A wrong type (a bool ``window``, a float ``kv_lens``) raises ``TypeError``; a wrong value or shape
raises ``ValueError``, and so does an ``attn_mask`` tensor of the wrong dtype (as the kernels' checks do). The kernels check the same again in C++ (see [Note: decode_attention argument
checks] in csrc/cpu/decode_args.h), so an op called directly cannot read past a tensor either.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any

import torch

__all__ = [
    "MERGE_METHODS",
    "call_signature",
    "check_attention_args",
    "check_decode_op_args",
    "check_state_args",
    "describe_signature",
    "invalid_signature",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MERGE_METHODS = ("all_gather", "all_reduce")
_MAX_WINDOW = 2**62  # positions are int64; a larger window would overflow `q - window`


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
    if q.shape[3] == 0:
        raise ValueError(f"attention: head dim (dim 3) must be >= 1, got q {tuple(q.shape)}")


def _check_heads(q: torch.Tensor, k: torch.Tensor, enable_gqa: bool) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"attention: q heads ({hq}, q {tuple(q.shape)}) must be a multiple of k heads ({hkv})"
        )
    if hq != hkv and not enable_gqa:
        raise ValueError(f"attention: q has {hq} heads and k has {hkv}; pass enable_gqa=True for GQA/MQA")


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_positions(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> None:
    """``kv_lens``/``kv_pos``/``q_pos``: None, or an integer (not bool) tensor of exactly ``shape`` on ``device``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"attention: {name} must be an integer tensor of shape {shape}, got {_describe(t)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"attention: {name} must be an integer tensor of shape {shape}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"attention: {name} is on {t.device} but q is on {device}")


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"attention: {name} must be a bool, got {value!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_scalars(scale: Any, softcap: Any, window: Any, num_splits: Any) -> None:
    if scale is not None and not _is_real(scale):
        raise TypeError(f"attention: scale must be a float or None, got {scale!r}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale!r}")
    if softcap is not None and not _is_real(softcap):
        raise TypeError(f"attention: softcap must be a float or None, got {softcap!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(
            f"attention: softcap must be a finite float > 0 (or None/0 for none), got {softcap!r}"
        )
    if window is not None and not (isinstance(window, numbers.Integral) and not isinstance(window, bool)):
        raise TypeError(f"attention: window must be a positive int or None, got {window!r}")
    if window is not None and not 1 <= int(window) <= _MAX_WINDOW:
        raise ValueError(f"attention: window must be a positive int (at most 2**62) or None, got {window!r}")
    if not (isinstance(num_splits, numbers.Integral) and not isinstance(num_splits, bool)):
        raise TypeError(f"attention: num_splits must be an int, got {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"attention: num_splits must be >= 0 (0: automatic), got {num_splits!r}")


def _mask_error(op: str, attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> str:
    """Why ``attn_mask`` cannot mask ``q [B, Hq, Sq, D]`` against ``k [B, Hkv, L, D]``, or ""."""
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shape = list(attn_mask.shape)
    if attn_mask.dim() > 4 or any(s not in (1, n) for s, n in zip(reversed(shape), reversed(full))):
        return f"{op}: attn_mask of shape {shape} is not broadcastable to [B, Hq, Sq, L] = {list(full)}"
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return f"{op}: attn_mask (shape {shape}) must be bool or floating point, got {attn_mask.dtype}"
    if attn_mask.device != q.device:
        return f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}"
    return ""


def _check_mask(attn_mask: object, q: torch.Tensor, k: torch.Tensor) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    error = _mask_error("attention", attn_mask, q, k)
    if error:
        raise ValueError(error)


def check_state_args(q, k, v, options: dict) -> None:
    """Raises ValueError/TypeError for arguments `torch_cp.attention_state` cannot take.

    ``options``: ``attn_mask``, ``scale``, ``softcap``, ``is_causal``, ``window``, ``kv_lens``,
    ``kv_pos``, ``q_pos``, ``num_splits`` as passed to it. Any GQA ratio is accepted.
    """
    _check_qkv(q, k, v)
    _check_heads(q, k, enable_gqa=True)
    _check_flag("is_causal", options["is_causal"])
    _check_mask(options["attn_mask"], q, k)
    _check_scalars(options["scale"], options["softcap"], options["window"], options["num_splits"])
    b, kv_len = q.shape[0], k.shape[2]
    _check_positions("kv_lens", options["kv_lens"], (b,), q.device)
    _check_positions("kv_pos", options["kv_pos"], (b, kv_len), q.device)
    _check_positions("q_pos", options["q_pos"], (b,), q.device)


def check_attention_args(q, k, v, dropout_p, enable_gqa, return_lse, merge, options: dict) -> None:
    """Raises ValueError/TypeError for arguments `torch_cp.attention` cannot take (see check_state_args)."""
    check_state_args(q, k, v, options)
    _check_flag("enable_gqa", enable_gqa)
    _check_flag("return_lse", return_lse)
    _check_heads(q, k, enable_gqa)
    if not _is_real(dropout_p) or dropout_p != 0.0:
        raise ValueError(
            f"attention: dropout_p must be 0.0 (decode attention has no dropout), got {dropout_p!r}"
        )
    if merge not in MERGE_METHODS:
        raise ValueError(f"attention: merge must be one of {MERGE_METHODS}, got {merge!r}")


def _check_op_index(
    op: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], q: torch.Tensor
) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def check_decode_op_args(
    op, q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask=None
) -> None:
    """The checks of a ``decode_attention`` op's arguments, as the C++ kernels make them.

    See [Note: decode_attention argument checks] in csrc/cpu/decode_args.h; ``op`` names the op in
    the messages (ValueError, as ``TORCH_CHECK_VALUE`` raises).
    """
    if not (q.dim() == k.dim() == v.dim() == 4) or k.shape != v.shape:
        raise ValueError(f"{op}: q, k, v must be 4-D with k and v alike, got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")  # fmt: skip
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"{op}: q, k, v must share a dtype and a device, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: q {list(q.shape)} does not match k {list(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"{op}: head dim must be >= 1, got q {list(q.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be finite and >= 0 (0: off), got {softcap}")
    if window == 0 or num_splits < 0:
        raise ValueError(
            f"{op}: window must be >= 1 or < 0 (got {window}), num_splits >= 0 (got {num_splits})"
        )
    b, kv_len = q.shape[0], k.shape[2]
    _check_op_index(op, "kv_lens", kv_lens, (b,), q)
    _check_op_index(op, "kv_pos", kv_pos, (b, kv_len), q)
    _check_op_index(op, "q_pos", q_pos, (b,), q)
    if (is_causal or window >= 0) and q_pos is None:
        raise ValueError(f"{op}: q_pos [B] is required with is_causal or window")
    error = "" if attn_mask is None else _mask_error(op, attn_mask, q, k)
    if error:
        raise ValueError(error)


# --- the call's signature, compared across ranks (see [Note: ranks agree on the call]) --------------
_FIELDS = (
    "valid", "batch", "q_heads", "q_len", "head_dim", "kv_heads", "dtype", "merge", "is_causal", "window",
    "scale", "softcap", "gathers_positions", "needs_grad",
)  # fmt: skip
_FLOAT_FIELDS = ("scale", "softcap")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def call_signature(q, k, options: dict, merge: str, gathers_positions: bool, needs_grad: bool) -> list[int]:
    """The parts of a valid call that every rank must pass alike, as ``len(_FIELDS)`` int64 values."""
    b, hq, sq, d = q.shape
    scale = d**-0.5 if options["scale"] is None else options["scale"]
    window = -1 if options["window"] is None else int(options["window"])
    values = {
        "valid": 1, "batch": b, "q_heads": hq, "q_len": sq, "head_dim": d, "kv_heads": k.shape[1],
        "dtype": _DTYPES.index(q.dtype), "merge": MERGE_METHODS.index(merge), "is_causal": int(options["is_causal"]),
        "window": window, "scale": _float_bits(scale), "softcap": _float_bits(options["softcap"] or 0.0),
        "gathers_positions": int(gathers_positions), "needs_grad": int(needs_grad),
    }  # fmt: skip
    return [values[name] for name in _FIELDS]


def invalid_signature() -> list[int]:
    """The signature a rank whose own arguments were refused sends, so that its peers raise too."""
    return [0] * len(_FIELDS)


def _show(name: str, value: int) -> str:
    if name in _FLOAT_FIELDS:
        return repr(_bits_float(value))
    if name == "dtype":
        return str(_DTYPES[value])
    if name == "merge":
        return repr(MERGE_METHODS[value])
    return str(value)


def describe_signature(rows: list[list[int]], rank: int) -> str:
    """An empty string when every rank sent the same signature, else what differs, rank by rank."""
    invalid = [r for r, row in enumerate(rows) if row[0] == 0]
    if invalid:
        return f"rank(s) {invalid} passed arguments torch_cp.attention refuses (their own error says which)"
    diffs = []
    for i, name in enumerate(_FIELDS):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {_show(name, x)}" for r, x in enumerate(values))
            diffs.append(f"{name} differs ({per_rank})")
    if not diffs:
        return ""
    return f"the ranks of the group disagree on the call (this is rank {rank}): " + "; ".join(diffs)

"""`torch_cp.attention`: a drop-in for `F.scaled_dot_product_attention` over a sharded KV cache."""

from __future__ import annotations

import contextlib
import functools
import logging
from types import ModuleType
from typing import Literal

import torch
import torch.distributed as dist

from torch_cp import _ops
from torch_cp._checks import call_signature, check_attention_args, check_state_args, invalid_signature
from torch_cp.distributed import MergeMethod, check_ranks_agree, gather_positions, merge_across_ranks
from torch_cp.reference import attention_reference

__all__ = ["attention", "attention_state"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "cpp", "cuda", "triton", "reference"]
_BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


# --- backend choice (cpp, cuda, triton, reference) --------------------------------------------------
def _triton_ops() -> tuple[ModuleType | None, str]:
    """``torch_cp.triton`` (imported on first use, it imports triton), or None and the reason.

    No ``functools.cache``: torch.compile traces through this, and Python caches the import anyway.
    """
    try:
        import torch_cp.triton as triton_ops
    except ImportError as err:
        return None, f"triton is not installed ({err})"
    return triton_ops, ""


def _unusable(name: str, q: torch.Tensor, k: torch.Tensor, grad: bool) -> str:
    """Why backend ``name`` cannot run this call, or "" when it can."""
    if name == "reference":
        return ""
    if grad:
        return "inputs require grad and the kernels have no backward (the reference path is differentiable)"
    if name in ("cpp", "cuda") and q.dtype == torch.float64:
        return "it computes in float32; float64 runs on the reference path, in float64"
    if name == "cpp" and not (_ops.HAS_CPU_KERNELS and q.device.type == "cpu"):
        return f"it needs CPU tensors and the built extension ({_ops.extension_error() or 'loaded'})"
    if name == "cuda" and not (_ops.HAS_CUDA_KERNELS and q.device.type == "cuda"):
        return "it needs CUDA tensors and torch_cp._cuda (built when torch has CUDA)"
    if name == "triton":
        triton_ops, reason = _triton_ops()
        return triton_ops.unsupported_reason(q, k) if triton_ops is not None else reason
    return ""


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pick_backend(backend: Backend, q: torch.Tensor, k: torch.Tensor, grad: bool) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"attention: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _unusable(backend, q, k, grad)
        if reason:
            raise ValueError(f"attention: backend={backend!r} cannot run this call: {reason}")
        return backend
    for name in ("cuda", "triton") if q.device.type == "cuda" else ("cpp",):
        if not _unusable(name, q, k, grad):
            return name
    if grad:
        _warn_once(
            "torch_cp.attention: inputs require grad, so calls run on the differentiable pure-PyTorch "
            "reference (the kernels have no backward); wrap inference in torch.no_grad() to use them"
        )
    elif q.dtype == torch.float64 or q.device.type == "cuda":
        first = "cuda" if q.device.type == "cuda" else "cpp"
        _warn_once(
            f"torch_cp.attention: {q.dtype} q {tuple(q.shape)} on {q.device.type} runs on the pure-PyTorch "
            f"reference ({first}: {_unusable(first, q, k, grad)})"
        )
    return "reference"


# --- end of backend choice ---------------------------------------------------------------------------


def attention_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    is_causal: bool = False,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    num_splits: int = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention state of ``q`` over the local keys: ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])``.

    Arguments as in :func:`attention` (any GQA ratio; validated the same way), without communication;
    ``num_splits``: key splits of the kernels (0: automatic). ``out`` and ``lse`` are float32 (float64
    for float64 inputs, computed in float64); ``lse`` is the natural-log log-sum-exp of the scaled (and
    soft-capped) scores; rows with no visible key have ``out = 0``, ``lse = -inf``; NaN follows
    [Note: NaN in attention] in torch_cp/reference.py.
    """
    options = {
        "attn_mask": attn_mask, "scale": scale, "softcap": softcap, "is_causal": is_causal, "window": window,
        "kv_lens": kv_lens, "kv_pos": kv_pos, "q_pos": q_pos, "num_splits": num_splits,
    }  # fmt: skip
    check_state_args(q, k, v, options)
    return _state(q, k, v, options, backend)


def _state(q, k, v, options: dict, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_state on validated arguments."""
    scale = q.shape[-1] ** -0.5 if options["scale"] is None else float(options["scale"])
    softcap, window, attn_mask = float(options["softcap"] or 0.0), options["window"], options["attn_mask"]
    name = _pick_backend(backend, q, k, _needs_grad(q, k, v, attn_mask))
    positions = {n: options[n] for n in ("is_causal", "window", "kv_lens", "kv_pos", "q_pos")}
    if name == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return attention_reference(
            q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap, compute_dtype=compute, **positions
        )
    if (options["is_causal"] or window is not None) and options["q_pos"] is None:
        positions["q_pos"] = _default_q_pos(q.shape[0], q.shape[2], k.shape[2], options["kv_lens"],
                                            options["kv_pos"], q.device)  # fmt: skip
    triton_ops = _triton_ops()[0] if name == "triton" else None
    op = triton_ops.decode_attention if triton_ops is not None else _ops.decode_attention_op
    return op(
        q, k, v, positions["kv_lens"], positions["kv_pos"], positions["q_pos"], scale, softcap,
        options["is_causal"], -1 if window is None else int(window), int(options["num_splits"]), attn_mask,
    )  # fmt: skip


def _default_q_pos(batch, q_len, kv_len, kv_lens, kv_pos, device) -> torch.Tensor:
    """The queries are the last ``q_len`` positions (see [Note: key and query positions])."""
    lens = torch.full((batch,), kv_len, device=device) if kv_lens is None else kv_lens.long().clamp(0, kv_len)
    if kv_pos is None:
        return lens - q_len
    if kv_len == 0:
        return torch.full((batch,), -q_len, device=device)
    valid = torch.arange(kv_len, device=device)[None, :] < lens[:, None]
    return torch.where(valid, kv_pos.long(), -1).amax(dim=1) + 1 - q_len


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    softcap: float | None = None,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    merge: MergeMethod = "all_gather",
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention whose KV cache may be sharded along the sequence over ``group``.

    The call of :func:`torch.nn.functional.scaled_dot_product_attention`, plus keyword-only extras.

    Args:
        q: ``[B, Hq, Sq, D]`` queries (float32, float16, bfloat16; float64 runs on the reference path,
            in float64), ``D >= 1``.
        k, v: ``[B, Hkv, L, D]`` this rank's shard of the keys and values, dtype of ``q``;
            ``Hq % Hkv == 0`` (GQA/MQA need ``enable_gqa=True``, as in SDPA).
        attn_mask: bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Sq, L]``
            over the local keys, combined with ``is_causal``/``window``/``kv_lens`` (a key must pass
            all). Every backend takes it; a broadcast mask is never materialised, and tiles of keys that
            no query sees (False, or ``-inf`` in an additive mask) are skipped unread, so a static cache
            of ``Lmax`` slots holding ``L`` tokens costs ~``L``. ``-inf`` hides a key like False (a
            hidden NaN key never makes a row NaN).
        dropout_p: must be 0.0.
        is_causal: key position ``<=`` query position. Unlike SDPA (top-left aligned), the ``Sq``
            queries are the **last** ``Sq`` positions of the whole sequence, as in decoding.
        scale: score scale, a finite float; default ``1/sqrt(D)``.
        group: a ``torch.distributed`` process group over which ``k``/``v`` are sharded; the result is
            exact attention over all shards, identical on every rank. With ``is_causal`` or ``window``
            and no ``kv_pos``, the shards are taken as contiguous blocks in rank order. Every rank must
            pass the same shapes (but ``L``), dtype and options: one small all-gather checks it first
            and raises ValueError on every rank otherwise (see [Note: ranks agree on the call]).
        return_lse: also return the log-sum-exp.
        softcap: ``s -> softcap * tanh(s / softcap)`` on the scaled scores (Gemma-2 style); a finite
            float > 0, or None/0 for none.
        window: sliding window, an int >= 1: a query at position ``p`` sees keys at positions ``> p - window``.
        kv_lens: ``[B]`` int, valid local keys per batch row (variable lengths); default ``L``. Slots
            past it are never read (they may hold anything, NaN included).
        kv_pos: ``[B, L]`` int, global positions of the local keys (default: contiguous shards).
        q_pos: ``[B]`` int, global position of the first query (default: the last ``Sq`` positions of
            the whole sequence; with ``group``, finding it costs one small all-gather).
        merge: ``"all_gather"`` (default) or ``"all_reduce"``; see :mod:`torch_cp.distributed`.
        backend: ``"auto"`` (on CPU the C++ kernel; on CUDA the CUDA kernel, else Triton; the reference
            when no kernel applies), ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out [B, Hq, Sq, D]`` in ``q.dtype``; with ``return_lse=True`` also ``lse [B, Hq, Sq]`` float32
        (float64 for float64 inputs), **natural log**, ``-inf`` for a query that sees no key (whose
        ``out`` is 0). NaN propagates as in SDPA's math path: see [Note: NaN in attention] in
        torch_cp/reference.py.

    Autograd: when an input requires grad (and grad mode is on), the call runs on the differentiable
    pure-PyTorch reference (logged once); the kernels have no backward. Not supported with ``group``.

    Raises:
        TypeError/ValueError naming the argument for arguments it cannot take.
    """
    options = {
        "attn_mask": attn_mask, "scale": scale, "softcap": softcap, "is_causal": is_causal, "window": window,
        "kv_lens": kv_lens, "kv_pos": kv_pos, "q_pos": q_pos, "num_splits": 0,
    }  # fmt: skip
    _check_call(q, k, v, dropout_p, enable_gqa, return_lse, merge, options, group)
    if group is not None and _gathers_positions(options):
        lens = kv_lens if kv_lens is not None else torch.full((q.shape[0],), k.shape[2], device=q.device)
        global_pos, global_q_pos = gather_positions(lens, k.shape[2], q.shape[2], group)
        options["kv_pos"] = global_pos if kv_pos is None else kv_pos
        options["q_pos"] = global_q_pos if q_pos is None else q_pos
    out, lse = _state(q, k, v, options, backend)
    if group is not None:
        out, lse = merge_across_ranks(out, lse, group, merge)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _gathers_positions(options: dict) -> bool:
    """Whether a call with ``group`` all-gathers the shards' lengths to find the key positions."""
    masked = options["is_causal"] or options["window"] is not None
    return masked and (options["q_pos"] is None or options["kv_pos"] is None)


def _check_call(q, k, v, dropout_p, enable_gqa, return_lse, merge, options, group) -> None:
    """Validates the arguments; with ``group``, also that every rank made the same call.

    With a group, a rank whose own arguments are refused still takes part in the signature exchange
    (see [Note: ranks agree on the call] in torch_cp/distributed.py) before raising, so that its peers
    raise too instead of waiting in a collective.
    """
    try:
        check_attention_args(q, k, v, dropout_p, enable_gqa, return_lse, merge, options)
    except (TypeError, ValueError):
        if group is not None:
            with contextlib.suppress(ValueError):  # the peers raise; this rank raises its own error
                check_ranks_agree(invalid_signature(), group)
        raise
    if group is None:
        return
    grad = _needs_grad(q, k, v, options["attn_mask"])
    check_ranks_agree(call_signature(q, k, options, merge, _gathers_positions(options), grad), group)
    if grad:
        raise ValueError(
            "attention: inputs require grad, but the merge across ranks (group=...) has no backward; "
            "call it under torch.no_grad(), or without group"
        )

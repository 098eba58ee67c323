"""Pure-PyTorch references: the oracles the kernels are tested against."""

from __future__ import annotations

import torch

__all__ = ["attention_reference", "merge_states_reference", "visible_keys"]


def merge_states_reference(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of N partial attention states, computed in float64 (or float32 with float32 inputs).

    See [Note: merge of partial states] in csrc/cpu/merge_states.cpp.

    Args:
        out: ``[N, *rows, D]`` partial outputs, each normalised over its own keys.
        lse: ``[N, *rows]`` natural-log log-sum-exp of each part's scores; ``-inf`` for an empty part.

    Returns:
        ``(out [*rows, D]`` in ``out.dtype``, ``lse [*rows]``)``; lse is float64 when either input is
        float64 (the oracle's precision), float32 otherwise.
    """
    compute = torch.float64 if out.dtype == torch.float64 or lse.dtype == torch.float64 else torch.float32
    o, lse_c = out.to(compute), lse.to(compute)
    merged_lse = torch.logsumexp(lse_c, dim=0)
    finite = torch.isfinite(merged_lse)
    weight = torch.where(finite, torch.exp(lse_c - merged_lse), torch.zeros_like(lse_c))
    merged = (weight.unsqueeze(-1) * o).sum(dim=0)
    return merged.to(out.dtype), merged_lse


def visible_keys(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    is_causal: bool = False,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which keys each query may attend to: a bool ``[B, 1, Sq, L]`` mask.

    [Note: key and query positions]
    Key ``j`` of batch row ``b`` sits at global position ``kv_pos[b, j]`` (default ``j``) and is valid
    when ``j < kv_lens[b]`` (default ``L``). Query ``i`` sits at ``q_pos[b] + i``; by default the
    queries are the last ``Sq`` positions of the valid keys (``q_pos = max valid position + 1 - Sq``),
    which makes ``is_causal`` mean "bottom-right aligned", as in decoding. Causal: a key is visible
    when its position is ``<=`` the query's. Sliding window ``W``: visible when ``pos > q - W``.
    """
    j = torch.arange(kv_len, device=device)
    lens = torch.full((batch,), kv_len, device=device) if kv_lens is None else kv_lens.to(device).long()
    valid = j[None, :] < lens[:, None]  # [B, L]
    pos = j[None, :].expand(batch, kv_len) if kv_pos is None else kv_pos.to(device).long()
    if q_pos is None:
        last = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=1) if kv_len else lens * 0 - 1
        q_pos = last + 1 - q_len
    qp = q_pos.to(device).long()[:, None] + torch.arange(q_len, device=device)[None, :]  # [B, Sq]
    mask = valid[:, None, :].expand(batch, q_len, kv_len)
    if is_causal:
        mask = mask & (pos[:, None, :] <= qp[:, :, None])
    if window is not None:
        mask = mask & (pos[:, None, :] > qp[:, :, None] - window)
    return mask[:, None]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
    **positions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp, in ``compute_dtype`` (float64 by default): the test oracle.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, L, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Sq, L]``.
        scale: score scale, default ``1/sqrt(D)``. softcap: ``s -> softcap * tanh(s / softcap)``.
        positions: ``is_causal``, ``window``, ``kv_lens``, ``kv_pos``, ``q_pos`` of :func:`visible_keys`.

    Returns:
        ``out [B, Hq, Sq, D]`` and ``lse [B, Hq, Sq]`` (natural log), both in ``compute_dtype``.
        A query with no visible key gets ``out = 0`` and ``lse = -inf``.
    """
    b, hq, sq, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_keys(b, sq, kv_len, device=q.device, **positions)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(compute_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ vc, lse

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
        float64 (the oracle's precision), float32 otherwise. A row with a part whose lse is NaN or
        ``+inf``, or a NaN in the out of a non-empty part, is NaN; empty parts never contribute.
    """
    compute = torch.float64 if out.dtype == torch.float64 or lse.dtype == torch.float64 else torch.float32
    o, lse_c = out.to(compute), lse.to(compute)
    empty_part = lse_c == float("-inf")
    nan_row = (lse_c.isnan() | (lse_c == float("inf"))).any(dim=0)
    merged_lse = torch.logsumexp(lse_c.masked_fill(nan_row, 0.0), dim=0)
    finite = torch.isfinite(merged_lse)
    weight = torch.where(finite, torch.exp(lse_c - merged_lse.where(finite, 0.0)), 0.0)
    # an empty part adds nothing, whatever its out holds; a NaN in any other part stays (0 * NaN)
    merged = torch.where(empty_part.unsqueeze(-1), 0.0, weight.unsqueeze(-1) * o).sum(dim=0)
    merged = merged.masked_fill(nan_row.unsqueeze(-1), float("nan"))
    return merged.to(out.dtype), merged_lse.masked_fill(nan_row, float("nan"))


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
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Sq, L]``
            (added after softcap; ``-inf`` hides the key like False).
        scale: score scale, default ``1/sqrt(D)``. softcap: ``s -> softcap * tanh(s / softcap)``.
        positions: ``is_causal``, ``window``, ``kv_lens``, ``kv_pos``, ``q_pos`` of :func:`visible_keys`.

    Returns:
        ``out [B, Hq, Sq, D]`` and ``lse [B, Hq, Sq]`` (natural log), both in ``compute_dtype``.
        A query with no visible key gets ``out = 0`` and ``lse = -inf``; see [Note: NaN in attention]
        for NaN and infinite inputs. Differentiable (the path ``torch_cp.attention`` takes for autograd).

    [Note: NaN in attention]
    As in SDPA's math path: a NaN or ``+inf`` score (NaN in ``q`` or in a visible key, ``+inf`` in a
    key) makes its query row NaN, ``out`` and ``lse``; a NaN in a visible value makes that row's
    ``out`` NaN. A hidden key (False or ``-inf`` in ``attn_mask``, hidden by position, or past
    ``kv_lens``) never makes a row NaN, and slots past ``kv_lens`` are never read at all (a static
    cache's unused slots may hold anything). The value of a key inside ``kv_lens`` hidden by a mask
    has weight 0, and 0·NaN may still reach a row (as in SDPA's math path; the kernels differ there:
    they never read a tile of keys that no query sees). A row with no visible key is ``out = 0``,
    ``lse = -inf`` whatever the hidden values hold. Every backend follows this note, and the merges
    keep a NaN row NaN (see [Note: merge of partial states]).
    """
    b, hq, sq, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    visible = visible_keys(b, sq, kv_len, device=q.device, **positions)
    if positions.get("kv_lens") is not None:  # slots past kv_lens are never read
        in_cache = torch.arange(kv_len, device=q.device) < positions["kv_lens"].to(q.device)[:, None]
        vc = vc.masked_fill(~in_cache[:, None, :, None], 0.0)
    kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:  # -inf hides a key, as False does
        visible = visible & (attn_mask != float("-inf"))
        scores = scores + attn_mask.to(compute_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    return _softmax_values(scores, vc)


def _softmax_values(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(scores) @ v, logsumexp(scores))`` over the last axis, by [Note: NaN in attention].

    Rows of ``-inf`` only (no visible key) give ``out = 0``, ``lse = -inf``, and a finite gradient:
    their logsumexp is taken of zeros and then replaced.
    """
    empty = (scores == float("-inf")).all(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1)
    nan_row = lse.isnan() | (lse == float("inf"))
    lse = lse.masked_fill(empty, float("-inf")).masked_fill(nan_row, float("nan"))
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = (probs @ v).masked_fill(empty[..., None], 0.0)
    return out.masked_fill(nan_row[..., None], float("nan")), lse

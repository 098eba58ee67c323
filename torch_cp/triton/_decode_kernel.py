"""The Triton split-KV decode kernel: one program per (batch row, KV head, key split, row block).

[Note: Triton decode kernel]
A program owns one KV head ``h`` of batch row ``b`` and the contiguous slice of that row's valid keys
assigned to its split. Its query rows are the ``G = Hq / Hkv`` heads of the GQA group times the ``Sq``
queries, row ``r`` = head ``h·G + r // Sq``, query ``r % Sq``, so each key and value row is read from
memory once and used by the whole group (a further grid axis over row blocks only repeats the reads
when ``G·Sq`` exceeds the largest row block). Per tile of ``BLOCK_N`` keys it runs the online softmax:
scores ``S = q·kᵀ``, softcap and masks, a running max ``m`` and ``row_sum`` per row, and
``acc = acc·alpha + P·V``.

**Bases.** Inside the loop scores are kept in base 2 (multiplied by ``log2 e``) so that ``exp2`` is
the only transcendental; the stored ``lse`` is converted back to the natural log:
``lse = (m₂ + log2 row_sum) · ln 2``. Everything leaving the kernel is natural-log.

**Precision.** With ``LOWP_DOT`` (float16/bfloat16 caches) both products run on the tensor cores in
the cache's dtype with float32 accumulation: ``q·kᵀ`` is exact up to the accumulation, and P, which
would lose 8 (bfloat16) or 11 (float16) bits if merely cast, is split into ``P_hi + P_lo``, both in
the cache's dtype, so ``P·V = P_hi·V + P_lo·V`` keeps about 16 (22) bits. Otherwise (float32 caches)
operands are float32 and the products ``"ieee"`` (not TF32), for the 2e-6 bar. The Triton interpreter
multiplies the raw bit patterns of bfloat16 ``tl.dot`` operands (Triton 3.9), so under it bfloat16
takes the float32 path.

**Empty rows.** A row whose keys are all masked keeps ``m = -inf``; the max used for exponentials is
then replaced by 0 so that no ``-inf - (-inf)`` NaN appears, and the row is stored as ``out = 0``,
``lse = -inf``.

**NaN rows.** A NaN or ``+inf`` score of a visible key is counted per row and then treated as masked,
so the running max stays usable; a row that counted one is stored as ``out = NaN``, ``lse = NaN``
(see [Note: NaN in attention] in torch_cp/reference.py). A NaN value reaches ``acc`` through ``P·V``.

**Masks.** ``attn_mask`` is read through the strides of its expansion to ``[B, Hq, Sq, L]`` (0 on
broadcast dims): bool (uint8 here; 0 hides) or float32 (added to the scores, in base 2 like them;
``-inf`` hides). Which keys of a tile are visible is worked out before the tile's keys and values
are loaded, and a tile that no row sees is skipped unread (see [Note: skipping hidden tiles] in
csrc/cpu/decode_attention.cpp; the launch also trims each row's keys past the last one its mask
shows, so that a static cache's hidden tail gives no split any work).
"""

import triton
import triton.language as tl

__all__ = ["decode_split_kernel"]

# tl.constexpr(...), not an annotation: the compiler refuses `x: tl.constexpr = ...` (the interpreter took it)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    """tanh from one exp2, stable for any |x| (absolute error about 1e-7)."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))  # the tensor first: the interpreter needs it
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _key_range(lens_ptr, b, kv_len, split, n_splits, HAS_LENS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[start, end)`` of this split: the row's valid keys cut into tile-aligned chunks."""
    length = kv_len
    if HAS_LENS:
        length = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), kv_len)
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(length, start + chunk)


@triton.jit
def _tile_visible(offs_n, end, row_ok, kpos_base, qp, window,
                  HAS_POS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """``[BLOCK_R, BLOCK_N]``: which keys of the tile each row sees by position (and ``kv_lens``)."""
    visible = (offs_n < end)[None, :] & row_ok[:, None]
    if CAUSAL or WINDOW:
        kp = offs_n.to(tl.int64)
        if HAS_POS:
            kp = tl.load(kpos_base + offs_n, mask=offs_n < end, other=0).to(tl.int64)
        if CAUSAL:
            visible = visible & (kp[None, :] <= qp[:, None])
        if WINDOW:
            visible = visible & (kp[None, :] > qp[:, None] - window)
    return visible


@triton.jit
def _tile_scores(q, k, qk_scale, cap2, SOFTCAP: tl.constexpr, LOWP_DOT: tl.constexpr):
    """Base-2 scores ``[BLOCK_R, BLOCK_N]`` of one tile (softcapped), before any mask."""
    if LOWP_DOT:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
    if SOFTCAP:
        s = cap2 * _tanh(s)
    return s


@triton.jit
def _accumulate_pv(p, v, acc, LOWP_DOT: tl.constexpr):
    """``acc + P·V`` for float32 ``P [BLOCK_R, BLOCK_N]``; see **Precision** in the note."""
    if LOWP_DOT:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        return tl.dot(p_lo, v, tl.dot(p_hi, v, acc))
    return tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, kpos_ptr, qpos_ptr, mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_pb, stride_mb, stride_mh, stride_ms, stride_ml,
    kv_heads, group, q_len, kv_len, dim, rows_total, qk_scale, cap2, window,
    HAS_LENS: tl.constexpr, HAS_POS: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partial attention of one split: ``out [S, B·Hq·Sq, D]`` float32 and ``lse [S, B·Hq·Sq]`` float32.

    ``qk_scale`` is ``scale·log2 e`` without softcap and ``scale / softcap`` with it; ``cap2`` is
    ``softcap·log2 e``. See [Note: Triton decode kernel].
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    b, h = pid_bh // kv_heads, pid_bh % kv_heads
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = offs_r < group * q_len, offs_d < dim
    head, qi = h * group + offs_r // q_len, offs_r % q_len
    q_rows = q_ptr + b * stride_qb + head * stride_qh + qi * stride_qs
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not LOWP_DOT:
        q = q.to(tl.float32)
    qp = qi.to(tl.int64)
    if CAUSAL or WINDOW:
        qp += tl.load(qpos_ptr + b).to(tl.int64)
    mask_rows = mask_ptr + b * stride_mb + head.to(tl.int64) * stride_mh + qi.to(tl.int64) * stride_ms
    start, end = _key_range(lens_ptr, b, kv_len, split, n_splits, HAS_LENS, BLOCK_N)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    nan_count = tl.zeros([BLOCK_R], tl.int32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        visible = _tile_visible(
            offs_n, end, row_ok, kpos_ptr + b * stride_pb, qp, window, HAS_POS, CAUSAL, WINDOW
        )
        if HAS_MASK:
            mask = tl.load(
                mask_rows[:, None] + offs_n.to(tl.int64)[None, :] * stride_ml, mask=visible, other=0
            )
            visible = visible & (mask != 0) if MASK_BOOL else visible & (mask != float("-inf"))
        if tl.max(visible.to(tl.int32)) > 0:  # a tile no row sees is never read (see **Masks**)
            kv_mask = (offs_n < end)[:, None] & d_ok[None, :]
            key_off = offs_n.to(tl.int64)[:, None]
            k = tl.load(k_base + key_off * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + key_off * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _tile_scores(q, k, qk_scale, cap2, SOFTCAP, LOWP_DOT)
            if HAS_MASK and not MASK_BOOL:
                s = s + mask * LOG2E
            s = tl.where(visible, s, float("-inf"))
            bad = (s != s) | (s == float("inf"))
            nan_count += tl.sum(bad.to(tl.int32), axis=1)
            s = tl.where(bad, float("-inf"), s)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = _accumulate_pv(p, v, acc * alpha[:, None], LOWP_DOT)
            m = m_new
    empty = m == float("-inf")
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, row_sum)[:, None])
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, row_sum))) * LN2)
    nan_row = nan_count > 0
    out = tl.where(nan_row[:, None], float("nan"), out)
    lse = tl.where(nan_row, float("nan"), lse)
    row = (b * kv_heads + h) * group * q_len + offs_r
    part = split.to(tl.int64) * rows_total
    tl.store(
        out_ptr + (part + row)[:, None] * dim + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :]
    )
    tl.store(lse_ptr + part + row, lse, mask=row_ok)

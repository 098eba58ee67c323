"""The Triton merge kernel: the exact merge of N partial attention states over disjoint key sets.

See [Note: merge of partial states] in csrc/cpu/merge.h. With ``m = max_n lse_n`` (natural log),
``lse = m + log Σ_n exp(lse_n - m)`` and ``out = Σ_n exp(lse_n - lse)·out_n``. Parts with
``lse_n = -inf`` are skipped (their out is never used); a row whose parts are all empty gives
``out = 0``, ``lse = -inf``. A part with ``lse_n`` NaN or ``+inf``, or a NaN in the out of a
non-empty part, makes the row NaN.
Natural ``exp``/``log`` here (``tl.exp``/``tl.log``), never base 2: the inputs are natural-log.
"""

import triton
import triton.language as tl

__all__ = ["merge_kernel"]


@triton.jit
def merge_kernel(out_ptr, lse_ptr, res_ptr, res_lse_ptr, n_parts, rows, dim,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Merges ``out [N, M, D]`` / ``lse [N, M]`` (float32 lse) into ``res [M, D]`` / ``res_lse [M]``.

    One program per block of ``BLOCK_M`` rows; ``out`` and ``res`` are contiguous. Accumulates in
    float32 and stores in the dtype of ``res``.
    """
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    tile_ok = row_ok[:, None] & (offs_d < dim)[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    nan_count = tl.zeros([BLOCK_M], tl.int32)
    for n in range(n_parts):
        x = tl.load(lse_ptr + n * rows + offs_m, mask=row_ok, other=float("-inf"))
        bad = (x != x) | (x == float("inf"))
        nan_count += bad.to(tl.int32)
        m = tl.maximum(m, tl.where(bad, float("-inf"), x))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(n_parts):
        x = tl.load(lse_ptr + n * rows + offs_m, mask=row_ok, other=float("-inf"))
        w = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_safe))
        part = tl.load(
            out_ptr + (n * rows + offs_m)[:, None] * dim + offs_d[None, :], mask=tile_ok, other=0.0
        )
        acc += tl.where((x != float("-inf"))[:, None], w[:, None] * part.to(tl.float32), 0.0)
        total += tl.where(x == x, w, 0.0)
    empty = total == 0
    res = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    res_lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
    nan_row = nan_count > 0
    res = tl.where(nan_row[:, None], float("nan"), res)
    res_lse = tl.where(nan_row, float("nan"), res_lse)
    tl.store(
        res_ptr + offs_m[:, None] * dim + offs_d[None, :], res.to(res_ptr.dtype.element_ty), mask=tile_ok
    )
    tl.store(res_lse_ptr + offs_m, res_lse, mask=row_ok)

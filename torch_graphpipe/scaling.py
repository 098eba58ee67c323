"""Operator costs at another micro-batch size, from costs profiled at one or two sizes.

[Note: memory-aware micro-batching]
``plan(..., num_microbatches="auto")`` chooses the micro-batch count ``M`` (a divisor of the batch, at
most four per stage) together with the partition: for each ``M`` it plans with the costs of a
micro-batch of ``batch / M`` samples and keeps the plan whose simulated step is fastest among those
that fit ``memory_budget_bytes``, the larger micro-batch when two are within ``CostTable.tolerance``. Larger micro-batches use a device better
but a stage holds up to ``min(M, depth)`` of them; GraphPipe's stages hold fewer than a chain's, so the
same memory admits larger ones. The costs come from two profiles, at the smallest and the largest
candidate size: times are interpolated affinely in the micro-batch size (a per-call overhead plus
per-sample work), bytes of activations scaled in proportion (parameters do not scale).
"""

from __future__ import annotations

import dataclasses

from torch_graphpipe.profile import CostTable, OpCost

__all__ = ["costs_at", "microbatch_candidates"]


def microbatch_candidates(batch: int, num_stages: int) -> list[int]:
    """Micro-batch counts to try: the divisors of ``batch`` up to ``4 * num_stages``, ascending."""
    if batch < 1:
        raise ValueError(f"the batch must have at least one sample, got {batch}")
    return [m for m in range(1, min(batch, 4 * num_stages) + 1) if batch % m == 0]


def costs_at(low: CostTable, high: CostTable, size: int) -> CostTable:
    """Costs of a micro-batch of ``size`` samples from profiles ``low`` and ``high`` (by their
    ``microbatch_size``; the same table twice scales in proportion); see [Note: memory-aware
    micro-batching]."""
    a, b = low.microbatch_size, high.microbatch_size
    ops = {}
    for name, lo in low.ops.items():
        hi = high.ops.get(name, lo)
        ops[name] = _at(lo, hi, a, b, size)
    return dataclasses.replace(low, ops=ops, microbatch_size=size)


def _at(lo: OpCost, hi: OpCost, a: int, b: int, size: int) -> OpCost:
    def time(x: float, y: float) -> float:
        if a == b:
            return x * size / a
        return max(0.0, x + (y - x) * (size - a) / (b - a))

    fwd, bwd = time(lo.fwd_ms, hi.fwd_ms), time(lo.bwd_ms, hi.bwd_ms)
    return dataclasses.replace(
        lo,
        fwd_ms=fwd,
        bwd_ms=bwd,
        fwd_spread_ms=lo.fwd_spread_ms * fwd / lo.fwd_ms if lo.fwd_ms > 0 else lo.fwd_spread_ms,
        bwd_spread_ms=lo.bwd_spread_ms * bwd / lo.bwd_ms if lo.bwd_ms > 0 else lo.bwd_spread_ms,
        wgt_ms=min(bwd, time(lo.wgt_ms, hi.wgt_ms)),
        out_bytes=round(lo.out_bytes * size / a),
        temp_bytes=round(lo.temp_bytes * size / a),
    )

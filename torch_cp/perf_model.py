"""Analytical model of per-token decode latency and memory for tensor, pipeline and cache parallelism.

[Note: decode cost model]
Decoding one token is memory-bound: each layer reads its weights and its whole KV cache once.
With ``P`` ranks and sustained bandwidth ``eta * BW`` per rank:

* attention of one layer under cache parallelism (the cache sharded along the sequence):
  ``T(P, L) = max(t0, B*L*2*Hkv*D*s / (P*eta*BW)) + [P > 1] * t_merge(P)``,
  ``t_merge(P) = alpha * ceil(log2 P) + B*Hq*(D+1)*4 * (P-1)/P / link_bw`` (all-gather of ``out || lse``).
  It beats one rank once the per-layer cache bytes exceed ``eta*BW*t_merge*P/(P-1)``.
* tensor parallelism splits heads: the KV read per rank shrinks by ``min(P, Hkv)`` only (no gain
  beyond the number of KV heads), weights by ``P``; two all-reduces of the hidden state per layer.
* pipeline parallelism splits layers: memory per rank shrinks by ``P`` but one token still walks
  through every layer in turn, so per-token latency does not improve (and gains ``P-1`` hops).
* cache parallelism replicates the weights (each rank reads all of them) and splits the cache.

All times are seconds, sizes bytes, bandwidths bytes/second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "HARDWARE",
    "MODELS",
    "Estimate",
    "Hardware",
    "ModelShape",
    "attention_time",
    "break_even_context",
    "decode_step",
    "merge_time",
]

Scheme = Literal["tensor", "pipeline", "cache"]


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    mem_bw: float  # peak memory bandwidth per rank, bytes/s
    mem_capacity: float  # memory per rank, bytes
    efficiency: float = 0.85  # eta: sustained fraction of mem_bw a good decode kernel reaches
    link_bw: float  # interconnect bandwidth per rank, bytes/s
    collective_latency: float  # alpha: latency of one collective step, s
    launch_floor: float = 5e-6  # t0: the shortest time one kernel takes, s

    def __post_init__(self) -> None:
        for field in ("mem_bw", "mem_capacity", "link_bw", "collective_latency"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Hardware.{field} must be positive, got {getattr(self, field)}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"Hardware.efficiency must be in (0, 1], got {self.efficiency}")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int  # MLP width (gated MLP: 3 matrices)
    bytes_per_element: int = 2  # bf16

    @property
    def weight_bytes_per_layer(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)
        return (attn + 3 * self.hidden * self.intermediate) * self.bytes_per_element

    def kv_bytes_per_layer(self, context_len: int, batch: int) -> int:
        return batch * context_len * 2 * self.kv_heads * self.head_dim * self.bytes_per_element


HARDWARE = {
    "h100": Hardware(name="h100", mem_bw=3.35e12, mem_capacity=80e9, link_bw=450e9, collective_latency=8e-6),
    "h200": Hardware(name="h200", mem_bw=4.8e12, mem_capacity=141e9, link_bw=450e9, collective_latency=8e-6),
    # The project's 2-core test machine, gloo over loopback, as measured by benchmarks/bench_cp.py
    # (Dec 2026, an Intel Xeon with AVX-512): one core reads ~12-13 GB/s, the C++ kernel on one core
    # ~83% of that (26.6 ms at 32K tokens, Hq 32, Hkv 8, D 128, fp32), and an all-gather of a few KB
    # between 2 processes takes ~0.2-0.5 ms. (The AMD EPYC it replaced read ~37 GB/s per core, and the
    # kernel, compute-bound there, reached ~45% of it.)
    "cpu": Hardware(
        name="cpu",
        mem_bw=12.5e9,
        mem_capacity=24e9,
        efficiency=0.83,
        link_bw=5e9,
        collective_latency=200e-6,
        launch_floor=2e-6,
    ),
}

MODELS = {
    "llama3-8b": ModelShape(
        name="llama3-8b", layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336
    ),
    "llama3-70b": ModelShape(
        name="llama3-70b", layers=80, q_heads=64, kv_heads=8, head_dim=128, hidden=8192, intermediate=28672
    ),
}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def merge_time(shape: ModelShape, hw: Hardware, *, batch: int, ranks: int) -> float:
    """Time of one all-gather merge of ``(out || lse)`` in float32 over ``ranks`` ranks, per layer."""
    if ranks == 1:
        return 0.0
    payload = batch * shape.q_heads * (shape.head_dim + 1) * 4
    return hw.collective_latency * math.ceil(math.log2(ranks)) + payload * (ranks - 1) / ranks / hw.link_bw


def attention_time(shape: ModelShape, hw: Hardware, *, context_len: int, batch: int, ranks: int) -> float:
    """Per-layer decode attention time under cache parallelism (see [Note: decode cost model])."""
    _check_positive(context_len=context_len, batch=batch, ranks=ranks)
    read = shape.kv_bytes_per_layer(context_len, batch) / (ranks * hw.efficiency * hw.mem_bw)
    return max(hw.launch_floor, read) + merge_time(shape, hw, batch=batch, ranks=ranks)


def break_even_context(shape: ModelShape, hw: Hardware, *, batch: int, ranks: int) -> int:
    """Smallest context length at which attention over ``ranks`` ranks beats one rank."""
    _check_positive(batch=batch, ranks=ranks)
    if ranks == 1:
        raise ValueError("ranks must be > 1 to break even against one rank")
    lo, hi = 1, 1
    while attention_time(shape, hw, context_len=hi, batch=batch, ranks=ranks) >= attention_time(
        shape, hw, context_len=hi, batch=batch, ranks=1
    ):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            raise ValueError("cache parallelism never breaks even under these parameters")
    while lo < hi:
        mid = (lo + hi) // 2
        one = attention_time(shape, hw, context_len=mid, batch=batch, ranks=1)
        lo, hi = (
            (lo, mid)
            if attention_time(shape, hw, context_len=mid, batch=batch, ranks=ranks) < one
            else (mid + 1, hi)
        )
    return lo


@dataclass(frozen=True, kw_only=True)
class Estimate:
    scheme: Scheme
    ranks: int
    latency_s: float  # one decode step of the whole model
    memory_per_rank: float  # weights + KV cache, bytes
    fits: bool  # memory_per_rank <= the hardware's capacity


def _allreduce_time(hw: Hardware, nbytes: float, ranks: int) -> float:
    return hw.collective_latency * math.ceil(math.log2(ranks)) + 2 * nbytes * (ranks - 1) / ranks / hw.link_bw


def decode_step(
    shape: ModelShape, hw: Hardware, *, context_len: int, batch: int, ranks: int, scheme: Scheme
) -> Estimate:
    """Latency of one decode step and memory per rank of the whole model under ``scheme``."""
    _check_positive(context_len=context_len, batch=batch, ranks=ranks)
    bw = hw.efficiency * hw.mem_bw
    weights, kv = shape.weight_bytes_per_layer, shape.kv_bytes_per_layer(context_len, batch)
    if scheme == "tensor":
        kv_rank, w_rank = kv / min(ranks, shape.kv_heads), weights / ranks
        comm = (
            2 * _allreduce_time(hw, batch * shape.hidden * shape.bytes_per_element, ranks)
            if ranks > 1
            else 0.0
        )
        per_layer, layers_rank = max(hw.launch_floor, (w_rank + kv_rank) / bw) + comm, shape.layers
        latency = per_layer * shape.layers
    elif scheme == "pipeline":
        kv_rank, w_rank, layers_rank = kv, weights, math.ceil(shape.layers / ranks)
        hop = hw.collective_latency + batch * shape.hidden * shape.bytes_per_element / hw.link_bw
        latency = max(hw.launch_floor, (weights + kv) / bw) * shape.layers + (ranks - 1) * hop
    elif scheme == "cache":
        kv_rank, w_rank, layers_rank = kv / ranks, weights, shape.layers
        per_layer = max(hw.launch_floor, weights / bw) + attention_time(
            shape, hw, context_len=context_len, batch=batch, ranks=ranks
        )
        latency = per_layer * shape.layers
    else:
        raise ValueError(f"scheme must be 'tensor', 'pipeline' or 'cache', got {scheme!r}")
    memory = (w_rank + kv_rank) * layers_rank
    return Estimate(
        scheme=scheme, ranks=ranks, latency_s=latency, memory_per_rank=memory, fits=memory <= hw.mem_capacity
    )

"""Cost of a candidate stage (a set of operators) for one micro-batch.

[Note: stage cost model]
A stage's time per micro-batch is its operators' forward + backward time plus the communication it
waits for: one message per outside producer it reads (forward activation in) and one per own
operator read outside (gradient in), each ``CommModel.time_ms(bytes)``. A producer read by several
operators of a stage is received once. Model inputs are available to every stage and the loss is
computed where an output is produced, so neither costs communication. Memory is the parameters times
``param_copies`` plus, per micro-batch in flight, the outputs of its operators and the inputs it
received (kept for backward).

The weight-gradient part ``wgt_ms`` of a stage's backward (the ``W`` of a zero-bubble schedule, see
[Note: zero-bubble DAG schedule]) is its operators' ``OpCost.wgt_ms`` where the operator depends on a
received value, and the whole backward of the operators that do not: the input-gradient pass ``B``
never reaches those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch_graphpipe.graph import OpGraph, mask_of, members
from torch_graphpipe.profile import CostTable

__all__ = ["StageCost", "StageCostModel"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageCost:
    """Cost of one stage for one micro-batch; see [Note: stage cost model]."""

    fwd_ms: float  # forward compute, milliseconds
    bwd_ms: float  # backward compute, milliseconds
    comm_ms: float  # receive time of activations and gradients, milliseconds
    param_bytes: int  # parameter bytes held
    act_bytes: int  # activation bytes kept per micro-batch in flight
    wgt_ms: float = 0.0  # the part of bwd_ms a zero-bubble schedule runs as W (see [Note: stage cost model])

    @property
    def time_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms + self.comm_ms

    def memory_bytes(self, in_flight: int, param_copies: float) -> float:
        return self.param_bytes * param_copies + in_flight * self.act_bytes


class StageCostModel:
    """Per-node cost arrays of a graph, for fast costs of node sets."""

    def __init__(self, graph: OpGraph, costs: CostTable) -> None:
        costs.check_covers(graph)
        self.graph = graph
        self.param_copies = costs.param_copies
        ops = [costs.of(n.name) for n in graph.nodes]
        self.fwd = [c.fwd_ms for c in ops]
        self.bwd = [c.bwd_ms for c in ops]
        self.wgt = [c.wgt_ms for c in ops]
        self.out_bytes = [c.out_bytes for c in ops]
        self.params = [c.param_bytes for c in ops]
        self.msg = [costs.comm.time_ms(c.out_bytes) for c in ops]
        self.pred_mask = [mask_of(p) for p in graph.preds]
        self.succ_mask = [mask_of(s) for s in graph.succs]

    def of_mask(self, mask: int) -> StageCost:
        """Cost of the stage made of the nodes in ``mask``."""
        return self.runs([mask])[0]

    def runs(self, parts: Sequence[int]) -> list[StageCost]:
        """Costs of ``parts[0]``, ``parts[0] | parts[1]``, ... (each part after the previous ones)."""
        out: list[StageCost] = []
        inside = ext = sending = dependent = 0
        fwd = bwd = wgt = 0.0
        params = own_bytes = 0
        for part in parts:
            inside |= part
            for v in members(part):  # topological order: a node's predecessors in the stage come first
                fwd += self.fwd[v]
                bwd += self.bwd[v]
                params += self.params[v]
                own_bytes += self.out_bytes[v]
                ext |= self.pred_mask[v]
                if self.pred_mask[v] & (~inside | dependent):
                    dependent |= 1 << v
                    wgt += self.wgt[v]
                else:
                    wgt += self.bwd[v]
            ext &= ~inside
            sending = self._still_sending(sending | part, inside)
            recv = members(ext)
            comm = sum(self.msg[p] for p in recv) + sum(self.msg[p] for p in members(sending))
            act = own_bytes + sum(self.out_bytes[p] for p in recv)
            out.append(
                StageCost(fwd_ms=fwd, bwd_ms=bwd, comm_ms=comm, param_bytes=params, act_bytes=act, wgt_ms=wgt)
            )
        return out

    def _still_sending(self, candidates: int, inside: int) -> int:
        return mask_of(v for v in members(candidates) if self.succ_mask[v] & ~inside)

    def compute_ms(self, mask: int) -> float:
        """Forward + backward time of the nodes in ``mask``, without communication."""
        return sum(self.fwd[v] + self.bwd[v] for v in members(mask))

"""Cost of a candidate stage (a set of operators) for one micro-batch.

[Note: stage cost model]
A stage's time per micro-batch is its operators' forward + backward time plus the communication it
waits for: one message per outside producer it reads (forward activation in) and one per own
operator read outside (gradient in), each ``CommModel.time_ms(bytes)``. A producer read by several
operators of a stage is received once. Model inputs are available to every stage and the loss is
computed where an output is produced, so neither costs communication. Memory is the parameters times
``param_copies`` plus, per micro-batch in flight, the activations it holds (see [Note: held
activations]).

[Note: held activations]
A stage holds, per micro-batch in flight, every value it received (the runtime keeps them until their
gradients go back), the values it sends and the model outputs it computes (kept until their backward),
and what its operators save for backward: profiling records, per operator, which operators' outputs
it saves (``OpCost.saves``, through ``torch.autograd.graph.saved_tensors_hooks``) and the bytes of
what else it saves (``temp_bytes``). Values are counted once per storage: a view (``alias_of``)
counts as the value it views, and a view of a received value as nothing more. Weights and model
inputs (held for the whole step, not per micro-batch) are not activations. An operator whose savings
are unknown (a cost table built by hand) counts its whole output. The runtime measures the same
quantity on a real step (see [Note: measured memory] in torch_graphpipe/memory.py).

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
        index = {n.name: i for i, n in enumerate(graph.nodes)}
        self.temp = [c.temp_bytes for c in ops]
        self.saves = [mask_of(index[x] for x in c.saves or () if x in index) for c in ops]
        self.always_held = mask_of(
            v for v, (n, c) in enumerate(zip(graph.nodes, ops)) if n.is_output or c.saves is None
        )
        self.base = [v if c.alias_of is None else index.get(c.alias_of, -1) for v, c in enumerate(ops)]
        self.aliased = mask_of(v for v, b in enumerate(self.base) if b != v)

    def of_mask(self, mask: int) -> StageCost:
        """Cost of the stage made of the nodes in ``mask``."""
        return self.runs([mask])[0]

    def runs(self, parts: Sequence[int]) -> list[StageCost]:
        """Costs of ``parts[0]``, ``parts[0] | parts[1]``, ... (each part after the previous ones)."""
        out: list[StageCost] = []
        inside = ext = sending = dependent = saved = held = counted = 0
        fwd = bwd = wgt = 0.0
        params = held_bytes = 0
        for part in parts:
            inside |= part
            for v in members(part):  # topological order: a node's predecessors in the stage come first
                fwd += self.fwd[v]
                bwd += self.bwd[v]
                params += self.params[v]
                held_bytes += self.temp[v]
                saved |= self.saves[v]
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
            now = (saved | self.always_held) & inside  # see [Note: held activations]
            for v in members(now & ~held):
                b = self.base[v]
                if b >= 0 and inside >> b & 1 and not counted >> b & 1:
                    counted |= 1 << b
                    held_bytes += self.out_bytes[b]
            held = now
            extra = sum(self.out_bytes[b] for b in members(sending & ~counted & ~self.aliased))
            views = {self.base[v] for v in members(sending & self.aliased)} - {-1}
            extra += sum(
                self.out_bytes[b]
                for b in views
                if inside >> b & 1 and not counted >> b & 1 and not sending >> b & 1
            )
            act = held_bytes + extra + sum(self.out_bytes[p] for p in recv)
            out.append(
                StageCost(fwd_ms=fwd, bwd_ms=bwd, comm_ms=comm, param_bytes=params, act_bytes=act, wgt_ms=wgt)
            )
        return out

    def held_extra(self, mask: int, values: int) -> int:
        """Bytes per micro-batch that holding the ``values`` (nodes of ``mask``) adds to the stage's held
        activations: those not held already (see [Note: held activations])."""
        held = (mask_of(v for u in members(mask) for v in members(self.saves[u])) | self.always_held) & mask
        held |= self._still_sending(mask, mask)
        counted = {self.base[v] for v in members(held)}
        extra = {self.base[v] for v in members(values)} - counted - {-1}
        return sum(self.out_bytes[b] for b in extra if mask >> b & 1)

    def _still_sending(self, candidates: int, inside: int) -> int:
        return mask_of(v for v in members(candidates) if self.succ_mask[v] & ~inside)

    def compute_ms(self, mask: int) -> float:
        """Forward + backward time of the nodes in ``mask``, without communication."""
        return sum(self.fwd[v] + self.bwd[v] for v in members(mask))

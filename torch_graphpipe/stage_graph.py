"""The stage DAG of a partition: stages in topological order, edges, costs and in-flight counts.

[Note: output edges]
The model output is assembled, and the loss computed, on one stage: the highest stage producing any
output. Every other stage producing an output sends it there, so a DAG's stage edges are the data
edges between operators plus an edge from each such stage to the loss stage. They are part of the
plan from the start: the schedule is built once on these edges, simulated, validated and executed
as is (the runtime's routing finds exactly these edges; see [Note: routing]). The loss stage may be
split at such an edge (see [Note: late inputs]): it runs its own operators before the other outputs
arrive. The DAG search (torch_graphpipe/partition.py) counts in-flight micro-batches on the data
edges only, so an output stage can hold one more than it predicted; the planner checks the memory
budget again on the full stage graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch_graphpipe.graph import OpGraph, members
from torch_graphpipe.stable import TIE
from torch_graphpipe.stage_cost import StageCost, StageCostModel

__all__ = [
    "LateSplit",
    "StageGraph",
    "build_stage_graph",
    "late_splits",
    "longest_path_depths",
    "loss_stage",
    "output_nodes",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageGraph:
    """Stages (node bitsets) in topological order and the edges between them."""

    stages: tuple[int, ...]  # node bitsets, topological order of the stage DAG
    edges: tuple[tuple[int, int], ...]  # (producer stage, consumer stage), sorted
    edge_bytes: tuple[int, ...]  # bytes per micro-batch sent on each edge (activation; gradient alike)
    costs: tuple[StageCost, ...]  # per stage, per micro-batch
    in_flight: tuple[int, ...]  # stages on the longest path from each stage to a sink


def output_nodes(graph: OpGraph) -> list[int]:
    """Indices of the nodes whose values are (part of) the model output."""
    return [v for v, n in enumerate(graph.nodes) if n.is_output]


def loss_stage(graph: OpGraph, owner: dict[int, int]) -> int:
    """The stage that assembles the model output and computes the loss: the highest stage producing
    any output (``owner`` maps node index to stage); see [Note: output edges]."""
    return max((owner[v] for v in output_nodes(graph)), default=max(owner.values()))


def longest_path_depths(num_stages: int, edges: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Stages on the longest path from each stage to a sink (1 for a sink); stages in topo order."""
    depth = [1] * num_stages
    for src, dst in sorted(edges, key=lambda e: -e[0]):
        assert src < dst, f"edge {(src, dst)} is not in topological order"
        depth[src] = max(depth[src], depth[dst] + 1)
    return tuple(depth)


def build_stage_graph(
    graph: OpGraph,
    model: StageCostModel,
    masks: Sequence[int],
    *,
    chain: bool = False,
    output_edges: bool = True,
) -> StageGraph:
    """Stage DAG of ``masks``; with ``chain`` the masks are in order and edges link neighbours only.

    Without ``output_edges`` a DAG has the data edges only: the DAG search's model (see [Note: output
    edges])."""
    for mask in masks:
        assert mask and graph.is_convex(mask), f"stage {members(mask)} is not convex"
    assert sum(bin(m).count("1") for m in masks) == len(graph), "stages must cover every node once"
    if chain:
        return _chain_graph(graph, model, list(masks))
    ordered = _topological(graph, list(masks))
    owner = {v: s for s, m in enumerate(ordered) for v in members(m)}
    sent: dict[tuple[int, int], set[int]] = {}
    for v, preds in enumerate(graph.preds):
        for p in preds:
            if owner[p] != owner[v]:
                sent.setdefault((owner[p], owner[v]), set()).add(p)
    loss = loss_stage(graph, owner)
    for v in output_nodes(graph) if output_edges else ():  # see [Note: output edges]
        if owner[v] != loss:
            sent.setdefault((owner[v], loss), set()).add(v)
    edges = tuple(sorted(sent))
    edge_bytes = tuple(sum(model.out_bytes[p] for p in sent[e]) for e in edges)
    return StageGraph(
        stages=tuple(ordered),
        edges=edges,
        edge_bytes=edge_bytes,
        costs=tuple(model.of_mask(m) for m in ordered),
        in_flight=longest_path_depths(len(ordered), edges),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LateSplit:
    """A stage split at a late predecessor; see [Note: late inputs] in torch_graphpipe/schedule.py."""

    stage: int  # the split stage
    pred: int  # its late predecessor stage
    late_mask: int  # the stage's operators that depend (within the stage) on that predecessor's values


def late_splits(
    graph: OpGraph, model: StageCostModel, stages: Sequence[int], margin: float = 0.0
) -> tuple[LateSplit, ...]:
    """For every stage with two or more predecessors, the predecessor whose values the cheapest part of
    the stage depends on (the highest-numbered among those within ``margin``, relative, of the
    costliest early part; see [Note: plans that reproduce] in torch_graphpipe/stable.py), when the rest
    of the stage costs something. The loss stage's predecessors include the stages sending it outputs
    (see [Note: output edges]); no operator reads those, so such a split's late part only assembles the
    output for the loss."""
    owner = {v: s for s, m in enumerate(stages) for v in members(m)}
    loss = loss_stage(graph, owner)
    out = []
    for s, mask in enumerate(stages):
        producers = {owner[p] for v in members(mask) for p in graph.preds[v]}
        if s == loss:
            producers |= {owner[v] for v in output_nodes(graph)}
        preds = sorted(producers - {s})
        options: list[tuple[float, int, int]] = []
        for pred in preds if len(preds) > 1 else ():
            late = 0
            for v in members(mask):
                if any(owner[p] == pred for p in graph.preds[v]) or model.pred_mask[v] & late:
                    late |= 1 << v
            early_ms = model.compute_ms(mask & ~late)
            if early_ms > 0:
                options.append((early_ms, pred, late))
        if options:
            floor = max(o[0] for o in options) * (1 - max(margin, TIE))
            _, pred, late = max((o for o in options if o[0] >= floor), key=lambda o: o[1])
            out.append(LateSplit(stage=s, pred=pred, late_mask=late))
    return tuple(out)


def _topological(graph: OpGraph, masks: list[int]) -> list[int]:
    owner = {v: s for s, m in enumerate(masks) for v in members(m)}
    succ: dict[int, set[int]] = {s: set() for s in range(len(masks))}
    indegree = [0] * len(masks)
    for v, preds in enumerate(graph.preds):
        for p in preds:
            a, b = owner[p], owner[v]
            if a != b and b not in succ[a]:
                succ[a].add(b)
                indegree[b] += 1
    ready = sorted((s for s in range(len(masks)) if indegree[s] == 0), key=lambda s: masks[s] & -masks[s])
    order: list[int] = []
    while ready:
        s = ready.pop(0)
        order.append(s)
        for t in succ[s]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
        ready.sort(key=lambda s: masks[s] & -masks[s])
    assert len(order) == len(masks), "the stages form a cycle"
    return [masks[s] for s in order]


def _chain_held(model: StageCostModel, mask: int, incoming: list[int]) -> int:
    """Held bytes per micro-batch of a chain stage (see [Note: held activations]): as in the DAG, plus
    the values it receives only to pass them on."""
    consumed = {p for v in members(mask) for p in members(model.pred_mask[v] & ~mask)}
    return model.of_mask(mask).act_bytes + sum(model.out_bytes[p] for p in incoming if p not in consumed)


def _chain_graph(graph: OpGraph, model: StageCostModel, masks: list[int]) -> StageGraph:
    """Stages linked as a chain: everything crossing a cut is passed through the neighbour."""
    crossing = []
    before = 0
    for mask in masks[:-1]:
        before |= mask
        crossing.append([p for p in members(before) if model.succ_mask[p] & ~before])
    costs = []
    for i, mask in enumerate(masks):
        incoming = crossing[i - 1] if i > 0 else []
        outgoing = crossing[i] if i < len(masks) - 1 else []
        own = members(mask)
        costs.append(
            StageCost(
                fwd_ms=sum(model.fwd[v] for v in own),
                bwd_ms=sum(model.bwd[v] for v in own),
                comm_ms=sum(model.msg[p] for p in incoming) + sum(model.msg[p] for p in outgoing),
                param_bytes=sum(model.params[v] for v in own),
                act_bytes=_chain_held(model, mask, incoming),
                wgt_ms=model.of_mask(mask).wgt_ms,  # the same received values, passed on or not
            )
        )
    n = len(masks)
    return StageGraph(
        stages=tuple(masks),
        edges=tuple((i, i + 1) for i in range(n - 1)),
        edge_bytes=tuple(sum(model.out_bytes[p] for p in cut) for cut in crossing),
        costs=tuple(costs),
        in_flight=tuple(n - i for i in range(n)),
    )

"""Which values travel on which stage edge: the runtime's view of a plan.

[Note: routing]
A value is the output of one operator (one FX node). It is needed by every stage that has a consumer
of it and, when it is part of the model output, by the loss stage: the highest stage producing any
output, where the output is assembled and the loss computed. On a DAG plan a value travels directly
from its producer to each stage that needs it, and from every other stage that produces an output to
the loss stage (the plan has these edges already, see [Note: output edges] in
torch_graphpipe/stage_graph.py: routing never changes the planned stage graph or its schedule). On a
chain plan every value crossing a cut is carried by the stages in
between, which pass it on. Within a message values are ordered by their operator's topological index.
"""

from __future__ import annotations

import dataclasses

from torch_graphpipe.graph import OpGraph
from torch_graphpipe.planner import Plan

__all__ = ["Routing", "StageRoute", "route", "with_routing"]

Message = tuple[int, tuple[str, ...]]  # (peer stage, value names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRoute:
    """One stage's operators and its messages; see [Note: routing]."""

    stage: int  # stage index (its rank in the process group)
    node_names: tuple[str, ...]  # operators it runs, topological order
    recv: tuple[Message, ...]  # per predecessor, ascending: values received on that edge
    send: tuple[Message, ...]  # per successor, ascending: values sent on that edge
    out_values: tuple[str, ...]  # every value it sends: those passed on (arrival order), then its own
    holds_output: bool  # assembles the model output and computes the loss

    @property
    def in_values(self) -> tuple[str, ...]:
        return tuple(v for _, values in self.recv for v in values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Routing:
    """Messages of every stage."""

    stages: tuple[StageRoute, ...]  # by stage index
    edges: tuple[tuple[int, int], ...]  # stage edges that carry data, sorted
    loss_stage: int  # stage holding the model output


def route(plan: Plan, graph: OpGraph) -> Routing:
    """Route every value of ``graph`` over the stages of ``plan``; see [Note: routing]."""
    owner = {name: s.index for s in plan.stages for name in s.node_names}
    missing = [n.name for n in graph.nodes if n.name not in owner]
    if missing or len(owner) != len(graph):
        raise ValueError(
            f"the plan does not match the model's graph (operators {missing[:5]} are not placed)"
        )
    outputs = [n.name for n in graph.nodes if n.is_output]
    loss_stage = max((owner[n] for n in outputs), default=plan.num_stages - 1)
    needs = _needs(graph, owner, loss_stage)
    carried: dict[tuple[int, int], list[str]] = {e: [] for e in plan.edges}
    for node in graph.nodes:
        for hop in _hops(owner[node.name], needs[node.name], plan.stage_graph == "chain"):
            carried.setdefault(hop, []).append(node.name)
    edges = tuple(sorted(carried))
    stages = tuple(
        _stage_route(s, plan.stages[s].node_names, carried, edges, s == loss_stage)
        for s in range(plan.num_stages)
    )
    return Routing(stages=stages, edges=edges, loss_stage=loss_stage)


def with_routing(plan: Plan, routing: Routing, edge_bytes: dict[tuple[int, int], int]) -> Plan:
    """``plan`` with the bytes each edge carries as routed; its edges and schedule are the plan's own.

    Raises ``ValueError`` when the values travel on other edges than the plan's (a plan built without
    its output edges, see [Note: output edges]): the schedule that runs is the one planned."""
    if routing.edges != plan.edges:
        missing = sorted(set(routing.edges) - set(plan.edges))
        unused = sorted(set(plan.edges) - set(routing.edges))
        raise ValueError(
            f"the plan's stage edges do not match the model's values (edges needed but not planned: "
            f"{missing}, planned but unused: {unused}); plan it again with torch_graphpipe.plan"
        )
    return dataclasses.replace(plan, edge_bytes=tuple(edge_bytes.get(e, 0) for e in routing.edges))


def _needs(graph: OpGraph, owner: dict[str, int], loss_stage: int) -> dict[str, set[int]]:
    needs: dict[str, set[int]] = {}
    for v, node in enumerate(graph.nodes):
        stages = {owner[graph.nodes[c].name] for c in graph.succs[v]}
        if node.is_output:
            stages.add(loss_stage)
        stages.discard(owner[node.name])
        needs[node.name] = stages
    return needs


def _hops(src: int, needs: set[int], chain: bool) -> list[tuple[int, int]]:
    if not needs:
        return []
    for dst in needs:
        assert dst > src, f"a value flows from stage {src} back to stage {dst}"
    if chain:
        return [(i, i + 1) for i in range(src, max(needs))]
    return [(src, dst) for dst in sorted(needs)]


def _stage_route(
    s: int,
    node_names: tuple[str, ...],
    carried: dict[tuple[int, int], list[str]],
    edges: tuple[tuple[int, int], ...],
    holds_output: bool,
) -> StageRoute:
    recv = tuple((a, tuple(carried[(a, b)])) for a, b in edges if b == s)
    send = tuple((b, tuple(carried[(a, b)])) for a, b in edges if a == s)
    order = {name: i for i, name in enumerate(node_names)}
    incoming = [v for _, values in recv for v in values]
    position = {v: (-1, i) for i, v in enumerate(incoming)} | {v: (0, i) for v, i in order.items()}
    out_values = sorted({v for _, values in send for v in values}, key=lambda v: position[v])
    return StageRoute(
        stage=s,
        node_names=node_names,
        recv=recv,
        send=send,
        out_values=tuple(out_values),
        holds_output=holds_output,
    )

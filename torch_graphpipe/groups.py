"""Explicit partitions: stages given as lists of module names, turned into operator bitsets.

[Note: explicit partition]
``partition=[["stem", "left"], ["right"], ["head"]]`` names, per stage, modules of the model. An
operator that calls a module belongs to the stage naming that module or one of its parents
(``"left"`` covers ``left.0`` and ``left.2``). Operators that call no module (``torch.cat``, ``+``,
``relu``) are placed after the modules: first, in reverse topological order, with their consumers
when all of them are in one stage; then with their latest producer; an operator reading only model
inputs goes with its first consumer. Every stage must be non-empty and convex, and the stages must
form a DAG; otherwise a ``ValueError`` names the stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch_graphpipe.graph import OpGraph, members

__all__ = ["stages_from_module_groups"]


def stages_from_module_groups(graph: OpGraph, groups: Sequence[Sequence[str]]) -> list[int]:
    """Node bitsets, one per group, following [Note: explicit partition]."""
    _check_groups(groups)
    owner = _assign_modules(graph, groups)
    _assign_rest(graph, owner)
    masks = [0] * len(groups)
    for v, s in enumerate(owner):
        masks[s] |= 1 << v
    for s, mask in enumerate(masks):
        if not mask:
            raise ValueError(f"partition group {s} {list(groups[s])} holds no operator")
        if not graph.is_convex(mask):
            raise ValueError(
                f"partition group {s} {list(groups[s])} is not convex: a path leaves it and comes back "
                f"(operators {[graph.nodes[v].name for v in members(mask)][:8]})"
            )
    _check_acyclic(graph, owner, groups)
    return masks


def _check_groups(groups: Sequence[Sequence[str]]) -> None:
    if isinstance(groups, str) or not all(not isinstance(g, str) for g in groups):
        raise TypeError("partition must be 'auto' or a list of lists of module names, one list per stage")
    seen: dict[str, int] = {}
    for s, group in enumerate(groups):
        for name in group:
            if not isinstance(name, str) or not name:
                raise ValueError(f"partition group {s}: module names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"module {name!r} is in partition groups {seen[name]} and {s}")
            seen[name] = s


def _assign_modules(graph: OpGraph, groups: Sequence[Sequence[str]]) -> list[int]:
    owner = [-1] * len(graph)
    used: set[str] = set()
    for v, node in enumerate(graph.nodes):
        if node.kind != "module":
            continue
        match = _best_match(node.target, groups)
        if match is None:
            continue
        owner[v], name = match
        used.add(name)
    unknown = [n for g in groups for n in g if n not in used]
    if unknown:
        known = sorted({n.target for n in graph.nodes if n.kind == "module"})
        raise ValueError(f"partition names modules {unknown} that no operator calls; called modules: {known}")
    missing = [n.target for v, n in enumerate(graph.nodes) if n.kind == "module" and owner[v] < 0]
    if missing:
        raise ValueError(f"partition does not place the modules {sorted(set(missing))}")
    return owner


def _best_match(target: str, groups: Sequence[Sequence[str]]) -> tuple[int, str] | None:
    """The group naming ``target`` or its closest parent."""
    best: tuple[int, str] | None = None
    for s, group in enumerate(groups):
        for name in group:
            if (target == name or target.startswith(name + ".")) and (
                best is None or len(name) > len(best[1])
            ):
                best = (s, name)
    return best


def _assign_rest(graph: OpGraph, owner: list[int]) -> None:
    for v in range(len(graph) - 1, -1, -1):
        if owner[v] < 0:
            consumers = {owner[c] for c in graph.succs[v]}
            if len(consumers) == 1 and -1 not in consumers:
                owner[v] = consumers.pop()
    for v in range(len(graph)):
        if owner[v] >= 0:
            continue
        placed = [p for p in graph.preds[v] if owner[p] >= 0]
        if placed:
            owner[v] = owner[max(placed)]
        else:
            assigned = [c for c in graph.succs[v] if owner[c] >= 0]
            owner[v] = owner[min(assigned)] if assigned else 0


def _check_acyclic(graph: OpGraph, owner: list[int], groups: Sequence[Sequence[str]]) -> None:
    succ: dict[int, set[int]] = {s: set() for s in range(len(groups))}
    for v, preds in enumerate(graph.preds):
        for p in preds:
            if owner[p] != owner[v]:
                succ[owner[p]].add(owner[v])
    state = [0] * len(groups)  # 0 new, 1 on the stack, 2 done

    def visit(s: int) -> None:
        state[s] = 1
        for t in succ[s]:
            if state[t] == 1:
                raise ValueError(
                    f"partition groups {s} and {t} depend on each other (the stages form a cycle)"
                )
            if state[t] == 0:
                visit(t)
        state[s] = 2

    for s in range(len(groups)):
        if state[s] == 0:
            visit(s)

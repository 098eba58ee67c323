"""Fixed-cost graphs and brute-force partitioners for the planner tests."""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch_graphpipe.candidates import CandidateTree
from torch_graphpipe.graph import OpGraph, members
from torch_graphpipe.profile import CommModel, CostTable, OpCost
from torch_graphpipe.sp import SPNode
from torch_graphpipe.stage_cost import StageCostModel
from torch_graphpipe.stage_graph import build_stage_graph

__all__ = [
    "brute_force",
    "in_family",
    "integer_costs",
    "random_dag",
    "random_fork_join",
    "random_sp_graph",
    "two_chains",
]


def two_chains(length: int = 4) -> OpGraph:
    """Two independent branches of ``length`` operators each (the DESIGN's worked example)."""
    names = [f"{b}{i}" for b in "ab" for i in range(length)]
    edges = [(f"{b}{i}", f"{b}{i + 1}") for b in "ab" for i in range(length - 1)]
    return OpGraph.from_edges(names, edges)


def integer_costs(graph: OpGraph, rng: random.Random, *, comm: bool = True) -> CostTable:
    """Random integer costs (so sums compare exactly); messages cost 1 + kB."""
    ops = {
        n.name: OpCost(
            fwd_ms=rng.randint(1, 5),
            bwd_ms=rng.randint(1, 9),
            out_bytes=1000 * rng.randint(0, 3),
            param_bytes=rng.randint(0, 4),
        )
        for n in graph.nodes
    }
    model = CommModel(alpha_ms=1.0, bytes_per_ms=1000.0) if comm else CommModel.free()
    return CostTable(ops=ops, comm=model, param_copies=1.0)


def random_sp_graph(n: int, rng: random.Random, skip_prob: float = 0.2) -> OpGraph:
    """A random series-parallel DAG of ``n`` operators, with extra skip edges inside series parts."""
    names = [f"n{i}" for i in range(n)]
    edges: set[tuple[str, str]] = set()

    def build(part: list[str]) -> tuple[list[str], list[str]]:  # (sources, sinks)
        if len(part) == 1:
            return part, part
        cut = rng.randint(1, len(part) - 1)
        left, right = part[:cut], part[cut:]
        (ls, lt), (rs, rt) = build(left), build(right)
        if rng.random() < 0.5:
            return ls + rs, lt + rt  # parallel
        edges.update((a, b) for a in lt for b in rs)
        edges.update((a, b) for a in left for b in right if rng.random() < skip_prob / len(part))
        return ls, rt

    build(names)
    return OpGraph.from_edges(names, sorted(edges))


def random_fork_join(rng: random.Random, max_nodes: int = 8) -> OpGraph:
    """Optional stem -> 2 or 3 chains -> join -> optional tail op: where a branch tail may go with the join."""
    names: list[str] = []
    edges: list[tuple[str, str]] = []
    stem = rng.random() < 0.3
    if stem:
        names.append("stem")
    lengths = [rng.randint(1, 3) for _ in range(rng.choice((2, 2, 3)))]
    while sum(lengths) + 2 + stem > max_nodes:
        lengths[lengths.index(max(lengths))] -= 1
    for b, length in enumerate(lengths):
        prev = "stem" if stem else None
        for i in range(max(1, length)):
            names.append(f"b{b}_{i}")
            if prev is not None:
                edges.append((prev, f"b{b}_{i}"))
            prev = f"b{b}_{i}"
        edges.append((prev, "join"))
    names.append("join")
    if len(names) < max_nodes and rng.random() < 0.5:
        names.append("post")
        edges.append(("join", "post"))
    return OpGraph.from_edges(names, edges)


def random_dag(n: int, rng: random.Random, p: float = 0.3) -> OpGraph:
    """A random DAG (usually not series-parallel)."""
    names = [f"v{i}" for i in range(n)]
    edges = [(names[i], names[j]) for i in range(n) for j in range(i + 1, n) if rng.random() < p]
    return OpGraph.from_edges(names, edges)


def _set_partitions(n: int, k: int) -> Iterator[list[int]]:
    """Block label of each element, restricted-growth form, exactly ``k`` blocks."""

    def grow(labels: list[int], used: int) -> Iterator[list[int]]:
        if len(labels) == n:
            if used == k:
                yield labels
            return
        if used + (n - len(labels)) < k:
            return
        for b in range(min(used + 1, k)):
            yield from grow([*labels, b], max(used, b + 1))

    yield from grow([], 0)


def brute_force(
    graph: OpGraph,
    costs: CostTable,
    num_stages: int,
    *,
    budget: float | None = None,
    keep=lambda masks: True,
) -> tuple[float, int] | None:
    """Best (bottleneck, depth) over convex partitions accepted by ``keep``; None when none fits.

    Depths count the data edges only, as the DAG search does (see [Note: output edges])."""
    model = StageCostModel(graph, costs)
    best = None
    for labels in _set_partitions(len(graph), num_stages):
        masks = [sum(1 << v for v, lab in enumerate(labels) if lab == b) for b in range(num_stages)]
        if not all(graph.is_convex(m) for m in masks) or not keep(masks):
            continue
        try:
            sg = build_stage_graph(graph, model, masks, output_edges=False)
        except AssertionError:  # stages form a cycle
            continue
        if budget is not None and any(
            c.memory_bytes(f, costs.param_copies) > budget for c, f in zip(sg.costs, sg.in_flight)
        ):
            continue
        value = (max(c.time_ms for c in sg.costs), max(sg.in_flight))
        best = value if best is None or value < best else best
    return best


def in_family(masks: list[int], node: SPNode, tree: CandidateTree) -> bool:
    """Is this partition one the DAG search can form? (see [Note: partition search])"""
    here = [m for m in masks if m & node.mask]
    if node.kind == "leaf":
        return here == [node.mask]
    if node.kind == "parallel":
        return _parallel_ok(here, node, tree)
    kids, i = node.children, 0
    while i < len(kids):
        inside = [m for m in here if m & kids[i].mask]
        outside = [m for m in inside if m & ~kids[i].mask]
        if not outside:
            if not in_family(inside, kids[i], tree):
                return False
            i += 1
            continue
        if len(outside) > 1:
            return False
        j = _run_end(outside[0] & ~kids[i].mask, kids, i + 1)
        if j is None:
            return False
        head = outside[0] & kids[i].mask
        if head == kids[i].mask and len(inside) == 1:
            i = j + 1
            continue
        if kids[i].kind != "parallel" or not _absorb_ok(inside, outside[0], head, kids[i], tree):
            return False
        i = j + 1
    return True


def _run_end(rest: int, kids: tuple[SPNode, ...], start: int) -> int | None:
    acc, j = 0, start - 1
    while acc != rest:
        j += 1
        if j >= len(kids) or kids[j].mask & ~rest:
            return None
        acc |= kids[j].mask
    return j if j >= start else None


def _absorb_ok(inside: list[int], joint: int, head: int, par: SPNode, tree: CandidateTree) -> bool:
    suffixes = tree.suffix_mask[id(par)]
    others = [m for m in inside if m != joint]
    if head in suffixes[1:]:
        idx = suffixes.index(head)
        return _separate_ok(others, tree.order[id(par)][:idx], tree)
    return _tail_ok(others, head, par, tree)


def _tail_ok(others: list[int], head: int, par: SPNode, tree: CandidateTree) -> bool:
    """The joint stage holds a tail of branch ``order[idx - 1]`` and the branches ``order[idx:]``."""
    order, suffixes = tree.order[id(par)], [*tree.suffix_mask[id(par)], 0]
    for idx in range(1, len(order) + 1):
        branch = order[idx - 1]
        if (
            branch.kind != "series"
            or head & ~(branch.mask | suffixes[idx])
            or head & suffixes[idx] != suffixes[idx]
        ):
            continue
        tail = head & branch.mask
        for t in range(1, len(branch.children)):
            if tail != _mask_of(branch.children[t:]):
                continue
            front = branch.children[:t]
            mine = [m for m in others if m & _mask_of(front)]
            rest = [m for m in others if not m & _mask_of(front)]
            if any(m & ~_mask_of(front) for m in mine):
                return False
            head_node = front[0] if t == 1 else SPNode(kind="series", mask=_mask_of(front), children=front)
            return in_family(mine, head_node, tree) and _separate_ok(rest, order[: idx - 1], tree)
    return False


def _mask_of(nodes) -> int:
    mask = 0
    for node in nodes:
        mask |= node.mask
    return mask


def _parallel_ok(here: list[int], node: SPNode, tree: CandidateTree) -> bool:
    order, suffixes = tree.order[id(node)], tree.suffix_mask[id(node)]
    merged = [m for m in here if m in suffixes]
    for m in merged:
        idx = suffixes.index(m)
        if _separate_ok([x for x in here if x != m], order[:idx], tree):
            return True
    return _separate_ok(here, order, tree)


def _separate_ok(masks: list[int], branches: tuple[SPNode, ...], tree: CandidateTree) -> bool:
    covered = 0
    for b in branches:
        mine = [m for m in masks if m & b.mask]
        if any(m & ~b.mask for m in mine) or not in_family(mine, b, tree):
            return False
        covered |= b.mask
    return all(m & ~covered == 0 for m in masks) and sum(len(members(m)) for m in masks) == len(
        members(covered)
    )

"""Every stage the DAG partitioner can form, with its cost; see [Note: partition search].

Per series-parallel tree node: the node as one stage; for a series node every run ``C_i..C_j`` of
children; for a parallel node (children sorted by compute, largest first) every suffix of branches
merged; for a parallel child ``C_i`` of a series node, every branch suffix merged with a following run
``C_i+1..C_j`` (the branches' join absorbed into the stage that consumes them), and every *tail* of a
series branch (its last children ``S_t..``), with the branches after it in the order, merged with such
a run (the end of one branch stays with the join; see [Note: branch tail with the join]).
"""

from __future__ import annotations

from torch_graphpipe.sp import SPNode
from torch_graphpipe.stable import by_cost
from torch_graphpipe.stage_cost import StageCost, StageCostModel

__all__ = ["CandidateTree", "Tail"]

Tail = tuple[int, int, int, list[StageCost]]  # (idx, t, joint mask without the run, costs per run end)


class CandidateTree:
    """Target-independent data of the search: candidate stage costs per SP node (keyed by ``id``)."""

    def __init__(self, root: SPNode, model: StageCostModel, margin: float = 0.0) -> None:
        self.model = model
        self.margin = margin  # relative cost difference treated as equal (see [Note: plans that reproduce])
        self.whole: dict[int, StageCost] = {}
        self.runs: dict[int, list[list[StageCost]]] = {}  # series: runs[i][j - i] = cost(C_i..C_j)
        self.order: dict[int, tuple[SPNode, ...]] = {}  # parallel children, most expensive first
        self.suffix: dict[int, list[StageCost]] = {}  # parallel: cost of union of order[idx:]
        self.suffix_mask: dict[int, list[int]] = {}  # parallel: bitset of union of order[idx:]
        # series id -> position i -> idx -> costs of suffix_i(idx) | C_i+1..C_j for j = i+1..
        self.absorb: dict[int, dict[int, dict[int, list[StageCost]]]] = {}
        # series id -> position i -> [(idx, t, mask of tail_t(order[idx - 1]) | order[idx:], costs of
        # that mask | C_i+1..C_j for j = i+1..)], per idx the tails growing (t descending)
        self.tails: dict[int, dict[int, list[Tail]]] = {}
        self.leaves: dict[int, int] = {}
        self.compute: dict[int, float] = {}
        self._visit(root)

    def _visit(self, node: SPNode) -> None:
        self.leaves[id(node)] = bin(node.mask).count("1")
        self.compute[id(node)] = self.model.compute_ms(node.mask)
        for child in node.children:
            self._visit(child)
        if node.kind == "series":
            masks = [c.mask for c in node.children]
            self.runs[id(node)] = [self.model.runs(masks[i:]) for i in range(len(masks))]
            self.whole[id(node)] = self.runs[id(node)][0][-1]
            self.absorb[id(node)] = self._absorb(node)
            self.tails[id(node)] = self._tails(node)
        elif node.kind == "parallel":
            # costliest first; among equals (within the margin) the earliest branch last, so that it is
            # the one that may keep its tail with the join ([Note: branch tail with the join]) and the
            # first stage of the graph sits on the shortest path to the sink
            kids = by_cost(node.children, [self.compute[id(c)] for c in node.children], self.margin)
            self.order[id(node)] = tuple(kids)
            masks = [0] * (len(kids) + 1)
            for idx in range(len(kids) - 1, -1, -1):
                masks[idx] = masks[idx + 1] | kids[idx].mask
            self.suffix_mask[id(node)] = masks[:-1]
            self.suffix[id(node)] = self.model.runs([c.mask for c in reversed(kids)])[::-1]
            self.whole[id(node)] = self.suffix[id(node)][0]
        else:
            self.whole[id(node)] = self.model.of_mask(node.mask)

    def _absorb(self, node: SPNode) -> dict[int, dict[int, list[StageCost]]]:
        out: dict[int, dict[int, list[StageCost]]] = {}
        masks = [c.mask for c in node.children]
        for i, child in enumerate(node.children[:-1]):
            if child.kind != "parallel":
                continue
            suffixes = self.suffix_mask[id(child)]
            out[i] = {
                idx: self.model.runs([suffixes[idx], *masks[i + 1 :]])[1:] for idx in range(1, len(suffixes))
            }
        return out

    def _tails(self, node: SPNode) -> dict[int, list[Tail]]:
        out: dict[int, list[Tail]] = {}
        masks = [c.mask for c in node.children]
        for i, child in enumerate(node.children[:-1]):
            if child.kind != "parallel":
                continue
            order, suffixes = self.order[id(child)], [*self.suffix_mask[id(child)], 0]
            rows = out[i] = []
            for idx in range(1, len(order) + 1):
                branch = order[idx - 1]
                if branch.kind != "series":
                    continue
                tail = 0
                for t in range(len(branch.children) - 1, 0, -1):
                    tail |= branch.children[t].mask
                    head = tail | suffixes[idx]
                    rows.append((idx, t, head, self.model.runs([head, *masks[i + 1 :]])[1:]))
        return out

    def candidate_times(self) -> list[float]:
        times = {c.time_ms for c in self.whole.values()}
        for table in self.runs.values():
            times.update(c.time_ms for row in table for c in row)
        for row in self.suffix.values():
            times.update(c.time_ms for c in row)
        for per_series in self.absorb.values():
            for per_child in per_series.values():
                for row in per_child.values():
                    times.update(c.time_ms for c in row)
        for tails in self.tails.values():
            for options in tails.values():
                for *_, row in options:
                    times.update(c.time_ms for c in row)
        return sorted(times)

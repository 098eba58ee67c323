"""Coarse segments ([Note: coarse segments]): cut points, interval candidates, their search and report."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends.base import BackendSpec
from torch_collage.candidates import Candidate, enumerate_candidates
from torch_collage.graph import DataflowGraph, bits
from torch_collage.options import CollageOptions
from torch_collage.search import search_cover
from torch_collage.segments import (
    consecutive_segments,
    crossings,
    cut_points,
    interval_mask,
    segment_candidates,
)


def _residual_blocks(x: torch.Tensor) -> torch.Tensor:
    for k in range(6):
        y = (x * (k + 2)).sin()
        z = y.cos() + y.tanh()
        x = x + z.relu()  # one tensor crosses between blocks, two or more inside one
    return x.neg()


def _graph(fn=_residual_blocks) -> DataflowGraph:
    return DataflowGraph.from_graph(make_fx(fn)(torch.randn(4, 4)).graph)


def _spec(name: str, supports=("*",), fusion="region", max_depth=None) -> BackendSpec:
    return BackendSpec(
        name=name, compile=lambda gm, ex: gm, supports=supports, fusion=fusion, max_depth=max_depth
    )


def _naive_crossing(graph: DataflowGraph, k: int) -> int:
    return sum(1 for i in range(k) if any(j >= k for j in bits(graph.succs[i])))


def _naive_convex(graph: DataflowGraph, mask: int) -> bool:
    for k in range(graph.size):
        if mask >> k & 1:
            continue
        if any(graph.descendants[i] >> k & 1 for i in bits(mask)) and any(
            graph.ancestors[i] >> k & 1 for i in bits(mask)
        ):
            return False
    return True


def test_crossings_count_the_values_a_cut_hands_over():
    g = _graph()
    got = crossings(g)
    assert got == [_naive_crossing(g, k) for k in range(g.size + 1)]
    assert got[0] == got[-1] == 0 and max(got) >= 2


@pytest.mark.parametrize("n_segments", [2, 3, 4, 6])
def test_cuts_fall_where_fewest_values_cross_near_even_splits(n_segments):
    g = _graph()
    cross = crossings(g)
    points = cut_points(g, n_segments)
    assert points[0] == 0 and points[-1] == g.size and points == sorted(set(points))
    assert len(points) == n_segments + 1
    window = max(1, g.size // (2 * n_segments))
    for j, k in enumerate(points[1:-1], start=1):
        target = round(j * g.size / n_segments)
        assert abs(k - target) <= window
        assert cross[k] == min(
            cross[t] for t in range(max(1, target - window), min(g.size - 1, target + window) + 1)
        )
        assert cross[k] == 1  # block boundaries exist in every window of this graph


def test_every_interval_is_convex_and_segments_tile_the_graph():
    g = _graph()
    cands = segment_candidates(g, [_spec("a")], 4)
    assert len(cands) == 4 * 5 // 2 - 1  # every pair of cut points but the whole graph
    assert all(_naive_convex(g, c.mask) for c in cands)
    assert Candidate(g.full, "a") not in cands
    tiles = consecutive_segments(g, 4)
    assert sum(tiles) == g.full and all(a & b == 0 for i, a in enumerate(tiles) for b in tiles[i + 1 :])


def test_segments_only_for_region_backends_that_support_the_whole_interval():
    g = _graph()
    specs = [
        _spec("eager", fusion="single"),
        _spec("single", fusion="single"),
        _spec("epilogue", fusion="elementwise_epilogue"),
        _spec("capped", max_depth=4),
        _spec("no_neg", supports=("aten.sin", "aten.cos", "aten.tanh", "aten.mul", "aten.add", "aten.relu")),
        _spec("all"),
    ]
    cands = segment_candidates(g, specs, 3)
    assert {c.backend for c in cands} == {"no_neg", "all"}
    neg = next(i for i, u in enumerate(g.units) if u[0].target is torch.ops.aten.neg.default)
    assert all(not c.mask >> neg & 1 for c in cands if c.backend == "no_neg")
    assert len([c for c in cands if c.backend == "all"]) == 5
    assert segment_candidates(g, specs, 0) == [] and segment_candidates(g, specs, 1) == []


def test_search_finds_a_coarse_mix_the_fine_candidates_cannot_express():
    """Fixed costs: "a" is fast on the first half as a whole, "b" on the second; every fine candidate
    and single-backend whole graph costs more. Only the segments make the mix reachable."""
    g = _graph()
    specs = [_spec("eager", fusion="single"), _spec("a"), _spec("b")]
    fine = enumerate_candidates(g, specs, max_depth=2)
    whole = [Candidate(g.full, "a"), Candidate(g.full, "b")]
    coarse = segment_candidates(g, specs, 2)
    first, second = consecutive_segments(g, 2)

    def cost(c: Candidate) -> float:
        if c == Candidate(first, "a") or c == Candidate(second, "b"):
            return 1.0
        return 1.5 * c.size if c.mask != g.full else 10.0 * g.size

    switch = lambda x, y: 0.0 if x == y else 0.25
    without = search_cover(g, fine + whole, cost, switch)
    with_segments = search_cover(g, fine + whole + coarse, cost, switch)
    assert [(p.mask, p.backend) for p in with_segments.partitions] == [(first, "a"), (second, "b")]
    assert with_segments.predicted_ms == pytest.approx(2.25)
    assert without.predicted_ms > with_segments.predicted_ms


def test_interval_mask_and_bad_counts():
    assert interval_mask(2, 5) == 0b11100
    with pytest.raises(ValueError, match="n_segments"):
        cut_points(_graph(), 0)
    for bad in (1, -2):
        with pytest.raises(ValueError, match="segments"):
            CollageOptions(segments=bad)


def test_explain_reports_each_segment_on_each_backend(tmp_path):
    """Real ONNX Runtime: with ``segments=2`` every consecutive segment is measured on it, the
    report lists them, and the markdown shows the table and the searched placement."""
    from torch_collage.backends import get_backend

    if not get_backend("onnxruntime").available()[0]:
        pytest.skip("onnxruntime unavailable")
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    report = torch_collage.explain(
        model,
        x,
        backends=["onnxruntime"],
        segments=2,
        cache_dir=str(tmp_path),
        max_depth=1,
        repeats=3,
        warmup=1,
    )
    (graph,) = report.graphs
    assert len(graph.segments) == 2
    assert sum(s.units for s in graph.segments) >= 5
    for seg in graph.segments:
        assert (
            set(seg.ms) == {"onnxruntime"}
            and math.isfinite(seg.ms["onnxruntime"])
            and seg.ms["onnxruntime"] > 0
        )
        assert seg.best == "onnxruntime"
    assert graph.searched and math.isfinite(graph.searched_ms)
    text = report.to_markdown()
    assert "| segment | ops | onnxruntime |" in text and "The search's placement:" in text
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(
                model,
                backend="collage",
                options={
                    "backends": ["onnxruntime"],
                    "segments": 2,
                    "cache_dir": str(tmp_path),
                    "max_depth": 1,
                },
            )(x),
            model(x),
            rtol=1e-4,
            atol=1e-4,
        )


def test_segments_are_measured_within_the_budget_and_reported_when_it_is_spent(tmp_path):
    """Segments draw on the compile budget like every other step ([Note: the compile budget] in
    timing.py): with time for them each gets a measured time; with none, the report says they were
    left unmeasured rather than the compile running past ``time_budget_s``."""
    from torch_collage.backends import get_backend

    if not get_backend("onnxruntime").available()[0]:
        pytest.skip("onnxruntime unavailable")
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    opts = dict(backends=["onnxruntime"], segments=3, repeats=3, warmup=1, progress=False)
    report = torch_collage.explain(model, x, cache_dir=str(tmp_path / "ample"), time_budget_s=120.0, **opts)
    (graph,) = report.graphs
    assert len(graph.segments) == 3
    assert all(math.isfinite(s.ms.get("onnxruntime", math.inf)) for s in graph.segments)
    spent = torch_collage.explain(model, x, cache_dir=str(tmp_path / "none"), time_budget_s=0.0, **opts)
    (graph,) = spent.graphs
    assert graph.unmeasured.get("segments", 0) >= 1


def test_regions_around_a_specialist_are_the_runs_between_its_units():
    """[Note: regions around a specialist]: a backend claiming few units (tanh) cuts the topological
    order; each run between its units, on a region backend, is a convex candidate without the
    specialist's units or the units that backend refuses (neg), and the cover search can then put
    the specialist's units between runs of the region backend without eager pieces."""
    from torch_collage.segments import around_specialists

    graph = _graph()
    specialist = _spec("special", supports=("aten.tanh",))
    runtime = _spec("rt", supports=("aten.sin", "aten.cos", "aten.add", "aten.relu", "aten.mul"))
    eager = _spec("eager")
    claimed = sum(1 << i for i, u in enumerate(graph.units) if u[0].target is torch.ops.aten.tanh.default)
    refused = sum(1 << i for i, u in enumerate(graph.units) if u[0].target is torch.ops.aten.neg.default)
    assert claimed.bit_count() == 6 and refused
    cands = around_specialists(graph, [eager, specialist, runtime], max_depth=2)
    assert cands and {c.backend for c in cands} == {"rt"}
    covered = 0
    for c in cands:
        units = list(bits(c.mask))
        assert units == list(range(units[0], units[-1] + 1))  # a run of the topological order
        assert len(units) > 2 and graph.is_convex(c.mask)
        assert not c.mask & (claimed | refused)
        covered |= c.mask
    assert covered | claimed | refused == graph.full  # every other unit is in a run
    # no specialist (a backend supporting most units is none): nothing
    assert around_specialists(graph, [eager, runtime, _spec("all")], max_depth=2) == []

    fine = enumerate_candidates(graph, [eager, specialist], 1)
    cost = {c: 0.1 * c.size for c in cands}
    pieces = search_cover(graph, fine + cands, lambda c: cost.get(c, 0.01 if c.backend == "special" else 1.0),
                          lambda a, b: 0.0 if a == b else 0.05)  # fmt: skip
    assert [p.backend for p in pieces.partitions].count("eager") == refused.bit_count()
    assert sum(p.backend == "rt" for p in pieces.partitions) == len(cands)

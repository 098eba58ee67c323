"""The compile budget: ``time_budget_s`` caps one graph's whole placement, what it left out is
reported, candidates that cannot win are not measured, and the progress estimate comes from the
time measuring took so far ([Note: the compile budget] in timing.py)."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends.registry import registered_backend
from torch_collage.candidates import Candidate
from torch_collage.graph import DataflowGraph
from torch_collage.measure import LOCAL_SPEEDUP, rank_candidates
from torch_collage.options import CollageOptions
from torch_collage.timing import Budget

_FAST = {"repeats": 3, "warmup": 1, "progress": False}


def test_budget_fits_counts_what_it_skipped_and_shortens_timings():
    now = [0.0]
    budget = Budget(10.0, clock=lambda: now[0])
    assert budget.fits(9.0) and not budget.fits(9.0, reserve=2.0)
    now[0] = 8.0
    assert budget.left() == 2.0 and budget.spent() == 8.0
    assert budget.timing_cap_s(2.0) == pytest.approx(0.2)  # a tenth of what is left
    now[0] = 11.0
    assert not budget.fits(0.0) and budget.timing_cap_s(2.0) == 0.05  # warm-up and one sample
    budget.skip("candidates", 3)
    budget.skip("candidates")
    budget.skip("merged regions", 0)
    assert budget.skipped == {"candidates": 4}
    assert Budget(math.inf).fits(1e9) and Budget(math.inf).timing_cap_s(2.0) == 2.0
    with pytest.raises(ValueError, match="seconds"):
        Budget(-1.0)


def test_default_budget_keeps_a_cold_compile_under_a_minute():
    assert CollageOptions().time_budget_s == 50.0


def _sleepy_compile(gm: fx.GraphModule, example_inputs):
    time.sleep(0.15)  # a backend whose every compile takes a while
    return gm


def _sleepier_compile(gm: fx.GraphModule, example_inputs):
    time.sleep(0.4)  # a few compiles fill the budget, however many candidates their bounds prune
    return gm


def _mlp() -> nn.Module:
    widths = [32, 40, 48, 56, 64, 72, 80]  # no two layers alike: each candidate is measured
    layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.GELU())]
    return nn.Sequential(*layers).eval()


def test_whole_placement_stays_within_its_budget_and_says_what_it_left_out(tmp_path):
    """With unlimited time the search measures ~40 candidates of a backend that compiles in 0.4 s
    each; within 2 s it cannot, and stops in time for the end-to-end check. A batch of 256 keeps
    the ops' times well above a switch's, so the bounds prune none of them as certain losers (at
    a batch of 8 a slow day's switch costs pruned all 31, and nothing was left to cut)."""
    from torch_collage.place import Placer
    from torch_collage.timing import QuietProbe

    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(256, 32)
    opts = {"backends": ["eager", "sleepy"], "cache_dir": str(tmp_path), "max_depth": 2, **_FAST}
    placer = Placer(probe=QuietProbe())
    with registered_backend("sleepy", compile=_sleepier_compile):
        report = torch_collage.explain(model, x, time_budget_s=2.0, placer=placer, **opts)
        (graph,) = report.graphs
        assert graph.search_s <= 2.0 * 1.1, graph.search_s
        assert graph.budget_s == 2.0 and graph.unmeasured.get("candidates", 0) > 0
        text = report.to_markdown()
        assert "Not measured within the 2 s budget" in text and "candidates (" in text
        before = placer.measurements  # a warm compile measures what the cold one did, nothing more
        warm = torch_collage.explain(model, x, time_budget_s=2.0, placer=placer, **opts)
    assert placer.measurements == before and warm.graphs[0].measured == 0
    assert warm.partitions[0].backend == report.partitions[0].backend


class _Bounds:
    """What ``rank_candidates`` asks of a cost model: the graph and a switch cost."""

    def __init__(self, graph: DataflowGraph, switch_ms: float) -> None:
        self.graph, self._switch = graph, switch_ms

    def switch_cost(self, a: str, b: str) -> float:
        return 0.0 if a == b else self._switch


def _chain(x: torch.Tensor) -> torch.Tensor:
    return ((x.relu() * 2).sin() + 1).cos().exp()


def test_certain_losers_are_not_measured_and_the_rest_go_largest_saving_first():
    """[Note: candidates worth measuring]: "slow" runs the whole graph 4x slower than the best
    ("fast"), so even LOCAL_SPEEDUP times faster on a piece it cannot win; eager's region is no
    faster than its slowest op, which already takes all the two ops' share of "fast"'s time;
    "special" failed the whole graph and is not bounded, except by the switches its tiniest piece
    would add."""
    graph = DataflowGraph.from_graph(make_fx(_chain)(torch.randn(4, 4)).graph)
    eager_ms = [1.0, 1.0, 1.0, 1.0, 1.0, 0.01]
    assert graph.size == len(eager_ms)
    total = sum(eager_ms)
    costs = {Candidate(1 << u, "eager"): ms for u, ms in enumerate(eager_ms)}
    costs |= {Candidate(graph.full, "eager"): total, Candidate(graph.full, "fast"): total / 2}
    costs |= {
        Candidate(graph.full, "slow"): 2 * total * LOCAL_SPEEDUP,
        Candidate(graph.full, "special"): math.inf,
    }
    big, tiny = Candidate(0b111, "special"), Candidate(0b100000, "special")
    fine = [Candidate(0b11, "slow"), Candidate(0b110, "slow"), tiny, Candidate(0b11, "fast"), big]
    fine += [Candidate(0b11, "eager")]
    ranked, losers = rank_candidates(fine, _Bounds(graph, switch_ms=0.05), costs)
    assert set(losers) == {Candidate(0b11, "slow"), Candidate(0b110, "slow"), tiny, Candidate(0b11, "eager")}
    assert ranked == [big, Candidate(0b11, "fast")]  # big: 3 ops, unbounded, the most it could save


def test_nothing_is_bounded_before_eager_times_are_known():
    graph = DataflowGraph.from_graph(make_fx(_chain)(torch.randn(4, 4)).graph)
    fine = [Candidate(0b110, "a"), Candidate(0b1, "a"), Candidate(0b11, "b")]
    ranked, losers = rank_candidates(fine, _Bounds(graph, 0.0), {Candidate(graph.full, "a"): 1.0})
    assert losers == [] and ranked == [Candidate(0b1, "a"), Candidate(0b11, "b"), Candidate(0b110, "a")]


def test_progress_estimate_comes_from_the_time_measuring_took(tmp_path):
    """The seconds to go are the candidates left times what each took so far on its backend (here a
    0.15 s compile each), never more than the budget has left."""
    from torch_collage.backends.registry import get_spec
    from torch_collage.cache import CostCache
    from torch_collage.cost import CostModel, record_values
    from torch_collage.measure import Progress

    model, x = _mlp(), torch.randn(8, 32)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with registered_backend("sleepy", compile=_sleepy_compile):
        specs = {"eager": get_spec("eager"), "sleepy": get_spec("sleepy")}
        opts = CollageOptions(cache_dir=str(tmp_path), time_budget_s=30.0, **_FAST)
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path)))
        todo = [Candidate(1 << u, "sleepy") for u in range(6)]
        with Progress(cost, len(todo), enabled=False) as progress:
            progress.stage("candidates", todo)
            assert progress.eta_s() is None  # nothing measured yet to go by
            progress.measure(todo[0])
            progress.measure(todo[1])
            each = cost.predicted_s(todo[2])
            assert each is not None and each >= 0.15
            assert progress.eta_s() == pytest.approx(4 * each)
            cost.budget.seconds = cost.budget.spent() + 0.2  # almost spent
            assert progress.eta_s() <= 0.2


def test_a_backends_compile_prior_orders_the_first_whole_graphs(tmp_path):
    """On a machine where nothing was measured yet, a backend whose spec says its compiles are slow
    (``compile_s_per_op``) is predicted from that prior, so the whole graphs of backends without a
    prior (measured first) go before it; a rate measured on this machine replaces the prior."""
    from torch_collage.backends.registry import get_spec
    from torch_collage.cache import CostCache
    from torch_collage.cost import CostModel, record_values

    model, x = _mlp(), torch.randn(8, 32)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with (
        registered_backend("slow_prior", compile=_sleepy_compile, compile_s_per_op=0.5),
        registered_backend("no_prior", compile=_sleepy_compile),
    ):
        specs = {name: get_spec(name) for name in ("eager", "slow_prior", "no_prior")}
        opts = CollageOptions(cache_dir=str(tmp_path), time_budget_s=30.0, **_FAST)
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path)))
        slow, unknown = Candidate(graph.full, "slow_prior"), Candidate(graph.full, "no_prior")
        assert cost.predicted_s(slow) == pytest.approx(0.5 * graph.size)
        assert cost.predicted_s(unknown) is None
        cost.cost(slow)  # measured now: this search's own time replaces the prior
        assert cost.predicted_s(slow) < 0.5 * graph.size


def test_a_warm_compile_measures_the_whole_graphs_a_cold_cut_left_out(tmp_path):
    """[Note: a budget-cut search replays its cut]: a cold search that predicted a whole graph too
    slow for its budget (here from the backend's prior; on a busy machine, from slow compiles) left it
    out; once the backend's compiles are known to be fast, a warm compile with the same budget
    measures it, and the compile after that replays the grown cut without measuring."""
    from torch_collage.place import Placer
    from torch_collage.timing import QuietProbe

    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(8, 32)
    opts = {"backends": ["eager", "slowprior"], "cache_dir": str(tmp_path), "mode": "fast", **_FAST}
    placer = Placer(probe=QuietProbe())
    with registered_backend("slowprior", compile=_sleepy_compile, compile_s_per_op=5.0):
        cold = torch_collage.explain(model, x, time_budget_s=3.0, placer=placer, **opts).graphs[0]
        assert cold.unmeasured.get("whole graph on slowprior") == 1
        assert not math.isfinite(cold.single_backend_ms.get("slowprior", math.inf))
        other = nn.Sequential(
            nn.Linear(32, 16), nn.ReLU()
        ).eval()  # its rate on this machine replaces the prior
        torch_collage.explain(other, x, placer=placer, **opts)
        warm = torch_collage.explain(model, x, time_budget_s=3.0, placer=placer, **opts).graphs[0]
        assert math.isfinite(warm.single_backend_ms["slowprior"]) and warm.measured > 0
        assert "whole graph on slowprior" not in warm.unmeasured
        before = placer.measurements
        again = torch_collage.explain(model, x, time_budget_s=3.0, placer=placer, **opts).graphs[0]
    assert again.measured == 0 and placer.measurements == before
    assert again.single_backend_ms["slowprior"] == warm.single_backend_ms["slowprior"]

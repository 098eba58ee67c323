"""End to end with real backends: torch.compile(backend="collage") on tiny models (kept small: 2 cores)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random

import pytest
import torch
from torch import fx, nn

import torch_collage
from torch_collage.backends.registry import registered_backend
from torch_collage.cache import CostCache
from torch_zoo import get_model

_FAST = {"max_depth": 2, "repeats": 5, "warmup": 1}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_zoo_mlp_matches_eager_with_three_backends(tmp_path):
    torch._dynamo.reset()
    zoo = get_model("mlp")
    model, (x,) = zoo.build("tiny"), zoo.example_inputs("tiny")
    opts = {"backends": ["eager", "inductor", "onnxruntime"], "cache_dir": str(tmp_path), **_FAST}
    compiled = torch.compile(model, backend="collage", options=opts)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        x2 = torch.randn_like(x)
        torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-4, atol=1e-5)


def test_training_gradients_equal_eager(tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(4, 16)
    model(x).pow(2).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from torch_collage.entry import make_backend
    from torch_collage.options import CollageOptions

    opts = CollageOptions(backends=("eager", "inductor"), cache_dir=str(tmp_path), **_FAST)
    reports = []
    torch.compile(model, backend=make_backend(opts, reports.append))(x).pow(2).sum().backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert sorted(r.kind for r in reports) == ["backward", "forward"]  # both graphs were placed


def _quiet_placer(**kwargs):
    """A placer that takes the machine as quiet, so a cold search caches every timing whatever else
    the machine runs ([Note: quiet measurements]): tests that count a warm compile's timings use it."""
    from torch_collage.place import Placer
    from torch_collage.timing import QuietProbe

    return Placer(probe=QuietProbe(), **kwargs)


def test_warm_cache_measures_nothing(tmp_path):
    opts = {"backends": ["eager", "inductor"], "cache_dir": str(tmp_path), "search": "dp+refine", **_FAST}
    x = torch.randn(4, 16)
    placer = _quiet_placer()
    before_all = torch_collage.measurement_count()
    cold = torch_collage.explain(_mlp().eval(), x, placer=placer, **opts)
    assert cold.candidates_measured > 0 and placer.measurements >= cold.candidates_measured
    assert torch_collage.measurement_count() == before_all  # the default placer's count is its own
    before = placer.measurements
    warm = torch_collage.explain(_mlp().eval(), x, placer=placer, **opts)
    assert placer.measurements == before and warm.candidates_measured == 0
    assert [p.backend for p in warm.partitions] == [p.backend for p in cold.partitions]


def test_measurement_count_counts_the_default_placers_timings(tmp_path):
    before = torch_collage.measurement_count()
    report = torch_collage.explain(
        _mlp().eval(), torch.randn(4, 16), backends=["eager"], cache_dir=str(tmp_path), **_FAST
    )
    assert torch_collage.measurement_count() - before >= report.candidates_measured > 0


def test_warm_compile_stops_where_the_cold_budget_did(tmp_path):
    """Past its time budget a cold search measures only the essential candidates; replaying it
    from the cache is fast, and must not measure the candidates the cold search skipped."""
    opts = {"backends": ["eager", "inductor"], "cache_dir": str(tmp_path), "search": "dp", **_FAST}
    x = torch.randn(4, 16)
    placer = _quiet_placer()
    cold = torch_collage.explain(_mlp().eval(), x, time_budget_s=0.05, placer=placer, **opts)
    assert cold.candidates_measured > 0
    before = placer.measurements
    warm = torch_collage.explain(_mlp().eval(), x, time_budget_s=0.05, placer=placer, **opts)
    assert placer.measurements == before and warm.candidates_measured == 0


def test_warm_compile_replays_the_refinement(tmp_path):
    """A refinement cut off by its time budget must not go on searching when compiled warm."""
    from torch_collage.place import Stages
    from torch_collage.refine import refine

    calls = []
    placer = _quiet_placer(stages=Stages(refine=lambda *a, **k: calls.append(1) or refine(*a, **k)))
    opts = {"backends": ["eager", "inductor"], "cache_dir": str(tmp_path), "search": "dp+refine", **_FAST}
    x = torch.randn(4, 16)
    cold = torch_collage.explain(_mlp().eval(), x, placer=placer, **opts)
    assert len(calls) == 1
    warm = torch_collage.explain(_mlp().eval(), x, placer=placer, **opts)
    assert len(calls) == 1  # replayed from the cache, not refined again
    assert [(p.backend, p.nodes) for p in warm.partitions] == [(p.backend, p.nodes) for p in cold.partitions]


def test_warm_compile_measures_nothing_after_refinement_merged_partitions(tmp_path):
    """A move that refinement keeps can merge neighbouring partitions into a region no candidate
    covered (its cost predicted as a sum). The cold compile measures such regions, so that
    replaying the refined placement warm finds every cost cached. The search is steered with
    stand-ins passed to the placer (the DP starts from backends alternating per unit; a comparison
    prefers fewer partitions short of the whole graph); compiling and measuring are real."""
    from torch_collage.candidates import Candidate
    from torch_collage.place import Stages
    from torch_collage.refine import refine
    from torch_collage.search import Partition, Placement

    def alternating(graph, cands, cost, switch):
        parts = []
        for i in range(len(graph.units)):
            backend = ("eager", "inductor")[i % 2]
            parts.append(Partition(1 << i, backend, cost(Candidate(1 << i, backend))))
        return Placement.priced(parts, switch)

    def fewer_partitions(model, graph, items, rounds=2):
        def score(p):
            return math.inf if any(q.mask == graph.full for q in p.partitions) else len(p.partitions)

        return [score(p) for p, _ in items]

    refined = []
    placer = _quiet_placer(
        stages=Stages(
            search=alternating,
            compare=fewer_partitions,
            refine=lambda *a, **k: refined.append(refine(*a, **k)) or refined[-1],
        )
    )
    opts = {
        "backends": ["eager", "inductor"], "cache_dir": str(tmp_path), "search": "dp+refine", **_FAST,
        "max_depth": 1,
    }  # fmt: skip
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    torch_collage.explain(model.eval(), x, placer=placer, **opts)
    assert len(refined) == 1
    assert any(bin(p.mask).count("1") > 1 for p in refined[0].partitions)  # a merged region was kept
    before = placer.measurements
    assert before > 0
    warm = torch_collage.explain(model.eval(), x, placer=placer, **opts)
    assert placer.measurements == before and warm.candidates_measured == 0
    assert len(refined) == 1  # replayed, not refined again


def test_explain_report_and_picture(tmp_path):
    report = torch_collage.explain(
        _mlp().eval(), torch.randn(4, 16), backends=["eager", "inductor"], cache_dir=str(tmp_path), **_FAST
    )
    g = report.graphs[0]
    assert g.kind == "inference" and set(g.single_backend_ms) == {"eager", "inductor"}
    assert report.measured_ms > 0 and report.predicted_ms > 0 and report.search_s > 0
    placed = [n for p in report.partitions for n in p.nodes]
    assert placed and len(placed) == len(set(placed))  # each op in exactly one partition
    text = report.to_markdown()
    assert "| backend |" in text and "Whole graph on one backend" in text
    report.save(str(tmp_path / "placement.png"))
    assert (tmp_path / "placement.png").stat().st_size > 0


def test_explain_markdown_ranks_the_end_to_end_contenders():
    from torch_collage.explain import ExplainReport
    from torch_collage.report import GraphReport, PartitionReport

    part = PartitionReport("openvino", ["addmm"], 2.5, "onnxruntime", 2.9)
    e2e = {"onnxruntime": 3.1, "mixed": 2.8, "openvino": 2.6}
    g = GraphReport("inference", [part], [], 2.5, 2.6, {"openvino": 2.5, "onnxruntime": 2.9}, "openvino",
                    4, 3, 1.0, end_to_end_ms=e2e)  # fmt: skip
    text = ExplainReport([g]).to_markdown()
    line = next(ln for ln in text.splitlines() if ln.startswith("End to end"))
    assert line == "End to end, timed side by side: openvino 2.600 ms; mixed 2.800 ms; onnxruntime 3.100 ms"
    bare = ExplainReport([dataclasses.replace(g, end_to_end_ms={})]).to_markdown()
    assert "End to end" not in bare  # no contender: no line


def _mm_compile(gm: fx.GraphModule, example_inputs):
    return gm


def test_user_backend_is_placed_like_builtins(tmp_path):
    # GEMMs that take far longer than a switch between backends, so that neither is bounded out as a
    # certain loser ([Note: candidates worth measuring]), as the tiny MLP's 5 us GEMMs sometimes were
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    with registered_backend("mm_only", compile=_mm_compile, supports=["aten.mm", "aten.addmm"]):
        report = torch_collage.explain(
            model, torch.randn(64, 256), backends=["mm_only"], cache_dir=str(tmp_path), **_FAST
        )
    g = report.graphs[0]
    assert g.usable["mm_only"] == 2  # the two addmm nodes, measured and checked
    assert "mm_only" not in g.single_backend_ms or g.single_backend_ms["mm_only"] == float("inf")
    for p in report.partitions:
        if p.backend == "mm_only":
            assert all(n.startswith("addmm") for n in p.nodes)


def _broken_compile(gm: fx.GraphModule, example_inputs):
    raise RuntimeError("this backend is broken")


def test_failing_backend_falls_back_with_one_warning(tmp_path, caplog):
    with registered_backend("broken", compile=_broken_compile), caplog.at_level(logging.WARNING):
        report = torch_collage.explain(
            _mlp().eval(), torch.randn(4, 16), backends=["broken"], cache_dir=str(tmp_path), **_FAST
        )
    assert report.backends_used == ["eager"]
    warnings = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(warnings) == 1 and "this backend is broken" in warnings[0].getMessage()


def test_failing_backend_raises_when_asked(tmp_path):
    with registered_backend("broken", compile=_broken_compile), pytest.raises(Exception, match="broken"):
        torch_collage.explain(
            _mlp().eval(),
            torch.randn(4, 16),
            backends=["broken"],
            cache_dir=str(tmp_path),
            on_backend_failure="raise",
            **_FAST,
        )


def test_corrupt_cache_is_set_aside(tmp_path, caplog):
    (tmp_path / "costs.sqlite").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING):
        cache = CostCache(str(tmp_path))
    assert cache.get("k") is None and any("unreadable" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.glob("costs.broken-*"))


def test_repeated_blocks_are_measured_once(tmp_path):
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.candidates import enumerate_candidates
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions
    from torch_collage.timing import QuietProbe

    x = torch.randn(8, 8)
    gm = make_fx(lambda t: t.relu().sin().relu().sin())(x)
    graph = DataflowGraph.from_graph(gm.graph)
    opts = CollageOptions(cache_dir=str(tmp_path), repeats=2, warmup=0)
    model = CostModel(
        gm, graph, record_values(gm, [x]), {"eager": get_spec("eager")}, opts, CostCache(str(tmp_path)),
        probe=QuietProbe(),  # a busy machine's retimings would count too: [Note: quiet measurements]
    )  # fmt: skip
    cands = enumerate_candidates(graph, [get_spec("eager")], max_depth=2)
    for cand in cands:
        model.cost(cand)
    # 7 candidates, 4 distinct structures: relu, sin, relu+sin, sin+relu
    assert len(cands) == 7 and model.measured == 4


@pytest.mark.parametrize(("mixed_ms", "want"), [(5.0, "eager"), (1.0, "mixed"), (1.95, "eager")])
def test_mixed_placement_only_chosen_when_faster_end_to_end(tmp_path, mixed_ms, want):
    """Faster by at least MIXED_MARGIN ([Note: a mixed placement must win clearly]): 1.95 against
    2.0 ms is not."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.choose import choose
    from torch_collage.cost import CostModel, record_values
    from torch_collage.endtoend import EndToEnd
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions
    from torch_collage.search import Partition, Placement

    model, x = _mlp().eval(), torch.randn(4, 16)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with registered_backend("mm_only", compile=_mm_compile, supports=["aten.addmm"]):
        specs = {"eager": get_spec("eager"), "mm_only": get_spec("mm_only")}
        opts = CollageOptions(cache_dir=str(tmp_path))
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path)))
        parts = [
            Partition(1 << i, "mm_only" if graph.units[i][0].name.startswith("addmm") else "eager", 1.0)
            for i in range(graph.size)
        ]

        def compare(m, g, items, rounds=2):
            return [mixed_ms if len(p.partitions) > 1 else 2.0 for p, _ in items]

        choice = choose(EndToEnd(gm, cost, compare), Placement(tuple(parts), 1.0), {"eager": 2.0})
    assert choice.chosen == want and choice.measured_ms == (mixed_ms if want == "mixed" else 2.0)
    assert choice.compared == {"eager": 2.0, "mixed": mixed_ms}
    torch.testing.assert_close(choice.assembled(x), model(x))


def test_new_input_shapes_are_placed_again(tmp_path):
    torch._dynamo.reset()
    model = _mlp().eval()
    opts = {"backends": ["eager", "inductor"], "cache_dir": str(tmp_path), **_FAST, "max_depth": 1}
    compiled = torch.compile(model, backend="collage", options=opts)
    with torch.no_grad():
        for batch in (4, 6, 9):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_close_single_backends_are_timed_again_side_by_side(tmp_path):
    """One cost measurement per whole graph is noisy: backends within CLOSE_FACTOR of the best are
    timed again end to end, and the fastest there wins; a far slower one is not timed at all."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.choose import CLOSE_FACTOR, choose, single
    from torch_collage.cost import CostModel, record_values
    from torch_collage.endtoend import EndToEnd
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model, x = _mlp().eval(), torch.randn(4, 16)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    timed: list[list[str]] = []
    e2e = {"eager": 1.0, "copy": 0.8}  # end to end, "copy" is faster though measured slower alone

    def fake_e2e(m, g, items, rounds=2):
        timed.append([p.partitions[0].backend for p, _ in items])
        return [e2e[p.partitions[0].backend] for p, _ in items]

    with registered_backend("copy", compile=_mm_compile), registered_backend("slow", compile=_mm_compile):
        specs = {name: get_spec(name) for name in ("eager", "copy", "slow")}
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, CollageOptions(cache_dir=str(tmp_path)),
                         CostCache(str(tmp_path)))  # fmt: skip
        singles = {"eager": 1.0, "copy": 1.2, "slow": 1.0 * CLOSE_FACTOR + 0.1}
        choice = choose(EndToEnd(gm, cost, fake_e2e), single(graph, "eager", 1.0), singles)
    assert timed == [["copy", "eager"]] and choice.chosen == "copy" and choice.measured_ms == 0.8
    assert choice.compared == {"copy": 0.8, "eager": 1.0}  # what the report's end-to-end line shows
    torch.testing.assert_close(choice.assembled(x), model(x))


@contextlib.contextmanager
def _timed_mlp(tmp_path, time_call):
    """A cost model of a small MLP with backends "eager", "copy" and "slow", whose ``time_call`` is
    ``time_call(name)`` for an item built by ``items[name]``; yields ``(cost, graph, items)``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.choose import single
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model, x = _mlp().eval(), torch.randn(4, 16)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with registered_backend("copy", compile=_mm_compile), registered_backend("slow", compile=_mm_compile):
        specs = {name: get_spec(name) for name in ("eager", "copy", "slow")}
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, CollageOptions(cache_dir=str(tmp_path)),
                         CostCache(str(tmp_path)))  # fmt: skip
        # the "assembled graph" an item's assemble returns is its backend's name
        cost.time_call = lambda call: time_call(call.args[0])
        yield cost, graph, {b: (single(graph, b, 1.0), lambda b=b: b) for b in specs}


def _fake_timed_e2e(tmp_path, times: dict[str, list[float]]) -> tuple[list[float], list[str]]:
    """e2e_many_ms over single-backend placements of a small MLP whose end-to-end timings are
    ``times[backend]``, served in order; returns its result and the order the calls were timed in."""
    from torch_collage.endtoend import e2e_many_ms

    order: list[str] = []
    served = {name: iter(ms) for name, ms in times.items()}

    def fake_time_call(name: str) -> float:
        order.append(name)
        return next(served[name])

    with _timed_mlp(tmp_path, fake_time_call) as (cost, graph, item):
        return e2e_many_ms(cost, graph, [item[b] for b in times], rounds=3), order


def test_end_to_end_times_are_reused_only_for_the_same_comparison(tmp_path):
    """A placement's end-to-end time is compared only with times measured beside it: a new
    comparison times every member again; the same comparison again (a warm compile) times nothing
    ([Note: end-to-end times are cached per comparison])."""
    from torch_collage.endtoend import e2e_many_ms

    timed: list[str] = []
    speed = {"eager": random.uniform(1.0, 2.0), "copy": random.uniform(3.0, 4.0), "slow": 9.0}

    def fake_time_call(name: str) -> float:
        timed.append(name)
        return speed[name]

    with _timed_mlp(tmp_path, fake_time_call) as (cost, graph, item):
        first = e2e_many_ms(cost, graph, [item["eager"], item["copy"]])
        assert sorted(set(timed)) == ["copy", "eager"] and first == pytest.approx(
            [speed["eager"], speed["copy"]]
        )
        timed.clear()
        speed["eager"] *= 2  # the machine slowed down: eager's earlier time is not comparable any more
        second = e2e_many_ms(cost, graph, [item["eager"], item["slow"]])
        assert sorted(set(timed)) == ["eager", "slow"] and second[0] == pytest.approx(speed["eager"])
        timed.clear()
        assert e2e_many_ms(cost, graph, [item["eager"], item["copy"]]) == first and timed == []


def test_end_to_end_timing_rotates_the_order_and_compares_rounds_paired(tmp_path):
    """No placement is always timed first (right after the previous compile); the machine's speed
    halves in round 2, and "copy" wins round 3 alone: paired round by round, eager is 5% faster,
    where the best round would have picked "copy" ([Note: paired end-to-end rounds])."""
    times = {"eager": [2.0, 4.0, 2.0], "copy": [2.1, 4.2, 1.9], "slow": [9.0, 18.0, 9.0]}
    got, order = _fake_timed_e2e(tmp_path, times)
    assert order == ["eager", "copy", "slow", "copy", "slow", "eager", "slow", "eager", "copy"]
    assert got[0] < got[1] < got[2]
    assert got[1] / got[0] == pytest.approx(1.05) and got[2] / got[0] == pytest.approx(4.5)
    assert 2.0 <= got[0] <= 4.0


def test_end_to_end_run_off_between_the_two_closest(tmp_path):
    """Eager and "copy" are within 1% over three rounds: those two alone run more rounds until they
    separate (after three here); "slow" is not timed again."""
    times = {"eager": [2.0] * 6, "copy": [2.02, 1.99, 2.01, 2.2, 2.2, 2.2], "slow": [5.0] * 3}
    got, order = _fake_timed_e2e(tmp_path, times)
    assert order[9:] == ["copy", "eager", "eager", "copy", "copy", "eager"]  # still rotating
    assert order.count("slow") == 3
    assert got[0] < got[1] < got[2] and got[1] / got[0] == pytest.approx(1.054, rel=1e-3)


def _drifting_compile(gm: fx.GraphModule, example_inputs):
    """Right on its first call (the check after compiling), then off by 1%: a backend whose results
    change after warm-up, which only the check of the assembled placement can catch."""
    calls = [0]

    def run(*args):
        calls[0] += 1
        out = gm(*args)
        return out if calls[0] == 1 else tuple(o * 1.01 for o in out)

    return run


@pytest.mark.parametrize(("backend", "want"), [(_drifting_compile, "eager"), (_mm_compile, "mixed")])
def test_assembled_placement_is_checked_against_eager(tmp_path, caplog, backend, want):
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.choose import Choice, verify
    from torch_collage.cost import CostModel, record_values
    from torch_collage.endtoend import EndToEnd, assemble
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions
    from torch_collage.search import Partition, Placement

    model, x = _mlp().eval(), torch.randn(4, 16)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    with (
        registered_backend("mm_part", compile=backend, supports=["aten.addmm"]),
        caplog.at_level(logging.WARNING),
    ):
        specs = {"eager": get_spec("eager"), "mm_part": get_spec("mm_part")}
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, CollageOptions(cache_dir=str(tmp_path)),
                         CostCache(str(tmp_path)))  # fmt: skip
        parts = [
            Partition(1 << i, "mm_part" if graph.units[i][0].name.startswith("addmm") else "eager", 1.0)
            for i in range(graph.size)
        ]
        mixed = assemble(gm, Placement(tuple(parts), 1.0), cost)
        assert len(mixed.steps) > 1  # the candidate check passed: the drift shows only afterwards
        checked = verify(EndToEnd(gm, cost), Choice(mixed, 1.0, "mixed"), [x])
        assembled, chosen = checked.assembled, checked.chosen
    assert chosen == want
    assert [s.backend for s in assembled.steps] == (
        ["eager"] if want == "eager" else [s.backend for s in mixed.steps]
    )
    drift_warned = any("differs from eager" in r.getMessage() for r in caplog.records)
    assert drift_warned == (want == "eager")
    torch.testing.assert_close(assembled(x), model(x))


def test_fast_mode_measures_whole_graphs_only(tmp_path):
    """mode="fast": one candidate per backend (the whole graph), the fastest end to end runs it."""
    backends = ["eager", "inductor"]
    model, x = _mlp().eval(), torch.randn(4, 16)
    report = torch_collage.explain(model, x, backends=backends, mode="fast", cache_dir=str(tmp_path), **_FAST)
    (graph,) = report.graphs
    assert graph.candidates == len(backends) and len(graph.partitions) == 1
    assert graph.partitions[0].backend in backends


def _failing_compile(gm, example_inputs):
    raise RuntimeError("lowering failed\nno kernel for aten.addmm.default with these strides")


def test_whole_graph_failures_keep_the_full_reason_and_are_listed_first(tmp_path):
    with registered_backend("failing", compile=_failing_compile):
        report = torch_collage.explain(
            _mlp().eval(), torch.randn(4, 16), backends=["eager", "failing"], cache_dir=str(tmp_path), **_FAST
        )
    (graph,) = report.graphs
    why = graph.whole_graph_failures["failing"]
    assert "lowering failed" in why and "aten.addmm.default" in why  # the second line is kept
    text = report.to_markdown()
    assert text.index("failing failed on the whole graph") < text.index("| # | backend")


def test_consecutive_eager_partitions_run_as_one(tmp_path):
    """[Note: eager runs are one partition]: a placement of eager singletons around one partition of
    another backend runs as three steps, including runs whose pieces do not touch (parallel
    branches), and gives eager's result; the report lists the partitions as they run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.cost import CostModel, record_values
    from torch_collage.endtoend import assemble
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions
    from torch_collage.search import Partition, Placement, merge_eager_runs

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.a(x)) + torch.sigmoid(self.b(x))  # two branches of eager singletons
            return torch.tanh(self.c(h)) * 2

    model, x = Branches().eval(), torch.randn(4, 16)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    last_mm = max(i for i in range(graph.size) if graph.units[i][0].name.startswith("addmm"))
    with registered_backend("mm_part", compile=lambda g, ins: g, supports=["aten.addmm"]):
        specs = {"eager": get_spec("eager"), "mm_part": get_spec("mm_part")}
        cost = CostModel(gm, graph, record_values(gm, [x]), specs, CollageOptions(cache_dir=str(tmp_path)),
                         CostCache(str(tmp_path)))  # fmt: skip
        parts = tuple(
            Partition(1 << i, "mm_part" if i == last_mm else "eager", 1.0) for i in range(graph.size)
        )
        placement = Placement(parts, float(graph.size))
        merged = merge_eager_runs(placement)
        assert [p.backend for p in merged.partitions] == ["eager", "mm_part", "eager"]
        assert merged.partitions[0].cost_ms == float(last_mm)  # priced as its parts
        assert sum(p.mask for p in merged.partitions) == graph.full
        assembled = assemble(gm, placement, cost)
    assert [s.backend for s in assembled.steps] == ["eager", "mm_part", "eager"]
    torch.testing.assert_close(assembled(x), model(x))

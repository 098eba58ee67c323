"""Search, graph and candidate unit tests with a fixed-cost estimator (no backends compiled)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.backends.base import BackendSpec, OpRule
from torch_collage.candidates import Candidate, enumerate_candidates
from torch_collage.graph import DataflowGraph, bits
from torch_collage.search import (
    Partition,
    Placement,
    brute_force_cover,
    merge_consecutive,
    search_cover,
)


def _chain(x: torch.Tensor) -> torch.Tensor:
    return ((x.relu() * 2).sin() + 1).cos().exp()


def _diamond(x: torch.Tensor) -> torch.Tensor:
    a = x.relu()
    b, c = a.sin(), a.cos()
    d = b * c
    e = d.exp() + a.tanh()
    return e.neg()


def _graph(fn) -> DataflowGraph:
    gm = make_fx(fn)(torch.randn(4, 4))
    return DataflowGraph.from_graph(gm.graph)


def _spec(name: str, supports=("*",), fusion="region") -> BackendSpec:
    return BackendSpec(name=name, compile=lambda gm, ex: gm, supports=supports, fusion=fusion)


def _naive_convex(graph: DataflowGraph, mask: int) -> bool:
    """Convex by explicit path search: no outside unit both reached from and reaching the set."""
    for k in range(graph.size):
        if mask >> k & 1:
            continue
        from_set = any(graph.descendants[i] >> k & 1 for i in bits(mask))
        to_set = any(graph.ancestors[i] >> k & 1 for i in bits(mask))
        if from_set and to_set:
            return False
    return True


def _fixed_costs(cands, seed: int):
    rng = random.Random(seed)
    table = {c: rng.uniform(0.1, 1.0) * c.size ** rng.uniform(0.5, 1.0) for c in cands}
    return table.__getitem__


def _switch(seed: int):
    rng = random.Random(seed)
    table = {}

    def switch(a: str, b: str) -> float:
        return 0.0 if a == b else table.setdefault((a, b), rng.uniform(0.0, 0.5))

    return switch


def test_graph_units_and_reachability():
    g = _graph(_diamond)
    names = [g.units[i][0].name for i in range(g.size)]
    assert names[0] == "relu"
    relu, sin, cos, mul = (names.index(n) for n in ("relu", "sin", "cos", "mul"))
    assert g.descendants[relu] >> mul & 1 and g.ancestors[mul] >> relu & 1
    assert not g.is_convex(1 << relu | 1 << mul)  # sin/cos lie between them
    assert g.is_convex(1 << relu | 1 << sin | 1 << cos | 1 << mul)


@pytest.mark.parametrize("fn", [_chain, _diamond])
@pytest.mark.parametrize("fusion", ["single", "elementwise_epilogue", "region"])
def test_candidates_are_convex_connected_and_unique(fn, fusion):
    g = _graph(fn)
    cands = enumerate_candidates(g, [_spec("a", fusion=fusion)], max_depth=4)
    assert len(cands) == len(set(cands))
    for c in cands:
        assert _naive_convex(g, c.mask), g.names(c.mask)
        assert c.size <= (1 if fusion == "single" else 4)
    assert {c.mask for c in cands if c.size == 1} == {1 << i for i in range(g.size)}


def test_candidates_respect_supported_ops():
    g = _graph(_diamond)
    spec = _spec("trig", supports=[OpRule(op="aten.sin"), OpRule(op="aten.cos"), "aten.mul"])
    cands = enumerate_candidates(g, [spec], max_depth=4)
    allowed = {"sin", "cos", "mul"}
    assert cands and all(set(g.names(c.mask)) <= allowed for c in cands)
    assert any(set(g.names(c.mask)) == allowed for c in cands)


def test_op_rule_predicates():
    gm = make_fx(_chain)(torch.randn(4, 4))
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert OpRule(op="aten.relu", max_rank=2).matches(relu)
    assert not OpRule(op="aten.relu", min_rank=3).matches(relu)
    assert not OpRule(op="aten.relu", dtypes=frozenset({torch.float16})).matches(relu)
    assert not OpRule(op="aten.relu", where=lambda n: False).matches(relu)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fn", [_chain, _diamond])
def test_search_equals_brute_force(fn, seed):
    g = _graph(fn)
    specs = [_spec("eager"), _spec("fast", fusion="region"), _spec("trig", supports=["aten.sin", "aten.cos"])]
    cands = enumerate_candidates(g, specs, max_depth=3)
    cost, switch = _fixed_costs(cands, seed), _switch(seed)
    placement = search_cover(g, cands, cost, switch)
    assert placement.predicted_ms == pytest.approx(brute_force_cover(g, cands, cost, switch))
    covered = 0
    for p in placement.partitions:
        assert not covered & p.mask and not g.external_preds(p.mask) & ~covered  # runs in order
        covered |= p.mask
    assert covered == g.full


def _all_set_partitions(n: int):
    if n == 0:
        yield []
        return
    for rest in _all_set_partitions(n - 1):
        for i in range(len(rest)):
            yield [*rest[:i], rest[i] | 1 << (n - 1), *rest[i + 1 :]]
        yield [*rest, 1 << (n - 1)]


@pytest.mark.parametrize("seed", range(4))
def test_search_is_exact_on_a_chain_against_every_partition(seed):
    g = _graph(_chain)
    cands = enumerate_candidates(g, [_spec("a"), _spec("b")], max_depth=g.size)
    cost = _fixed_costs(cands, seed)
    by_mask: dict[int, list[Candidate]] = {}
    for c in cands:
        by_mask.setdefault(c.mask, []).append(c)
    best = min(
        sum(min(cost(c) for c in by_mask[m]) for m in parts)
        for parts in _all_set_partitions(g.size)
        if all(m in by_mask for m in parts)
    )
    assert search_cover(g, cands, cost, lambda a, b: 0.0).predicted_ms == pytest.approx(best)


def _branches(x: torch.Tensor) -> torch.Tensor:
    return x.sin() + x.cos() + x.exp() + x.neg() + x.tanh()


def test_only_candidates_at_the_lowest_uncovered_unit_are_expanded():
    g = _graph(_branches)  # 5 independent ops, then 4 adds: 2**5 ideals among the branches alone
    cands = enumerate_candidates(g, [_spec("eager", fusion="single")], max_depth=1)
    stats: dict[str, int] = {}
    search_cover(g, cands, lambda c: 1.0, lambda a, b: 0.0, stats)
    assert stats["states"] <= g.size + 1  # one state per prefix: no permutations of the branches
    assert g.size >= 9


def test_infinite_costs_are_avoided_and_switch_costs_counted():
    g = _graph(_chain)
    cands = enumerate_candidates(g, [_spec("eager", fusion="single"), _spec("fast", fusion="single")], 1)
    cost = lambda c: (
        float("inf") if (c.backend == "fast" and c.lowest == 2) else (0.5 if c.backend == "fast" else 1.0)
    )
    cheap = search_cover(g, cands, cost, lambda a, b: 0.0)
    assert [p.backend for p in cheap.partitions][2] == "eager"
    costly = search_cover(g, cands, cost, lambda a, b: 0.0 if a == b else 10.0)
    assert {p.backend for p in costly.partitions} == {"eager"}  # switching never pays here
    assert costly.predicted_ms == pytest.approx(1.0 * g.size)


def test_merge_consecutive_same_backend():
    g = _graph(_chain)
    parts = tuple(Partition(1 << i, "a" if i < 3 else "b", 1.0) for i in range(g.size))
    merged = merge_consecutive(Placement(parts, float(g.size)), g)
    assert [p.backend for p in merged.partitions] == ["a", "b"]
    assert merged.partitions[0].mask == 0b111 and merged.partitions[0].cost_ms == 3.0


class _FixedModel:
    """What ``measure.merge_measured`` asks of a cost model, with fixed costs; records what it measured."""

    def __init__(self, table: dict[Candidate, float], budget_s: float = float("inf")):
        from torch_collage.timing import Budget

        self.table, self.measured, self.budget = table, [], Budget(budget_s)

    def predicted_s(self, cand: Candidate) -> float:
        return 1.0

    def was_cut(self, what: str) -> bool:
        return False

    def cut(self, what: str, kind: str) -> None:
        self.budget.skip(kind)

    def cost(self, cand: Candidate) -> float:
        self.measured.append(cand)
        return self.table[cand]

    def switch_cost(self, a: str, b: str) -> float:
        return 0.0 if a == b else 0.25


@pytest.mark.parametrize(("merged_ms", "kept_apart"), [(2.5, False), (3.5, True), (float("inf"), True)])
def test_merged_region_kept_only_where_no_slower_than_its_parts(merged_ms, kept_apart):
    """[Note: merged regions are measured]: a run of same-backend partitions becomes one region only
    where that region measures no slower than its parts summed (or compiles at all)."""
    from torch_collage.measure import merge_measured

    g = _graph(_chain)  # 6 units in a chain
    tail = g.full & ~0b111
    parts = tuple(Partition(1 << i, "a" if i < 3 else "b", 1.0) for i in range(g.size))
    model = _FixedModel({Candidate(0b111, "a"): merged_ms})
    costs: dict[Candidate, float] = {Candidate(tail, "b"): 1.5}  # measured before: not again
    out = merge_measured(Placement(parts, 5.0), g, model, costs)
    assert model.measured == [Candidate(0b111, "a")]
    assert out.partitions[-1] == Partition(tail, "b", 1.5)
    if kept_apart:
        assert [p.mask for p in out.partitions] == [0b1, 0b10, 0b100, tail]
        assert out.predicted_ms == pytest.approx(3.0 + 0.25 + 1.5)
    else:
        assert [p.mask for p in out.partitions] == [0b111, tail]
        assert out.predicted_ms == pytest.approx(merged_ms + 0.25 + 1.5)
    assert costs[Candidate(0b111, "a")] == merged_ms


def test_every_cover_of_the_search_space_is_acyclic():
    g = _graph(_diamond)
    cands = enumerate_candidates(g, [_spec("a"), _spec("b", fusion="single")], max_depth=3)
    for seed in range(3):
        placement = search_cover(g, cands, _fixed_costs(cands, seed), lambda a, b: 0.0)
        owner = {i: k for k, p in enumerate(placement.partitions) for i in bits(p.mask)}
        for i, j in itertools.product(range(g.size), repeat=2):
            if g.preds[j] >> i & 1:
                assert owner[i] <= owner[j]  # edges only go forward in execution order


def test_empty_fx_graph():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(x)
    assert DataflowGraph.from_graph(graph).size == 0


def test_refine_keeps_a_measured_improvement_only():
    from torch_collage.refine import refine

    g = _graph(_chain)
    start = Placement.priced([Partition(g.full, "a", 5.0)], lambda a, b: 0.0)
    cost = lambda c: 4.0 if c.backend == "b" else 5.0
    switch = lambda a, b: 0.0
    compared: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def timed(b_ms: float):
        def compare(p: Placement, q: Placement) -> tuple[float, float]:
            compared.append((p.backends, q.backends))
            ms = {("a",): 3.0, ("b",): b_ms}
            return ms[p.backends], ms[q.backends]

        return compare

    assert refine(start, g, ["a", "b"], cost, switch, timed(1.0), budget_s=5).backends == ("b",)
    # each move is timed beside the current placement ([Note: end-to-end times are cached per comparison])
    assert compared[0] == (("a",), ("b",))
    assert refine(start, g, ["a", "b"], cost, switch, timed(9.0), budget_s=5).backends == ("a",)


def test_placement_priced_adds_switch_costs():
    parts = [Partition(1, "a", 1.0), Partition(2, "b", 2.0), Partition(4, "b", 3.0)]
    assert Placement.priced(parts, lambda a, b: 0.5 if a != b else 0.0).predicted_ms == pytest.approx(6.5)


def test_patterns_add_fused_chains_beyond_the_fusion_style():
    g = _graph(_chain)  # relu, mul, sin, add, cos, exp
    spec = BackendSpec(
        name="p", compile=lambda gm, ex: gm, fusion="single", patterns=(("aten.sin", "aten.add", "aten.cos"),)
    )
    cands = enumerate_candidates(g, [spec], max_depth=4)
    multi = [g.names(c.mask) for c in cands if c.size > 1]
    assert multi == [["sin", "add", "cos"]]


def test_outputs_match_at_the_tensors_scale():
    """[Note: tolerance at the tensor's scale]: summation-order error passes, wrong results do not."""
    from torch_collage.cost import outputs_match

    g = torch.Generator().manual_seed(3)
    want = torch.randn(64, 64, generator=g) * 300
    want[0, :8] = 1e-6  # near-zero outputs beside values in the hundreds
    reordered = want + torch.randn(64, 64, generator=g) * 5e-4  # fp32-sum-order sized noise
    assert outputs_match([reordered], [want], rtol=1e-3, atol=1e-4) == ""
    wrong = want.clone()
    wrong[3, 5] = -wrong[3, 5] + 50.0  # one wrong element, at the output's scale
    assert "differs from eager" in outputs_match([wrong], [want], rtol=1e-3, atol=1e-4)
    nan = want.clone()
    nan[1, 1] = float("nan")
    assert "NaN" in outputs_match([nan], [want], rtol=1e-3, atol=1e-4)
    assert "differs" in outputs_match([torch.tensor([1, 2])], [torch.tensor([1, 3])], rtol=1e-3, atol=1e-4)
    assert "is (2,)" in outputs_match([torch.zeros(2)], [torch.zeros(3)], rtol=1e-3, atol=1e-4)


def test_low_precision_outputs_are_judged_at_their_dtype_s_rounding():
    """[Note: tolerance of low-precision outputs]: an error of a few bfloat16 epsilons of the largest
    output passes in bfloat16 and fails in float32; an error beyond bfloat16's tolerance fails."""
    from torch_collage.cost import outputs_match

    g = torch.Generator().manual_seed(4)
    want = torch.randn(32, 64, generator=g) * 3
    off = want + want.abs().max() * 6e-3 * torch.randn(32, 64, generator=g).clamp(-1, 1)
    assert outputs_match([off.bfloat16()], [want.bfloat16()], rtol=1e-3, atol=1e-4) == ""
    assert "differs from eager" in outputs_match([off], [want], rtol=1e-3, atol=1e-4)
    far = want + want.abs().max() * 5e-2 * torch.randn(32, 64, generator=g).clamp(-1, 1)
    assert "differs from eager" in outputs_match([far.bfloat16()], [want.bfloat16()], rtol=1e-3, atol=1e-4)


def test_a_bfloat16_model_can_be_placed_on_inductor(tmp_path):
    """A bfloat16 MLP whose Inductor graph keeps fused intermediates in float32 (off by ~6e-3 of its
    largest output): Inductor's whole graph is checked, not rejected, and the result is close to eager's."""
    from torch_collage.entry import make_backend
    from torch_collage.options import CollageOptions
    from torch_collage.place import Placer
    from torch_collage.timing import QuietProbe

    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512), torch.nn.Linear(512, 64)]
    model = torch.nn.Sequential(*layers).eval().to(torch.bfloat16)
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    reports: list = []
    opts = CollageOptions(backends=("inductor",), mode="fast", cache_dir=str(tmp_path), progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend(opts, reports.append, Placer(probe=QuietProbe())))
    with torch.no_grad():
        got, want = compiled(x), model(x)
    torch._dynamo.reset()
    (report,) = reports
    assert "inductor" not in report.whole_graph_failures, report.whole_graph_failures
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1.6e-2 * want.abs().max().item())


def test_fewer_runtimes_moves_partitions_a_backend_ran_within_tolerance_onto_fewer_pools() -> None:
    """[Note: fewer runtimes]: the variant keeps eager's partitions, moves every partition that one
    backend measured within 5% of its cost, and leaves the fewest thread pools."""
    from torch_collage.measure import FEWER_RUNTIMES_TOLERANCE, fewer_runtimes
    from torch_collage.search import Partition, Placement

    rng = random.Random(7)
    layer = [rng.uniform(0.5, 2.0) for _ in range(4)]
    parts = [Partition(1 << 0, "inductor", 0.3)]
    for i, ms in enumerate(layer):  # runtime layer, then the specialist's attention, then eager
        parts += [
            Partition(1 << (3 * i + 1), "onnxruntime", ms),
            Partition(1 << (3 * i + 2), "torch_cp", 1.8),
        ]
        parts.append(Partition(1 << (3 * i + 3), "eager", 0.01))
    parts.append(Partition(1 << 13, "openvino", 0.9))
    placement = Placement.priced(parts, lambda a, b: 0.0)
    near = 1 + FEWER_RUNTIMES_TOLERANCE * rng.uniform(0.1, 0.9)
    costs = {Candidate(1 << (3 * i + 1), "inductor"): ms * near for i, ms in enumerate(layer)}
    costs[Candidate(1 << 13, "inductor")] = 0.9 * near
    costs[Candidate(1 << 13, "onnxruntime")] = 0.9 * (1 + 2 * FEWER_RUNTIMES_TOLERANCE)  # too slow to move
    costs[Candidate(1 << 2, "inductor")] = 1.0  # one attention faster on a used runtime: it moves too
    seconds = {"inductor": 2.0}
    got = fewer_runtimes(placement, costs, lambda a, b: 0.01, lambda c: seconds.get(c.backend), _pool)
    assert got is not None
    variant, compile_s = got
    assert set(variant.backends) == {"inductor", "torch_cp", "eager"}
    assert [p.mask for p in variant.partitions] == [p.mask for p in placement.partitions]
    moved = [p for p, q in zip(variant.partitions, placement.partitions) if p.backend != q.backend]
    assert {p.mask for p in moved} == {1 << (3 * i + 1) for i in range(4)} | {1 << 2, 1 << 13}
    assert compile_s == 2.0 * len(moved)
    # nothing within the tolerance: no variant
    far = {c: ms * (1 + 2 * FEWER_RUNTIMES_TOLERANCE) for c, ms in costs.items() if c.mask != 1 << 2}
    assert fewer_runtimes(placement, far, lambda a, b: 0.0, lambda c: None, _pool) is None
    # one pool (torch's) already: nothing to consolidate
    alone = Placement.priced([Partition(1, "inductor", 1.0), Partition(2, "eager", 1.0)], lambda a, b: 0.0)
    assert (
        fewer_runtimes(alone, {Candidate(2, "inductor"): 1.0}, lambda a, b: 0.0, lambda c: None, _pool)
        is None
    )
    # a runtime with its own pool beside torch_cp moves to a backend the search did not use
    own = Placement.priced(
        [Partition(1, "onnxruntime", 1.0), Partition(2, "torch_cp", 1.8), Partition(4, "eager", 0.1)],
        lambda a, b: 0.0,
    )
    moved = fewer_runtimes(own, {Candidate(1, "inductor"): 1.02}, lambda a, b: 0.0, lambda c: None, _pool)
    assert moved is not None and [p.backend for p in moved[0].partitions] == ["inductor", "torch_cp", "eager"]


def test_backends_on_torchs_thread_pool_say_so() -> None:
    from torch_collage.backends.registry import get_spec, registered_names

    assert get_spec("eager").pool == get_spec("inductor").pool == "torch"
    assert get_spec("onnxruntime").pool == "onnxruntime" and get_spec("openvino").pool == "openvino"
    if "torch_cp" in registered_names():
        assert get_spec("torch_cp").pool == "torch"


def _pool(backend: str) -> str:
    return "torch" if backend in ("eager", "inductor", "torch_cp") else backend

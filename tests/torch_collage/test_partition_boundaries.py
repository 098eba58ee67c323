"""Partitions together: a runtime's contiguous outputs get eager's strides where a later partition
reads them ([Note: strides at partition boundaries]), and a placement that fails end to end is left
out of the comparison instead of failing the compile."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.assembly import AssembledGraph, Step
from torch_collage.backends.registry import get_spec
from torch_collage.subgraph import extract


def _heads_then_merge(x: torch.Tensor) -> torch.Tensor:
    t = (x * 2.0).transpose(1, 2)  # [B, H, S, D], not contiguous
    return t.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) + 1.0  # a view of eager's layout


def _split(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    first = [n for n in ops if "mul" in str(n.target) or n is ops[1]]
    return first, [n for n in ops if n not in first]


def test_runtime_outputs_get_eager_strides_before_a_later_partition_reads_them() -> None:
    spec = get_spec("onnxruntime")
    if not spec.available()[0]:
        pytest.skip(spec.available()[1])
    x = torch.randn(2, 5, 3, 4)
    gm = make_fx(_heads_then_merge)(x)
    first, rest = _split(gm)
    head, tail = extract(gm, first), extract(gm, rest)
    assert "transpose" in str(head.structure) and "view" in str(tail.structure)
    runtime = spec.compile(head.module, (x,))  # ONNX Runtime returns contiguous tensors
    assert runtime(x)[0].is_contiguous()
    assembled = AssembledGraph(gm, [Step("onnxruntime", runtime, head), Step("eager", tail.module, tail)])
    y = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(assembled(y), _heads_then_merge(y))


def test_a_placement_that_fails_end_to_end_is_left_out_not_raised(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Each partition alone is fine, together they raise: the comparison gives the placement an
    infinite time and the compile goes on with the others."""
    from torch_collage.endtoend import e2e_many_ms
    from torch_collage.search import Placement

    x = torch.randn(3, 4)
    gm = make_fx(lambda a: a.relu() + 1)(x)

    def broken() -> AssembledGraph:
        def fail(*args: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("view size is not compatible")

        sub = extract(gm, [n for n in gm.graph.nodes if n.op == "call_function"])
        return AssembledGraph(gm, [Step("broken", fail, sub)])

    def works() -> AssembledGraph:
        sub = extract(gm, [n for n in gm.graph.nodes if n.op == "call_function"])
        return AssembledGraph(gm, [Step("eager", sub.module, sub)])

    from torch_collage.cache import CostCache
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    graph = DataflowGraph.from_graph(gm.graph)
    opts = CollageOptions(cache_dir=str(tmp_path), repeats=3, warmup=1, progress=False)
    model = CostModel(
        gm, graph, record_values(gm, [x]), {"eager": get_spec("eager")}, opts, CostCache(str(tmp_path))
    )
    a, b = Placement((), 1.0), Placement((), 2.0)
    with caplog.at_level(logging.WARNING, logger="torch_collage"):
        ms = e2e_many_ms(model, graph, [(a, broken), (b, works)])
    assert ms[0] == float("inf") and 0 < ms[1] < float("inf")
    assert any("failed end to end" in r.getMessage() for r in caplog.records)


class _CountingMLP(torch.nn.Module):
    """An MLP that counts its calls in a buffer: its graph ends in a ``copy_`` only eager runs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.body(x)


def test_a_graph_that_writes_its_state_gets_a_nearly_whole_runtime_candidate(tmp_path) -> None:
    """[Note: nearly whole graphs]: the runtime is measured on everything but the write-back, also
    in mode="fast", and the state is still written exactly once per call."""
    if not get_spec("onnxruntime").available()[0]:
        pytest.skip("onnxruntime not installed")
    import torch_collage

    torch.manual_seed(5)
    model = _CountingMLP().eval()
    x = torch.randn(16, 32)
    report = torch_collage.explain(
        model, x, backends=["onnxruntime"], mode="fast", cache_dir=str(tmp_path), progress=False
    )
    (graph,) = report.graphs
    assert graph.usable.get("onnxruntime", 0) >= 1, report.to_markdown()  # measured, matched eager
    assert int(model.calls) == 1  # explain's one call, as one eager call: measuring wrote copies only
    compiled = torch.compile(
        model, backend="collage",
        options={"backends": ["onnxruntime"], "mode": "fast", "cache_dir": str(tmp_path), "progress": False},
    )  # fmt: skip
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model.body(x))
    assert int(model.calls) == 4


def test_nearly_whole_graphs_are_end_to_end_contenders() -> None:
    """[Note: nearly whole graphs]: a measured nearly whole graph becomes a placement, its refused
    units on eager before or after the rest as the graph's edges require, and it is among the
    end-to-end contenders when predicted close to the best (a graph that writes its state has no
    other whole graph but eager's)."""
    import math
    import types

    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.base import BackendSpec
    from torch_collage.candidates import Candidate
    from torch_collage.choose import _close_singles
    from torch_collage.graph import DataflowGraph
    from torch_collage.measure import nearly_whole_placements

    def fn(x):
        y = x.neg()  # refused, at the start
        z = (y.sin() * 2).cos()
        return z.exp(), z.tanh()  # exp refused, at the end

    graph = DataflowGraph.from_graph(make_fx(fn)(torch.randn(4, 4)).graph)
    names = [u[0].target.__name__.split(".")[0] for u in graph.units]
    refused = sum(1 << i for i, n in enumerate(names) if n in ("neg", "exp"))
    rt = BackendSpec(
        name="rt", compile=lambda gm, ex: gm, supports=("aten.sin", "aten.mul", "aten.cos", "aten.tanh")
    )
    eager = BackendSpec(name="eager", compile=lambda gm, ex: gm, supports=("*",))
    model = types.SimpleNamespace(
        specs={"eager": eager, "rt": rt}, switch_cost=lambda a, b: 0.0 if a == b else 0.1
    )
    rest = graph.full & ~refused
    costs = {Candidate(rest, "rt"): 1.0, **{Candidate(1 << u, "eager"): 0.5 for u in range(graph.size)}}
    nearly = nearly_whole_placements(graph, model, costs)
    (placement,) = nearly.values()
    assert list(nearly) == ["rt (nearly whole)"]
    assert [(p.backend, [names[u] for u in range(graph.size) if p.mask >> u & 1]) for p in placement.partitions] == [
        ("eager", ["neg"]), ("rt", [n for n in names if n not in ("neg", "exp")]), ("eager", ["exp"])
    ]  # fmt: skip
    assert placement.predicted_ms == 1.0 + 0.5 + 0.5 + 0.2
    close = _close_singles(graph, {"eager": 2.5, "rt": math.inf}, "mixed", nearly)
    assert [name for name, _ in close] == ["rt (nearly whole)", "eager"]
    far = _close_singles(graph, {"eager": 0.5, "rt": math.inf}, "mixed", nearly)
    assert [name for name, _ in far] == ["eager"]  # 2.2 ms is not within 1.5x of 0.5 ms
    del costs[Candidate(rest, "rt")]
    assert nearly_whole_placements(graph, model, costs) == {}  # not measured: no contender

"""Never slower than eager ([Note: never slower than eager] in choose.py): eager is a contender of
the end-to-end choice whenever it runs the whole graph, through ``torch.compile`` and
``compile_exported`` alike."""

from __future__ import annotations

import time

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends.registry import get_spec, registered_backend
from torch_collage.cache import CostCache
from torch_collage.choose import choose, single
from torch_collage.cost import CostModel, record_values
from torch_collage.endtoend import EndToEnd
from torch_collage.graph import DataflowGraph
from torch_collage.options import CollageOptions
from torch_collage.search import Partition, Placement

_FAST = {"max_depth": 1, "repeats": 3, "warmup": 1, "progress": False}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def _copy_compile(gm: fx.GraphModule, example_inputs):
    return gm


def _cost_model(tmp_path, gm, x, names):
    graph = DataflowGraph.from_graph(gm.graph)
    specs = {name: get_spec(name) for name in names}
    opts = CollageOptions(cache_dir=str(tmp_path))
    return CostModel(gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path))), graph


def test_eager_is_timed_beside_a_mixed_placement_even_when_its_cost_looked_far_slower(tmp_path):
    """Measured alone, "copy" ran the whole graph 4x faster than eager and the mixed placement
    faster still; end to end both are slower than eager, which must win."""
    model, x = _mlp(), torch.randn(8, 64)
    gm = make_fx(model)(x)
    timed: list[list[str]] = []
    e2e_ms = {"eager": 1.0, "copy": 3.0, "mixed": 4.0}

    def compare(m, g, items, rounds=2):
        names = ["mixed" if len(p.partitions) > 1 else p.partitions[0].backend for p, _ in items]
        timed.append(names)
        return [e2e_ms[n] for n in names]

    with registered_backend("copy", compile=_copy_compile):
        cost, graph = _cost_model(tmp_path, gm, x, ("eager", "copy"))
        mixed = Placement(
            tuple(Partition(1 << i, ("copy", "eager")[i % 2], 0.1) for i in range(graph.size)), 0.2
        )
        choice = choose(EndToEnd(gm, cost, compare), mixed, {"eager": 2.0, "copy": 0.5})
    assert timed == [["eager", "copy", "mixed"]]
    assert choice.chosen == "eager" and choice.measured_ms == 1.0
    torch.testing.assert_close(choice.assembled(x), model(x))


def test_a_single_backend_slower_end_to_end_than_eagers_cost_is_timed_beside_eager(tmp_path):
    model, x = _mlp(), torch.randn(8, 64)
    gm = make_fx(model)(x)
    timed: list[list[str]] = []
    e2e_ms = {"eager": 1.0, "copy": 3.0}

    def compare(m, g, items, rounds=2):
        names = [p.partitions[0].backend for p, _ in items]
        timed.append(names)
        return [e2e_ms[n] for n in names]

    with registered_backend("copy", compile=_copy_compile):
        cost, graph = _cost_model(tmp_path, gm, x, ("eager", "copy"))
        choice = choose(EndToEnd(gm, cost, compare), single(graph, "copy", 0.5), {"eager": 2.0, "copy": 0.5})
    assert timed == [["copy"], ["copy", "eager"]]  # alone, then beside eager: 3.0 ms > eager's 2.0
    assert choice.chosen == "eager" and choice.compared == {"copy": 3.0, "eager": 1.0}


def _sleepy_compile(gm: fx.GraphModule, example_inputs):
    def run(*args):
        time.sleep(0.002)
        return gm(*args)

    return run


def _failing_compile(gm: fx.GraphModule, example_inputs):
    raise RuntimeError("cannot lower aten.addmm.default: no kernel for these strides")


def _memo_compile(gm: fx.GraphModule, example_inputs):
    """Instant on the tensors it was measured on (it answers from memory), 20 ms on any other:
    fast alone, slow assembled, where a partition receives the previous partition's new outputs."""
    memo: dict[tuple[int, ...], tuple[tuple, object]] = {}

    def run(*args):
        key = tuple(id(a) for a in args)
        if key not in memo:
            time.sleep(0.02)  # far beyond eager's time for the model, even on a busy machine
            memo[key] = (args, gm(*args))  # the arguments are kept: their ids stay theirs
        return memo[key][1]

    return run


def test_compile_exported_never_picks_a_placement_slower_than_eager(tmp_path):
    """Every backend's placement is slower than eager or fails: whole graphs that sleep or fail to
    compile, and linear pieces (export keeps aten.linear) that are instant alone but slow after any
    other backend's partition (their switch cost shows it; the mixed case that timing alone cannot
    see is the first test here)."""
    model, x = _mlp(), torch.randn(8, 64)
    with (
        registered_backend("sleepy", compile=_sleepy_compile),
        registered_backend("failing", compile=_failing_compile),
        registered_backend("memo", compile=_memo_compile, supports=["aten.linear"]),
    ):
        opts = {"backends": ["sleepy", "failing", "memo"], "cache_dir": str(tmp_path), **_FAST}
        compiled = torch_collage.compile_exported(model, x, **opts)
    (g,) = compiled.report.graphs
    assert g.chosen == "eager", (g.chosen, g.end_to_end_ms, g.single_backend_ms)
    assert "aten.addmm.default" in g.whole_graph_failures["failing"]
    text = compiled.report.to_markdown()
    assert text.index("failing failed on the whole graph") < text.index("| # | backend")
    x2 = torch.randn(8, 64)
    torch.testing.assert_close(compiled(x2), model(x2))

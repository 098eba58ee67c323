"""How the runtime runners are set up for speed (not timed): which ONNX Runtime sessions spin, and the
runners' output paths. See [Note: ORT call path] in torch_collage/backends/onnxruntime.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torch_collage.backends._export import (
    WHOLE_GRAPH,
    GraphIO,
    StaticSignature,
    holds_whole_graph,
    quiet_treespec_deprecation,
)
from torch_collage.backends.onnxruntime import OnnxRuntimeBackend

pytest.importorskip("onnxruntime")

_SPIN_KEY = "session.intra_op.allow_spinning"


def _model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).eval()
    return model, (torch.randn(3, 12),)


def _graph(model: nn.Module, inputs: tuple[torch.Tensor, ...], whole: bool | None) -> fx.GraphModule:
    """The ATen graph collage would hand a backend; marked as a whole graph when ``whole`` is set."""
    with quiet_treespec_deprecation():
        gm = torch.export.export(model, inputs).run_decompositions({}).module()
    if whole is not None:
        gm.meta[WHOLE_GRAPH] = whole
    return gm


def _spins(runner: object) -> bool:
    options = runner._session.get_session_options()  # type: ignore[attr-defined]
    value = options.get_session_config_entry(_SPIN_KEY)
    assert runner.spinning == (value == "1")  # type: ignore[attr-defined]  # what the runner says is what the session does
    return value == "1"


def _check_outputs(runner: object, model: nn.Module) -> None:
    x = torch.randn(3, 12)
    got = runner(x)  # type: ignore[operator]
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("allow_spinning", "whole", "expected"),
    [
        (None, None, False),  # a partition: neighbours follow it, so it never holds the cores
        (None, False, False),
        (None, True, True),  # the whole graph: nothing of collage's runs between its calls
        (False, True, False),
        (True, None, True),
    ],
)
def test_collage_graph_spins_only_when_marked_whole(
    allow_spinning: bool | None, whole: bool | None, expected: bool
) -> None:
    model, inputs = _model()
    gm = _graph(model, inputs, whole)
    assert holds_whole_graph(gm) is (whole is True)
    runner = OnnxRuntimeBackend(allow_spinning=allow_spinning).compile_graph(gm, inputs)
    assert _spins(runner) is expected
    _check_outputs(runner, model)


@pytest.mark.parametrize(("allow_spinning", "expected"), [(None, True), (False, False), (True, True)])
def test_whole_module_spins_like_onnxruntime_alone(allow_spinning: bool | None, expected: bool) -> None:
    model, inputs = _model()
    runner = OnnxRuntimeBackend(allow_spinning=allow_spinning).compile(model, inputs)
    assert _spins(runner) is expected
    _check_outputs(runner, model)


@pytest.mark.parametrize("whole", [True, False])
def test_saved_runner_loads_spinning_as_it_was_compiled(tmp_path: Path, whole: bool) -> None:
    model, inputs = _model()
    backend = OnnxRuntimeBackend()
    runner = backend.compile_graph(_graph(model, inputs, whole), inputs)
    assert runner.save(tmp_path)
    loaded = backend.load(tmp_path, inputs)
    assert _spins(loaded) is whole
    assert _spins(OnnxRuntimeBackend(allow_spinning=False).load(tmp_path, inputs)) is False
    _check_outputs(loaded, model)


def test_graph_version_tells_spinning_costs_apart() -> None:
    backend = OnnxRuntimeBackend()
    assert backend.graph_version().startswith(backend.version())
    assert backend.graph_version() != backend.version()  # whole-graph costs measured before differ


def test_marker_must_be_true_and_on_meta() -> None:
    assert not holds_whole_graph(nn.Linear(2, 2))  # no ``meta`` at all
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    gm.meta[WHOLE_GRAPH] = "yes"
    assert not holds_whole_graph(gm)


def test_flat_tuple_outputs_skip_the_tree_but_other_outputs_keep_it() -> None:
    sig = StaticSignature.of([torch.zeros(2)])
    a, b = torch.randn(2), torch.randn(3)
    flat = GraphIO(("x",), (0, 1), pytree.tree_structure((0, 1)), sig)
    assert flat.unflatten([a, b]) == (a, b) and isinstance(flat.unflatten([a, b]), tuple)
    single = GraphIO(("x",), (0,), pytree.tree_structure(0), sig)
    assert single.unflatten([a]) is a
    repeated = GraphIO(("x",), (0, 0, 1), pytree.tree_structure((0, 0, 0)), sig)
    assert repeated.unflatten([a, b]) == (a, a, b)
    as_list = GraphIO(("x",), (0, 1), pytree.tree_structure([0, 1]), sig)
    assert as_list.unflatten([a, b]) == [a, b]
    nested = GraphIO(("x",), (1, 0), pytree.tree_structure({"p": 0, "q": 1}), sig)
    assert nested.unflatten([a, b]) == {"p": b, "q": a}
    assert GraphIO.from_json(flat.to_json()).unflatten([a, b]) == (a, b)


def test_collage_marks_only_the_whole_graph_so_only_it_spins(tmp_path: Path) -> None:
    """Through collage: the whole graph placed on ONNX Runtime runs a spinning session; a piece of
    the graph beside others does not ([Note: ORT call path])."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.cache import CostCache
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model, inputs = _model()
    gm = make_fx(model)(*inputs)
    graph = DataflowGraph.from_graph(gm.graph)
    specs = {"eager": get_spec("eager"), "onnxruntime": get_spec("onnxruntime")}
    opts = CollageOptions(cache_dir=str(tmp_path), repeats=3, warmup=1, progress=False, compiled_cache_mb=0)
    cost = CostModel(gm, graph, record_values(gm, list(inputs)), specs, opts, CostCache(str(tmp_path)))
    whole = cost.compile(graph.full, "onnxruntime")
    piece = cost.compile(graph.full >> 1, "onnxruntime")  # all but the first unit
    assert whole.fn is not None and piece.fn is not None, (whole.reason, piece.reason)
    assert _spins(whole.fn) and not _spins(piece.fn)

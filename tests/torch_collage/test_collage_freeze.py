import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.freeze import FrozenInputs, freeze_inputs
from torch_collage.graph import DataflowGraph, constant_expressions
from torch_collage.subgraph import extract, fold_constants


def _f(w, b, x):
    return torch.nn.functional.linear(x, w, b).relu()


def test_frozen_graph_reads_the_tensors_as_constants():
    w, b, x = torch.randn(5, 3), torch.randn(5), torch.randn(4, 3)
    frozen = freeze_inputs(fx.symbolic_trace(_f), (w, b, x), (0, 1))
    assert [n.op for n in frozen.graph.nodes].count("placeholder") == 1
    torch.testing.assert_close(frozen(x), _f(w, b, x))


def test_frozen_inputs_notice_in_place_updates_and_new_tensors():
    w, b, x = torch.randn(5, 3), torch.randn(5), torch.randn(4, 3)
    frozen = FrozenInputs.of((w, b, x), (0, 1))
    assert frozen.still_valid((w, b, torch.randn(4, 3))) and frozen.dynamic((w, b, x)) == [x]
    assert not frozen.still_valid((w.clone(), b, x)) and not frozen.still_valid((w, b))
    w.mul_(2)
    assert not frozen.still_valid((w, b, x))


def _mlp_and_options(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    opts = {
        "backends": ["eager", "onnxruntime"],
        "cache_dir": str(tmp_path),
        "max_depth": 1,
        "progress": False,
    }
    return model, opts


def test_compiled_inference_follows_weight_updates(tmp_path):
    torch._dynamo.reset()
    model, opts = _mlp_and_options(tmp_path)
    compiled = torch.compile(model, backend="collage", options=opts)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        model[0].weight.mul_(-0.5)  # an in-place update, as optimizer.step() does
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_weight_checks_hold_with_dynamo_module_guards_skipped(tmp_path):
    """[Note: skipping dynamo's module guards]: collage's own identity and version checks on the
    frozen weights still see in-place updates and replaced parameters when dynamo no longer guards
    on the module."""
    torch._dynamo.reset()
    model, opts = _mlp_and_options(tmp_path)
    opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(model, backend="collage", options=opts)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        model[0].weight.mul_(-0.5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        model[2].weight = torch.nn.Parameter(torch.randn(8, 32))
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def _consts_and_activations(w, b, x):
    y = torch.nn.functional.linear(x, w, b)  # t(w): computable from a constant alone
    n = x.shape[0]
    mask = torch.arange(n).unsqueeze(0) > torch.arange(n).unsqueeze(1)  # no tensor input at all
    scores = (y @ y.t()).masked_fill(mask, 0.0)
    noise = torch.rand_like(b) * 0.0  # random: never a constant expression
    return scores, y.sum(0) + noise, w * 2  # ``w * 2`` is returned: computed as a unit


def _op(node):
    return str(node.target.overloadpacket)


def test_constant_expressions_are_not_units_and_are_copied_into_partitions():
    """[Note: constant expressions]: nodes computed from frozen weights and constants alone are
    recomputed inside each partition that reads them, instead of arriving as its inputs."""
    w, b, x = torch.randn(6, 5), torch.randn(6), torch.randn(4, 5)
    aten = make_fx(_consts_and_activations)(w, b, x)
    frozen = freeze_inputs(aten, (w, b, x), (0, 1))
    consts = {_op(n) for n in constant_expressions(frozen.graph)}
    assert {"aten.t", "aten.arange", "aten.unsqueeze", "aten.gt"} <= consts
    assert not consts & {"aten.rand_like", "aten.mul", "aten.mm", "aten.addmm"}
    graph = DataflowGraph.from_graph(frozen.graph)
    unit_ops = [_op(u[0]) for u in graph.units]
    assert unit_ops.count("aten.t") == 1  # y.t() of an activation; w's transpose is no unit
    assert "aten.arange" not in unit_ops and "aten.rand_like" in unit_ops and "aten.mul" in unit_ops
    addmm = next(u for u in graph.units if _op(u[0]) == "aten.addmm")
    sub = extract(frozen, addmm)
    assert [n.op for n in sub.inputs] == ["placeholder"]  # only x: t(w) and b inside, as in the whole graph
    assert "aten.t" in {_op(n) for n in sub.graph.nodes if n.op == "call_function"}
    x2 = torch.randn(4, 5)
    torch.testing.assert_close(sub.module(x2)[0], torch.nn.functional.linear(x2, w, b))
    folded = fold_constants(sub.module)  # for CUTLASS: t(w) evaluated once into a constant
    assert "aten.t" not in {_op(n) for n in folded.graph.nodes if n.op == "call_function"}
    assert "aten.t" in {_op(n) for n in sub.graph.nodes if n.op == "call_function"}  # left alone
    torch.testing.assert_close(folded(x2)[0], torch.nn.functional.linear(x2, w, b))
    masked = next(u for u in graph.units if _op(u[0]) == "aten.masked_fill")
    assert [_op(n) for n in extract(frozen, masked).inputs] == ["aten.mm"]  # the mask is rebuilt inside


def test_collage_places_linear_layers_without_weight_transposes(tmp_path):
    """The placed inference graph of an MLP no longer computes ``t(weight)`` per call."""
    torch._dynamo.reset()
    model, opts = _mlp_and_options(tmp_path)
    x = torch.randn(4, 16)
    report = torch_collage.explain(model, x, **opts)
    names = [n for g in report.graphs for p in g.partitions for n in p.nodes]
    assert any(n.startswith("addmm") for n in names), names
    assert not [n for n in names if n == "t" or n.startswith("t_")], names

import torch
from torch import fx

from torch_collage.freeze import FrozenInputs, freeze_inputs


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

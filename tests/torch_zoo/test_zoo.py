"""The model zoo: every tiny model builds, runs, is deterministic, trains, traces and exports."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from torch_zoo import ZooModel, get_model, list_models

TRAINING = ["mmt", "dlrm", "candle_uno"]

# Output shape of each tiny model for a batch of b.
TINY_OUTPUT_SHAPES = {
    "mlp": lambda b: (b, 16),
    "residual_mlp": lambda b: (b, 16),
    "resnet18": lambda b: (b, 10),
    "resnext50": lambda b: (b, 256, 2, 2),
    "mobilenet_v2": lambda b: (b, 10),
    "bert": lambda b: (b, 8, 16),
    "gpt2": lambda b: (b, 8, 64),
    "dcgan": lambda b: (b, 3, 64, 64),
    "nasnet": lambda b: (b, 10),
    "mmt": lambda b: (b, 3),
    "dlrm": lambda b: (b, 1),
    "candle_uno": lambda b: (b, 1),
}


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_list_models_names_and_tasks() -> None:
    assert sorted(list_models()) == sorted(TINY_OUTPUT_SHAPES)
    assert list_models(task="training") == TRAINING
    assert set(list_models(task="inference")) == set(TINY_OUTPUT_SHAPES) - set(TRAINING)
    for name in list_models():
        spec = get_model(name)
        assert isinstance(spec, ZooModel) and spec.name == name and spec.default_batch >= 1
        assert spec.description and "\n" not in spec.description


@pytest.mark.parametrize("name", list(TINY_OUTPUT_SHAPES))
@pytest.mark.parametrize("batch", [None, 1])
def test_tiny_forward_shape_and_finite(name: str, batch: int | None) -> None:
    spec = get_model(name)
    model = spec.build("tiny")
    assert not model.training
    inputs = spec.example_inputs("tiny", batch, seed=3)
    out = _run(model, inputs)
    assert out.shape == TINY_OUTPUT_SHAPES[name](batch or 2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if out.shape[0] > 1:  # the output depends on the input (see [Note: zoo weights])
        assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()
    for x in inputs:
        assert x.dtype in (torch.float32, torch.int64)


@pytest.mark.parametrize("name", list(TINY_OUTPUT_SHAPES))
def test_seed_determines_weights_and_inputs(name: str) -> None:
    spec = get_model(name)
    a, b, c = spec.build(seed=1), spec.build(seed=1), spec.build(seed=2)
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), key
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    x1, x2, x3 = (spec.example_inputs(seed=s) for s in (5, 5, 6))
    assert all(torch.equal(u, v) for u, v in zip(x1, x2))
    assert any(not torch.equal(u, v) for u, v in zip(x1, x3))
    torch.testing.assert_close(_run(a, x1), _run(b, x1), rtol=0, atol=0)


def test_build_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_model("mlp").build(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'vgg'.*valid names: .*resnet18.*dlrm"):
        get_model("vgg")


@pytest.mark.parametrize("call", ["build", "example_inputs", "example_target"])
def test_bad_size_is_rejected(call: str) -> None:
    with pytest.raises(ValueError, match="invalid size 'huge'"):
        getattr(get_model("dlrm"), call)("huge")


@pytest.mark.parametrize("batch", [0, -2, 1.5, True, "4"])
def test_bad_batch_is_rejected(batch: object) -> None:
    with pytest.raises(ValueError, match="invalid batch"):
        get_model("mlp").example_inputs("tiny", batch)  # type: ignore[arg-type]


def test_bad_task_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid task 'serving'"):
        list_models(task="serving")  # type: ignore[arg-type]


def test_inference_model_has_no_target() -> None:
    spec = get_model("resnet18")
    assert spec.loss_fn is None
    with pytest.raises(ValueError, match="'resnet18' has no loss"):
        spec.example_target()


@pytest.mark.parametrize("name", TRAINING)
def test_training_loss_and_gradients(name: str) -> None:
    spec = get_model(name)
    assert spec.task == "training" and spec.loss_fn is not None
    model = spec.build("tiny", seed=4).train()
    inputs, target = spec.example_inputs(seed=8), spec.example_target(seed=9)
    loss = spec.loss_fn(model(*inputs), target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for key, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
        assert param.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", TRAINING)
def test_multibranch_traces_with_fx(name: str) -> None:
    spec = get_model(name)
    model = spec.build("tiny", seed=5)
    traced = torch.fx.symbolic_trace(model)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    inputs = spec.example_inputs(seed=10)
    assert len(placeholders) == len(inputs)  # one graph input per branch input
    torch.testing.assert_close(_run(traced, inputs), _run(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TINY_OUTPUT_SHAPES))
def test_tiny_models_export(name: str) -> None:
    spec = get_model(name)
    model = spec.build("tiny", seed=6)
    inputs = spec.example_inputs(seed=11)
    exported = torch.export.export(model, inputs, strict=False)
    torch.testing.assert_close(_run(exported.module(), inputs), _run(model, inputs))


def test_gpt2_is_causal() -> None:
    spec = get_model("gpt2")
    model = spec.build(seed=2)
    (ids,) = spec.example_inputs(seed=12)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 64  # tiny vocabulary
    before, after = _run(model, (ids,)), _run(model, (changed,))
    torch.testing.assert_close(after[:, :-1], before[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(after[:, -1], before[:, -1])


def test_importing_the_zoo_loads_no_compiler():
    """The zoo is shared by the three packages' tests and benchmarks: importing it loads neither
    torch_collage nor dynamo."""
    import subprocess
    import sys

    code = "import sys, torch_zoo; print(sorted(m for m in ('torch._dynamo', 'torch_collage', 'triton') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"

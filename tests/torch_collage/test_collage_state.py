"""Compiling never changes a user's state: buffers, inputs and the random stream change exactly as one
eager call changes them ([Note: inputs the graph writes], [Note: random ops])."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

_FAST = {"backends": ["eager", "inductor"], "max_depth": 2, "repeats": 3, "warmup": 1, "progress": False}


class _Counter(nn.Module):
    """A buffer updated in place on every call, and read by the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x) * self.calls


class _AddToInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(0.5)
        return self.lin(x).relu()


def _bn() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, 4))


def _compiled(model: nn.Module, tmp_path) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="collage", options={**_FAST, "cache_dir": str(tmp_path)})


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


@pytest.mark.parametrize("make", [_bn, _Counter, _AddToInput], ids=["batchnorm", "counter", "input_add_"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_state_changes_exactly_as_eager_calls_change_it(tmp_path, make, grad):
    """A train()-mode model: after each call (the first one places the graph) every buffer, the
    input and the output equal what the same eager calls give."""
    torch.manual_seed(0)
    model = make().train()
    ref = copy.deepcopy(model)
    compiled = _compiled(model, tmp_path)
    for _ in range(3):
        x = torch.randn(16, 8)
        x_ref = x.clone()
        with torch.set_grad_enabled(grad):
            out, want = compiled(x), ref(x_ref)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(x, x_ref)
        for got, expected in zip(_state(model), _state(ref)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_training_with_dropout_matches_eager_from_the_same_seed(tmp_path):
    """Random ops run on eager and are checked under the generator state the recording had; the
    placement restores the caller's generator, so the compiled step draws what eager draws."""
    torch.manual_seed(1)
    model = _dropout().train()
    ref = copy.deepcopy(model)
    compiled = _compiled(model, tmp_path)
    x = torch.randn(16, 8)
    for step in range(2):
        torch.manual_seed(100 + step)
        out = compiled(x)
        out.square().mean().backward()
        after = torch.rand(3)  # the stream after the call
        torch.manual_seed(100 + step)
        want = ref(x)
        want.square().mean().backward()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(after, torch.rand(3))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_dropout_is_not_bit_equal_across_calls(tmp_path):
    """The check is not fooled by a fixed mask: two calls draw different dropout masks, like eager."""
    torch.manual_seed(2)
    model = _dropout().train()
    compiled = _compiled(model, tmp_path)
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert not torch.equal(compiled(x), compiled(x))

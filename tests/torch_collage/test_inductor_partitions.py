"""Inductor partitions are compiled with compile_fx, without a dynamo frame of their own
([Note: partitions without an inner frame] in backends/inductor.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.backends import get_backend, get_spec
from torch_collage.entry import make_backend
from torch_collage.freeze import freeze_inputs
from torch_collage.options import CollageOptions

_FAST = {"max_depth": 2, "repeats": 3, "warmup": 1, "progress": False}


def _inductor_spec():
    if not get_backend("inductor").available()[0]:
        pytest.skip("no C++ compiler for Inductor")
    return get_spec("inductor")


def _aten_graph(x: torch.Tensor, w: torch.Tensor):
    def fn(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(x @ w)
        return y * 2 + 1, y.sum(dim=1)

    return make_fx(fn)(x, w)


def test_partition_runs_without_dynamo_and_matches_eager():
    spec = _inductor_spec()
    x, w = torch.randn(6, 8), torch.randn(8, 5)
    gm = _aten_graph(x, w)
    traced_before = counters["frames"]["total"]
    fn = spec.compile(gm, (x, w))
    assert counters["frames"]["total"] == traced_before, "the partition went through dynamo"
    x2, w2 = torch.randn(6, 8), torch.randn(8, 5)  # fresh inputs, same signature
    got = fn(x2, w2)
    want = gm(x2, w2)
    assert isinstance(got, (tuple, list)) and len(got) == 2
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_partition_with_one_output_returns_it_like_the_graph():
    spec = _inductor_spec()
    x = torch.randn(4, 3)
    gm = make_fx(lambda t: torch.tanh(t) * t)(x)
    x2 = torch.randn(4, 3)
    got = spec.compile(gm, (x,))(x2)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, gm(x2))


def test_training_on_inductor_alone_gives_eager_gradients(tmp_path):
    _inductor_spec()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 3))
    x = torch.randn(5, 12)
    model(x).pow(2).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reports = []
    opts = CollageOptions(backends=("inductor",), cache_dir=str(tmp_path), **_FAST)
    torch.compile(model, backend=make_backend(opts, reports.append))(x).pow(2).sum().backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    used = {part.backend for r in reports for part in r.partitions}
    assert "inductor" in used and sorted(r.kind for r in reports) == ["backward", "forward"]


def test_partition_folds_its_frozen_weights():
    """[Note: frozen partitions]: a partition's tensor attributes are compiled in, not read per call
    (the check of frozen weights, not the kernels, follows later updates)."""
    spec = _inductor_spec()
    w, b, x = torch.randn(8, 16), torch.randn(8), torch.randn(4, 16)

    def fn(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.nn.functional.linear(x, w, b))

    gm = freeze_inputs(make_fx(fn)(w, b, x), (w, b, x), (0, 1))
    compiled = spec.compile(gm, (x,))
    x2 = torch.randn(4, 16)
    before = compiled(x2)
    torch.testing.assert_close(before, fn(w, b, x2), rtol=1e-5, atol=1e-5)
    w.add_(1.0)  # compiled without freezing, the kernel reads w on every call and this shows
    torch.testing.assert_close(compiled(x2), before, rtol=0, atol=0)


def test_inference_on_inductor_alone_follows_weight_updates(tmp_path):
    _inductor_spec()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    opts = CollageOptions(backends=("inductor",), cache_dir=str(tmp_path), **_FAST)
    reports = []
    compiled = torch.compile(model, backend=make_backend(opts, reports.append))
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        model[0].weight.mul_(-0.5)  # as optimizer.step() does: the frozen partition must not be reused
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(reports) == 2 and all("inductor" in {p.backend for p in r.partitions} for r in reports)


def test_whole_module_freezes_only_when_asked():
    """Partitions always freeze ([Note: frozen partitions]); the whole-module runner follows its field."""
    _inductor_spec()
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    outs = {}
    for freezing in (False, True):
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
        fn = get_backend("inductor", freezing=freezing).compile(model, (x,))
        with torch.no_grad():
            before = fn(x)
            model[0].weight.add_(1.0)
            outs[freezing] = torch.equal(fn(x), before)
    assert outs == {False: False, True: True}

"""The collage benchmark's compiles leave the baselines compiled before them as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.bench_collage import _collage, _dynamo_baseline
from torch_collage.backends import get_backend
from torch_collage.options import CollageOptions


def test_collage_and_openvino_compiles_leave_the_frozen_inductor_baseline_frozen(tmp_path):
    """A dynamo reset between compiling and timing made frozen Inductor re-trace unfrozen: its
    output then followed an in-place weight update, and it was timed at unfrozen speed."""
    if not get_backend("inductor").available()[0]:
        pytest.skip("no C++ compiler for Inductor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
    x = torch.randn(4, 16)
    frozen = get_backend("inductor", freezing=True).compile(model, (x,))
    before = frozen(x)
    opts = CollageOptions.from_mapping(
        {"backends": ("eager",), "cache_dir": str(tmp_path), "time_budget_s": 0.0}
    )
    with torch.no_grad():
        _collage(model, (x,), opts)
        if get_backend("openvino").available()[0]:
            _dynamo_baseline("openvino", model, (x,), threads=1)
        model[0].weight.add_(1.0)
        assert not torch.equal(model(x), before)  # the update shows in eager
        assert torch.equal(frozen(x), before)

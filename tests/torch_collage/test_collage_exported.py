"""``torch_collage.compile_exported``: a model captured by torch.export, placed, called without dynamo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_collage

_FAST = {"max_depth": 2, "repeats": 3, "warmup": 1, "progress": False}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]):
        h = self.body(x) + extra["bias"]
        return {"logits": self.head(h), "hidden": h.relu()}


def _inputs(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, generator=g), {"bias": torch.randn(32, generator=g)}


def test_exported_model_matches_eager_and_reports_its_placement(tmp_path):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    opts = {"backends": ["onnxruntime"], "cache_dir": str(tmp_path), **_FAST}
    compiled = torch_collage.compile_exported(model, *_inputs(0), **opts)
    x, extra = _inputs(1)  # fresh inputs, not the ones it was placed on
    got, want = compiled(x, extra), model(x, extra)
    assert set(got) == {"logits", "hidden"} and not got["logits"].requires_grad
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-5)
    report = compiled.report
    assert report.graphs[0].kind == "inference" and report.partitions
    assert set(report.graphs[0].single_backend_ms) == {"eager", "onnxruntime"}
    assert "ExportedCollage(AssembledGraph(" in repr(compiled)


def test_exported_model_follows_in_place_weight_updates(tmp_path):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    compiled = torch_collage.compile_exported(
        model, *_inputs(0), backends=["eager"], cache_dir=str(tmp_path), **_FAST
    )
    with torch.no_grad():
        model.head.weight.mul_(-2.0)  # as optimizer.step() would
    x, extra = _inputs(2)
    torch.testing.assert_close(compiled(x, extra)["logits"], model(x, extra)["logits"], rtol=1e-4, atol=1e-5)
    assert len(compiled._reports) == 2  # placed again with the new weights frozen in


def test_exported_model_rejects_other_shapes_structures_and_state_mutation(tmp_path):
    torch.manual_seed(0)
    compiled = torch_collage.compile_exported(
        _TwoHeads().eval(), *_inputs(0), backends=["eager"], cache_dir=str(tmp_path), **_FAST
    )
    x, extra = _inputs(0)
    with pytest.raises(
        ValueError, match=r"input 0: compiled for shape \(4, 16\) torch.float32, got \(5, 16\)"
    ):
        compiled(torch.randn(5, 16), extra)
    with pytest.raises(ValueError, match=r"input 0: .* got \(4, 16\) torch.float64"):
        compiled(x.double(), extra)
    with pytest.raises(TypeError, match="structured as"):
        compiled(x, {"other": extra["bias"]})
    bn = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).train()
    with pytest.raises(ValueError, match=r"mutates state .* call model.eval\(\)"):
        torch_collage.compile_exported(bn, torch.randn(4, 8), backends=["eager"], cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        torch_collage.compile_exported(lambda t: t, x)
    with pytest.raises(ValueError, match="unknown collage option"):
        torch_collage.compile_exported(_TwoHeads(), x, extra, bogus=1)


def test_exported_model_with_plain_tensor_inputs_and_one_output(tmp_path):
    """The common call (tensors in, one tensor out) takes the short path; other calls still fail clearly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    compiled = torch_collage.compile_exported(
        model, torch.randn(4, 16), backends=["eager"], cache_dir=str(tmp_path), **_FAST
    )
    assert compiled._flat_call and compiled._single_output
    x = torch.randn(4, 16)
    got = compiled(x)
    assert isinstance(got, torch.Tensor) and not got.requires_grad
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="structured as"):
        compiled(x.tolist())
    with pytest.raises(TypeError, match="structured as"):
        compiled(x, x)
    with pytest.raises(TypeError, match="structured as"):
        compiled(input=x)
    with pytest.raises(ValueError, match=r"input 0: compiled for shape \(4, 16\)"):
        compiled(torch.randn(2, 16))

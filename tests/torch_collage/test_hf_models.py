"""Real Hugging Face model code (built from small configs, random weights, no downloads) compiled with
``backend="collage"``: inference with a padded attention mask and the model's default ``use_cache``,
and a training step in ``train()`` mode (dropout on), both equal to eager."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_zoo.hf import ARCHITECTURES, output_tensors  # noqa: E402

# Every architecture with mode="fast" (whole graphs on eager and ONNX Runtime: seconds each) in the
# default suite; with collage's default options (the full search over every backend: minutes each
# on 2 cores) under -m slow.
_FAST = {"mode": "fast", "backends": ["eager", "onnxruntime"], "repeats": 3, "warmup": 1}
_OPTIONS = {"fast": _FAST, "default": {}}


def _check_same(got: Any, want: Any) -> None:
    got_t, want_t = output_tensors(got), output_tensors(want)
    assert len(got_t) == len(want_t) and want_t
    for g, w in zip(got_t, want_t):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _params() -> list[Any]:
    return [
        pytest.param(arch, kind, marks=() if kind == "fast" else pytest.mark.slow, id=f"{arch}-{kind}")
        for kind in _OPTIONS
        for arch in ARCHITECTURES
    ]


@pytest.mark.parametrize(("arch", "kind"), _params())
def test_inference_matches_eager(tmp_path, arch, kind):
    torch.manual_seed(0)
    make, inputs = ARCHITECTURES[arch]
    model = make().eval()
    x = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="collage", options={**_OPTIONS[kind], "cache_dir": str(tmp_path)})
    with torch.no_grad():
        _check_same(compiled(**x), model(**x))
        x2 = inputs()  # fresh values, same shapes: no new placement needed
        _check_same(compiled(**x2), model(**x2))


def _loss(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else output_tensors(out)[0]
    return logits.float().square().mean()


@pytest.mark.parametrize(("arch", "kind"), _params())
def test_training_step_matches_eager(tmp_path, arch, kind):
    """train() mode, dropout on: the compiled step draws eager's dropout masks from the same seed."""
    torch.manual_seed(0)
    make, inputs = ARCHITECTURES[arch]
    model = make().train()
    _check_training_step(model, inputs(), {**_OPTIONS[kind], "cache_dir": str(tmp_path)})


def _check_training_step(model: torch.nn.Module, x: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    """One step of ``model`` compiled with collage ``options`` against eager from the same seed: loss,
    every gradient, and the buffers (BatchNorm statistics, counters) agree. Models that draw from
    numpy (wav2vec2's SpecAugment masks) draw from numpy's seeded stream in both runs: dynamo would
    otherwise trace ``np.random`` onto torch's generator, whatever the backend."""
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="collage", options=options)
    torch.manual_seed(7)
    np.random.seed(7)
    with torch._dynamo.config.patch(use_numpy_random_stream=True):
        loss = _loss(compiled(**x))
    loss.backward()
    torch.manual_seed(7)
    np.random.seed(7)
    want = _loss(ref(**x))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for b, c in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_training_step_on_inductor_without_dropout_matches_eager(tmp_path, arch):
    """Dropout off, the graphs may go whole to Inductor, whose code asserts the strides its inputs were
    traced with: the candidates must be compiled on copies with the real inputs' strides (BERT's
    pooler reads ``h[:, 0]``, a view with gaps; an expanded mask has stride 0)."""
    torch.manual_seed(0)
    make, inputs = ARCHITECTURES[arch]
    model = make().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    _check_training_step(
        model, inputs(), {**_FAST, "backends": ["eager", "inductor"], "cache_dir": str(tmp_path)}
    )

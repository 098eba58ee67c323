"""Graphs with symbolic shapes are placed once per range of sizes ([Note: shape ranges] in shapes.py):
new sizes inside the range run with no search, and with no compile where the backend compiles for
the range; every size matches eager."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from torch import fx, nn

from torch_collage.backends.base import BackendSpec
from torch_collage.backends.registry import get_spec, register_backend, unregister_backend
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.report import GraphReport
from torch_collage.shapes import range_key

LENGTHS = [5, 9, 12, 7, 16, 3, 21, 10, 6, 13, 30, 8, 4, 17, 11, 25, 14, 19, 2, 15]


class SeqModel(nn.Module):
    """Attention-like mixing over a variable-length sequence, with sizes used in reshapes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / w**0.5, dim=-1)
        h = self.out(att @ v) + x
        return self.norm(h).reshape(b * t, w)


def _compile(model: nn.Module, backends: tuple[str, ...], tmp_path, **compile_kw):  # type: ignore[no-untyped-def]
    reports: list[GraphReport] = []
    options = CollageOptions(
        backends=backends, cache_dir=str(tmp_path), progress=False, mode="fast", repeats=3, warmup=1
    )
    fn = torch.compile(model, backend=make_backend(options, sink=reports.append), **compile_kw)
    return fn, reports


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "inductor"])
def test_twenty_lengths_place_at_most_twice_and_compile_once_for_the_range(
    backend: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = get_spec(backend)
    if not spec.available()[0]:
        pytest.skip(spec.available()[1])
    torch.manual_seed(0)
    model = SeqModel().eval()
    fn, reports = _compile(model, (backend,), tmp_path)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="torch_collage"):
        for length in LENGTHS:
            x = torch.randn(2, length, 16)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(reports) <= 2, [r.shape_range for r in reports]
    ranged = [r for r in reports if r.shape_range]
    assert len(ranged) == 1 and "in [2, inf)" in ranged[0].shape_range
    # the range compiled and ran on the backend; eager runs it only where eager was timed faster (a
    # tiny graph at noise level), never as a fallback from a failure
    timed = {**ranged[0].single_backend_ms, **ranged[0].end_to_end_ms}
    assert math.isfinite(timed.get(backend, math.inf)), timed
    if ranged[0].chosen != backend:
        assert ranged[0].chosen == "eager" and timed["eager"] < timed[backend], timed
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "new size" in m or "per size" in m], messages


def test_mark_dynamic_range_is_reported(tmp_path) -> None:
    torch.manual_seed(0)
    model = SeqModel().eval()
    fn, reports = _compile(model, ("onnxruntime",), tmp_path)
    with torch.no_grad():
        for length in (6, 40, 9):
            x = torch.randn(3, length, 16)
            torch._dynamo.mark_dynamic(x, 1, min=4, max=64)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(reports) == 1
    assert "in [4, 64]" in reports[0].shape_range and "placed at" in reports[0].shape_range


def _static_only(name: str, compile_dynamic) -> BackendSpec:  # type: ignore[no-untyped-def]
    return dataclasses.replace(get_spec("onnxruntime"), name=name, compile_dynamic=compile_dynamic)


def test_backend_without_range_compile_compiles_per_size(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    if not get_spec("onnxruntime").available()[0]:
        pytest.skip("onnxruntime not installed")
    register_backend(_static_only("ort_per_size", None))
    try:
        torch.manual_seed(1)
        model = SeqModel().eval()
        fn, reports = _compile(model, ("ort_per_size",), tmp_path, dynamic=True)
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="torch_collage"):
            for length in (5, 8, 11, 8):
                x = torch.randn(2, length, 16)
                torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    finally:
        unregister_backend("ort_per_size")
    assert len(reports) == 1 and reports[0].chosen == "ort_per_size"
    compiled = [r for r in caplog.records if "compiled for a new size" in r.getMessage()]
    assert len(compiled) == 2  # 8 and 11; the second 8 reuses its compile


def test_range_compile_that_fails_at_a_new_size_falls_back_per_size(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend whose 'range' compile is really for one size (it raises at others) is caught at the
    first new size, and that size and every later one are still right."""
    if not get_spec("onnxruntime").available()[0]:
        pytest.skip("onnxruntime not installed")
    static = get_spec("onnxruntime").compile

    def one_size_only(gm: fx.GraphModule, example, dims):  # type: ignore[no-untyped-def]
        del dims
        return static(gm, example)

    register_backend(_static_only("ort_liar", one_size_only))
    try:
        torch.manual_seed(2)
        model = SeqModel().eval()
        fn, reports = _compile(model, ("ort_liar",), tmp_path, dynamic=True)
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="torch_collage"):
            for length in (5, 9, 12):
                x = torch.randn(2, length, 16)
                torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    finally:
        unregister_backend("ort_liar")
    assert len(reports) == 1
    assert any("failed at a new size" in r.getMessage() for r in caplog.records)


def test_range_key_ignores_symbolic_sizes_only() -> None:
    dims, scalar = [frozenset({1}), frozenset()], [False, False]
    a = range_key([torch.randn(2, 5), torch.randn(3)], dims, scalar)
    assert a == range_key([torch.randn(2, 9), torch.randn(3)], dims, scalar)
    assert a != range_key([torch.randn(4, 5), torch.randn(3)], dims, scalar)  # a static size
    assert a != range_key([torch.randn(2, 5, dtype=torch.float64), torch.randn(3)], dims, scalar)
    assert a != range_key([torch.randn(5, 2).t(), torch.randn(3)], dims, scalar)  # layout
    assert range_key([7], [frozenset()], [True]) == range_key([9], [frozenset()], [True])
    assert range_key([7], [frozenset()], [False]) != range_key([9], [frozenset()], [False])


def _greedy(model: nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)  # type: ignore[operator]


def test_hf_generate_with_compiled_forward_matches_eager_greedy_tokens(tmp_path) -> None:
    pytest.importorskip("transformers")
    from torch_zoo.hf import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES["gpt2"][0]().eval()
    ids = torch.randint(0, 200, (1, 6))
    want = _greedy(model, ids, 12)
    model.forward, reports = _compile(model.forward, ("onnxruntime",), tmp_path, dynamic=True)
    assert torch.equal(_greedy(model, ids, 12), want)
    assert len(reports) <= 2, [r.shape_range for r in reports]  # prefill, decode: each placed once


def test_compile_exported_with_dynamic_shapes_places_once_for_the_range(tmp_path) -> None:
    if not get_spec("onnxruntime").available()[0]:
        pytest.skip("onnxruntime not installed")
    import torch_collage

    torch.manual_seed(3)
    model = SeqModel().eval()
    seq = torch.export.Dim("seq", min=2, max=40)
    compiled = torch_collage.compile_exported(
        model, torch.randn(2, 10, 16), dynamic_shapes={"x": {1: seq}}, backends=["onnxruntime"],
        mode="fast", cache_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    for length in (3, 10, 27, 40):
        x = torch.randn(2, length, 16)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(compiled.report.graphs) == 1 and "in [2, 40]" in compiled.report.graphs[0].shape_range
    with pytest.raises(
        ValueError, match=r"input 0: size 41 of dimension 1 is outside the exported range \[2, 40\]"
    ):
        compiled(torch.randn(2, 41, 16))
    with pytest.raises(ValueError, match="input 0: compiled for shape"):
        compiled(torch.randn(3, 10, 16))  # the batch stayed static


def test_explain_shows_the_range_a_placement_covers(tmp_path) -> None:
    import torch_collage

    torch.manual_seed(4)
    model = SeqModel().eval()
    x = torch.randn(2, 11, 16)
    torch._dynamo.mark_dynamic(x, 1, min=3, max=99)
    report = torch_collage.explain(
        model, x, backends=["eager"], mode="fast", cache_dir=str(tmp_path), progress=False
    )
    text = report.to_markdown()
    assert "Placed once for every size of s" in text and "in [3, 99]; placed at" in text and "=11" in text


def test_structure_key_leaves_out_sizes_only() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.graph import DataflowGraph
    from torch_collage.place import _structure_key

    model, options = SeqModel().eval(), CollageOptions(progress=False)

    def key(m: nn.Module, x: torch.Tensor, kind: str = "inference", opts: CollageOptions = options) -> str:
        with torch.no_grad():
            return _structure_key(DataflowGraph.from_graph(make_fx(m)(x).graph), kind, opts)

    short, long = torch.randn(2, 5, 16), torch.randn(2, 11, 16)
    assert key(model, short) == key(model, long)
    assert key(model, short) != key(model, short, "forward")
    assert key(model, short) != key(model, short, opts=dataclasses.replace(options, backends=("inductor",)))
    deeper = nn.Sequential(model, nn.ReLU())
    assert key(model, short) != key(deeper, short)


def test_generate_with_automatic_dynamic_searches_twice_and_places_the_range_like_its_first_step(
    tmp_path,
) -> None:
    """Dynamo hands collage the prompt, the first decode step at fixed sizes, then the decode step
    for every cache length: the last is placed like the first step, not searched, and the tokens are
    eager's ([Note: a graph generalised to a range is placed like the graph it came from])."""
    pytest.importorskip("transformers")
    from torch_zoo.hf import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES["llama"][0]().eval()
    ids = torch.randint(1, 200, (1, 7))
    want = _greedy(model, ids, 10)
    model.forward, reports = _compile(model.forward, ("onnxruntime", "inductor"), tmp_path)
    try:
        got = _greedy(model, ids, 10)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)
    searched = [r for r in reports if not r.placed_like]
    like = [r for r in reports if r.placed_like]
    assert len(searched) == 2 and len(like) == 1, [(r.shape_range, r.placed_like) for r in reports]
    assert like[0].shape_range and not searched[1].shape_range  # the range, placed like the fixed step
    assert like[0].chosen in (searched[1].chosen, "eager") and like[0].candidates == 0
    assert "[1, 1]" in like[0].placed_like  # the first decode step's ids

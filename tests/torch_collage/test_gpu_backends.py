"""The NVIDIA GPU backends (tensorrt, cutlass, triton, onnxruntime_cuda).

CPU side (always run): each capability spec on a real ATen graph of a small conv + linear + gelu
model whose fake values are moved to a (fake) CUDA device, the dtype predicates, CUTLASS's epilogue
matcher, availability reasons, and placement asking for an unavailable GPU backend. GPU side
(marker ``gpu``, skipped without CUDA): each backend compiles small models and matches eager within
a tolerance set by eager's own error against a float64 reference.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends import GPU_BACKENDS, BackendCompileError, get_backend
from torch_collage.backends.base import op_name
from torch_collage.backends.cutlass import match_fused
from torch_collage.backends.registry import get_spec
from torch_collage.backends.triton import triton_claims
from torch_collage.candidates import enumerate_candidates
from torch_collage.cost import record_values
from torch_collage.graph import DataflowGraph
from torch_collage.place import Placer
from torch_collage.subgraph import extract, fold_constants

GPU = tuple(GPU_BACKENDS)
HAS_CUDA = torch.cuda.is_available()


class ConvLinearGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # convolution -> relu
        h = h.mean(dim=(2, 3))
        h = torch.relu(self.fc1(h))  # t, addmm -> relu
        return torch.softmax(F.gelu(self.fc2(h)), dim=-1)  # t, addmm -> gelu -> softmax


def _aten_graph(module: nn.Module, *inputs: torch.Tensor, device: str = "cuda") -> fx.GraphModule:
    """``module``'s ATen graph (make_fx, fake values), with every fake value moved to ``device``: what
    Collage sees for a model on that device, built here without one."""
    gm = make_fx(module, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            with mode:
                node.meta["val"] = torch.empty_strided(
                    val.shape, val.stride(), dtype=val.dtype, device=device
                )
    return gm


def _claims(backend: str, gm: fx.GraphModule) -> dict[str, bool]:
    """op name of every call_function node -> whether ``backend``'s spec claims it (names may repeat:
    the value is then whether it claims all of them)."""
    spec = get_spec(backend)
    out: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            out[op_name(node)] = out.get(op_name(node), True) and spec.supports_node(node)
    return out


@pytest.fixture(scope="module")
def cuda_graph() -> fx.GraphModule:
    return _aten_graph(ConvLinearGelu(), torch.randn(2, 3, 8, 8))


def test_graph_has_the_ops_the_tests_expect(cuda_graph: fx.GraphModule) -> None:
    ops = {op_name(n) for n in cuda_graph.graph.nodes if n.op == "call_function"}
    assert {"aten.convolution", "aten.relu", "aten.addmm", "aten.gelu", "aten._softmax", "aten.mean"} <= ops


def test_cutlass_claims_gemm_conv_and_their_epilogues_only(cuda_graph: fx.GraphModule) -> None:
    claims = _claims("cutlass", cuda_graph)
    for op in ("aten.convolution", "aten.addmm", "aten.relu", "aten.gelu"):
        assert claims[op], op
    for op in ("aten._softmax", "aten.mean", "aten.t"):
        assert not claims[op], op
    assert get_spec("cutlass").fusion == "elementwise_epilogue"


def test_cutlass_candidates_are_anchor_plus_epilogue(cuda_graph: fx.GraphModule) -> None:
    graph = DataflowGraph.from_graph(cuda_graph.graph)
    cands = enumerate_candidates(graph, [get_spec("cutlass")], max_depth=3)
    chains = {tuple(op_name(graph.units[i][0]) for i in sorted(_bits(c.mask))) for c in cands}
    assert ("aten.addmm", "aten.relu") in chains
    assert ("aten.convolution", "aten.relu") in chains
    assert ("aten.addmm", "aten.gelu") in chains
    assert not any("aten._softmax" in chain or "aten.mean" in chain for chain in chains)


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


@pytest.mark.parametrize("backend", ["tensorrt", "triton", "onnxruntime_cuda"])
def test_region_backends_claim_every_op_on_cuda(backend: str, cuda_graph: fx.GraphModule) -> None:
    claims = _claims(backend, cuda_graph)
    assert all(claims.values()), {op: ok for op, ok in claims.items() if not ok}
    assert get_spec(backend).fusion == "region"


@pytest.mark.parametrize("backend", GPU)
def test_nothing_on_cpu_tensors_is_claimed(backend: str) -> None:
    cpu_graph = _aten_graph(ConvLinearGelu(), torch.randn(2, 3, 8, 8), device="cpu")
    assert not any(_claims(backend, cpu_graph).values())


def test_dtype_predicates() -> None:
    model = ConvLinearGelu().double()
    graph64 = _aten_graph(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert not any(_claims("cutlass", graph64).values())  # CUTLASS: float32/float16/bfloat16 only
    for backend in ("tensorrt", "onnxruntime_cuda"):  # no float64 in TensorRT; ORT-CUDA: not claimed
        claims = _claims(backend, graph64)
        assert not claims["aten.addmm"] and not claims["aten.convolution"], backend
    assert all(_claims("triton", graph64).values())  # Inductor handles float64

    class IntOps(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 3 + 1).sum(-1)

    graph_int = _aten_graph(IntOps(), torch.randint(0, 9, (4, 5)))
    assert not any(_claims("cutlass", graph_int).values())
    assert all(_claims("tensorrt", graph_int).values())
    assert all(_claims("onnxruntime_cuda", graph_int).values())

    half = _aten_graph(ConvLinearGelu().half(), torch.randn(2, 3, 8, 8, dtype=torch.float16))
    assert _claims("cutlass", half)["aten.addmm"] and _claims("onnxruntime_cuda", half)["aten.addmm"]


class _Epilogues(nn.Module):
    """mm + residual add + relu (claimable), relu before a residual add, and tanh-approximate gelu."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused = torch.relu(x @ self.w + r)
        post = torch.relu(x @ self.w.t()) + r
        approx = F.gelu(x.mm(self.w) * 2, approximate="tanh")
        return fused, post, approx


def test_cutlass_epilogue_forms() -> None:
    gm = _aten_graph(_Epilogues(), torch.randn(4, 8), torch.randn(4, 8))
    spec = get_spec("cutlass")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    adds = [n for n in nodes if op_name(n) == "aten.add"]
    relus = [n for n in nodes if op_name(n) == "aten.relu"]
    assert len(adds) == 2 and len(relus) == 2
    assert spec.supports_node(adds[0]) and spec.supports_node(relus[0])  # relu(x @ w + r)
    assert spec.supports_node(relus[1])  # relu(x @ w.t()): claimed, the add after it is not
    assert not spec.supports_node(adds[1])  # its chain input is a relu: not act(A @ B + C)
    assert not any(spec.supports_node(n) for n in nodes if op_name(n) in ("aten.gelu", "aten.mul"))
    assert all(spec.supports_node(n) for n in nodes if op_name(n) == "aten.mm")


def test_cutlass_matcher_reads_the_fused_form_and_names_what_does_not_fit() -> None:
    gm = _aten_graph(ConvLinearGelu(), torch.randn(2, 3, 8, 8), device="cpu")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    addmm = next(n for n in nodes if op_name(n) == "aten.addmm")
    relu = next(iter(addmm.users))
    fused = match_fused(fold_constants(extract(gm, [addmm, relu]).module))  # t(W) is copied in
    assert (fused.kind, fused.activation, len(fused.terms)) == ("gemm", "relu", 1)  # the bias, beta 1

    conv = next(n for n in nodes if op_name(n) == "aten.convolution")
    fused = match_fused(extract(gm, [conv, next(iter(conv.users))]).module)
    assert fused.kind == "conv" and fused.activation == "relu" and fused.conv == ((1, 1), (1, 1), (1, 1))

    with pytest.raises(BackendCompileError, match="must start with") as info:
        match_fused(extract(gm, [relu]).module)
    assert info.value.backend == "cutlass" and info.value.op == "aten.relu.default"
    softmax = next(n for n in nodes if op_name(n) == "aten._softmax")
    gelu = softmax.args[0]
    assert isinstance(gelu, fx.Node)
    addmm2 = gelu.args[0]
    with pytest.raises(BackendCompileError, match="last op") as info:
        match_fused(fold_constants(extract(gm, [addmm2, gelu, softmax]).module))
    assert info.value.op == "aten._softmax.default"


def test_triton_claims_decode_attention_where_its_kernel_fits() -> None:
    torch_cp_ops = pytest.importorskip("torch_cp._ops")
    if not torch_cp_ops.HAS_CPU_KERNELS:
        pytest.skip("torch_cp's extension is not built")
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def call(head_dim: int, dtype: torch.dtype) -> fx.Node:
        graph = fx.Graph()
        q, k, v = (graph.placeholder(n) for n in "qkv")
        with mode:
            q.meta["val"] = torch.empty(1, 8, 1, head_dim, dtype=dtype, device="cuda")
            k.meta["val"] = v.meta["val"] = torch.empty(1, 2, 64, head_dim, dtype=dtype, device="cuda")
        op = torch.ops.torch_cp.decode_attention.default
        node = graph.call_function(op, (q, k, v, None, None, None, 0.125, 0.0, False, -1, 0))
        with mode:
            node.meta["val"] = (
                torch.empty(1, 8, 1, head_dim, device="cuda"),
                torch.empty(1, 8, 1, device="cuda"),
            )
        return node

    assert op_name(call(64, torch.float16)) == "torch_cp.decode_attention"
    assert triton_claims(call(64, torch.float16))
    assert triton_claims(call(128, torch.float32))
    assert not triton_claims(call(512, torch.float32))  # head dim above the kernel's 256
    assert not triton_claims(call(64, torch.float64))


def test_triton_swaps_in_the_project_decode_kernel() -> None:
    """In a subprocess with TRITON_INTERPRET=1 (it imports triton; see tests/torch_cp/test_triton.py)."""
    pytest.importorskip("triton")
    torch_cp_ops = pytest.importorskip("torch_cp._ops")
    if not torch_cp_ops.HAS_CPU_KERNELS:
        pytest.skip("torch_cp's extension is not built")
    code = textwrap.dedent(
        """
        import torch
        from torch import fx
        import torch_cp._ops
        from torch_collage.backends.triton import use_project_kernels
        graph = fx.Graph()
        q, k, v = (graph.placeholder(n) for n in "qkv")
        out = graph.call_function(
            torch.ops.torch_cp.decode_attention.default, (q, k, v, None, None, None, 0.5, 0.0, False, -1, 0)
        )
        graph.output(out)
        gm = fx.GraphModule(torch.nn.Module(), graph)
        swapped = use_project_kernels(gm)
        targets = [str(n.target) for n in swapped.graph.nodes if n.op == "call_function"]
        assert targets == ["torch_cp.triton_decode_attention.default"], targets
        assert str(next(n for n in gm.graph.nodes if n.op == "call_function").target) == (
            "torch_cp.decode_attention.default"
        )
        q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
        got, want = swapped(q, k, v), gm(q, k, v)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --- availability and placement on a machine without them ----------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the reasons given without CUDA")
@pytest.mark.parametrize("backend", GPU)
def test_listed_unavailable_with_a_reason(backend: str) -> None:
    info = torch_collage.list_backends()[backend]
    assert not info.available and not info.version
    assert "not installed" in info.reason or "no CUDA device" in info.reason, info.reason
    assert "torch-collage[gpu]" in info.reason or "CUDA" in info.reason
    b = get_backend(backend)
    assert b.available() == (False, info.reason)
    with pytest.raises(RuntimeError, match=info.reason.split(" (")[0]):
        b.version()


@pytest.mark.parametrize("backend", GPU)
def test_compile_on_cpu_inputs_is_a_compile_error(backend: str) -> None:
    gm = make_fx(nn.Linear(4, 4))(torch.randn(2, 4))
    with pytest.raises(BackendCompileError, match="runs on CUDA only") as info:
        get_backend(backend).compile(gm, (torch.randn(2, 4),))
    assert info.value.backend == backend


def test_backend_options_are_checked() -> None:
    assert get_backend("tensorrt", allow_low_precision=True).allow_low_precision  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="allow_low_precision"):
        get_backend("tensorrt", fp16=True)
    with pytest.raises(ValueError, match="optimization_level"):
        get_backend("tensorrt", optimization_level=9)


@pytest.mark.skipif(HAS_CUDA, reason="checks placement without CUDA")
def test_placing_with_an_unavailable_gpu_backend_warns_and_works(tmp_path, caplog) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING):
        report = torch_collage.explain(
            model,
            x,
            backends=["inductor", "tensorrt"],
            placer=Placer(),  # its own record of the warnings given
            cache_dir=str(tmp_path),
            max_depth=2,
            repeats=5,
            warmup=1,
        )
    assert "tensorrt" not in report.backends_used
    warned = [r.getMessage() for r in caplog.records if "tensorrt" in r.getMessage()]
    assert len(warned) == 1 and "unavailable" in warned[0] and "torch_tensorrt" in warned[0]


# --- on a GPU -----------------------------------------------------------------------------------------------


def _check_against_float64(module: nn.Module, inputs: tuple[torch.Tensor, ...], got: torch.Tensor) -> None:
    """``got`` within 10x eager's own error (against float64) plus a small floor."""
    with torch.no_grad():
        want = module(*inputs)
        ref = module.double()(*(t.double() for t in inputs))
        module.float()
    eager_err = (want.double() - ref).abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= 10 * eager_err + 1e-4, f"error {err:.3g} vs eager's {eager_err:.3g}"


def _linear_relu() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU()).cuda().eval(), (torch.randn(32, 64, device="cuda"),)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["tensorrt", "triton", "onnxruntime_cuda"])
def test_gpu_whole_model_matches_eager(backend: str, tmp_path) -> None:
    b = get_backend(backend, cache_dir=str(tmp_path)) if backend == "tensorrt" else get_backend(backend)
    ok, reason = b.available()
    if not ok:
        pytest.skip(reason)
    module = ConvLinearGelu().cuda().eval()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        fn = b.compile(module, (x,))
        y = torch.randn_like(x)
        got = fn(y)
    assert got.device.type == "cuda"
    _check_against_float64(module, (y,), got)


@pytest.mark.gpu
def test_gpu_tensorrt_engine_cache_is_reused(tmp_path) -> None:
    b = get_backend("tensorrt", cache_dir=str(tmp_path))
    ok, reason = b.available()
    if not ok:
        pytest.skip(reason)
    module, inputs = _linear_relu()
    with torch.no_grad():
        b.compile(module, inputs)
        engines = list((tmp_path / "tensorrt").glob("*.ep"))
        assert len(engines) == 1
        fn = b.compile(module, inputs)  # loaded from disk
        _check_against_float64(module, inputs, fn(*inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_cutlass_fused_linear_relu_and_conv(dtype: torch.dtype) -> None:
    b = get_backend("cutlass")
    ok, reason = b.available()
    if not ok:
        pytest.skip(reason)
    module, inputs = _linear_relu()
    gm = make_fx(module)(*inputs)
    nodes = [
        n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in ("aten.addmm", "aten.relu")
    ]
    sub = extract(gm, nodes)
    values = record_values(gm, inputs)
    sub_inputs = tuple(values[n].to(dtype) for n in sub.inputs)
    with torch.no_grad():
        fn = b.compile(sub.module, sub_inputs)
        got = fn(*sub_inputs)[0]
        want = sub.module(*sub_inputs)[0]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).cuda().eval()
    x = torch.randn(2, 8, 12, 12, device="cuda")
    cgm = make_fx(conv)(x)
    cnodes = [n for n in cgm.graph.nodes if n.op == "call_function"]
    csub = extract(cgm, cnodes)
    cvalues = record_values(cgm, (x,))
    cin = tuple(cvalues[n].to(dtype) for n in csub.inputs)
    with torch.no_grad():
        got = b.compile(csub.module, cin)(*cin)[0]
        want = csub.module(*cin)[0]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_collage_places_on_gpu_backends(tmp_path) -> None:
    available = [name for name in GPU if get_backend(name).available()[0]]
    if not available:
        pytest.skip("no GPU backend available")
    module = ConvLinearGelu().cuda().eval()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    torch._dynamo.reset()
    opts = {"backends": ["eager", *available], "cache_dir": str(tmp_path), "max_depth": 2, "repeats": 5}
    with torch.no_grad():
        got = torch.compile(module, backend="collage", options=opts)(x)
    _check_against_float64(module, (x,), got)

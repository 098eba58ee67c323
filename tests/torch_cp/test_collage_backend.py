"""torch_cp as a Collage backend (torch_cp/collage_backend.py): listed through its entry point, the
attention nodes it claims and refuses, a compiled node against a float64 SDPA on fresh inputs, and a
decode attention placed on it by ``torch_collage.explain`` where it measures faster than SDPA."""

from __future__ import annotations

import operator
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

import torch_collage
from torch_collage.backends.base import op_name
from torch_collage.backends.registry import get_spec
from torch_collage.subgraph import extract
from torch_cp import _ops
from torch_cp.collage_backend import SPEC, unsupported_reason

pytestmark = pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")

FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu"
SDPA = "aten.scaled_dot_product_attention"


def aot_inference_graph(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> fx.GraphModule:
    """The ATen inference graph aot_autograd hands a backend for ``fn`` (what collage places)."""
    return _capture(fn, *inputs)[0]


def _capture(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor):
    """The inference graph of ``fn`` and the real tensors it is called with (in its input order)."""
    captured: list[tuple[fx.GraphModule, tuple[torch.Tensor, ...]]] = []

    def compiler(gm: fx.GraphModule, example_inputs: object) -> Callable[..., object]:
        def run(args: list[torch.Tensor]) -> object:
            captured.append((gm, tuple(args)))
            return gm(*args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=compiler, inference_compiler=compiler)
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    assert len(captured) == 1
    return captured[0]


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in (FLASH_CPU, SDPA)]


def qkv(b, hq, hkv, sq, kv_len, d, dtype, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # HF's layout: [B, S, H, D] viewed as [B, H, S, D]
        q = torch.randn(b, sq, hq, d, generator=g).to(dtype).transpose(1, 2)
        k, v = (torch.randn(b, kv_len, hkv, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
        return q, k, v
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, kv_len, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def test_listed_through_its_entry_point_and_available() -> None:
    info = torch_collage.list_backends()["torch_cp"]
    assert info.available, info.reason
    assert info.fusion == "region"  # attention with its mask, repeat_kv chains and cache updates
    assert "torch_cp" in info.version and torch.__version__ in info.version
    assert get_spec("torch_cp") is SPEC  # the object the entry point names


def test_unavailable_without_the_extension_and_placement_goes_on() -> None:
    """A process where ``torch_cp._C`` cannot be imported: listed unavailable with the reason, and a
    placement asked to use it places without it."""
    script = textwrap.dedent(
        """
        import sys, tempfile
        sys.modules["torch_cp._C"] = None  # makes `import torch_cp._C` raise ImportError
        import torch, torch.nn.functional as F, torch_collage
        info = torch_collage.list_backends()["torch_cp"]
        assert not info.available and "torch_cp._C" in info.reason, info
        q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 32, 16)
        f = lambda q, k: F.scaled_dot_product_attention(q, k, k)
        with tempfile.TemporaryDirectory() as d:
            report = torch_collage.explain(f, q, k, backends=["eager", "torch_cp"], max_depth=1,
                                           repeats=1, warmup=0, cache_dir=d)
        assert report.backends_used == ["eager"], report.backends_used
        print("ok", info.reason)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok torch_cp._C could not be imported")


def _decode(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_claims_the_attention_of_aot_inference_graphs(dtype: torch.dtype) -> None:
    q, k, v = qkv(2, 8, 2, 1, 64, 16, dtype, seed=1)
    mask = torch.rand(2, 1, 1, 64) > 0.3
    gm = aot_inference_graph(_decode, q, k, v, mask)
    (node,) = attention_nodes(gm)
    assert op_name(node) == FLASH_CPU  # what aot_autograd lowers SDPA to on CPU
    assert SPEC.supports_node(node), unsupported_reason(node)
    others = [n for n in gm.graph.nodes if n.op == "call_function" and n is not node]
    claimed = [op_name(n) for n in others if SPEC.supports_node(n)]
    assert others and claimed == ["aten.where"]  # the mask's where (it runs as is); not the getitem
    causal = aot_inference_graph(_causal, *qkv(1, 4, 4, 5, 9, 16, dtype, seed=2))  # Sq != L
    assert all(SPEC.supports_node(n) for n in attention_nodes(causal))


def test_claims_sdpa_of_pre_dispatch_graphs() -> None:
    q, k, v = qkv(1, 4, 2, 3, 10, 8, torch.float32, seed=3)
    gm = make_fx(_decode, pre_dispatch=True)(q, k, v, torch.rand(1, 4, 3, 10) > 0.5)
    (node,) = attention_nodes(gm)
    assert op_name(node) == SDPA and SPEC.supports_node(node), unsupported_reason(node)


def _dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


def _lse_used(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse


@pytest.mark.parametrize(
    ("fn", "dtype", "why"),
    [
        (_dropout, torch.float32, "dropout_p must be 0"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), torch.float64, "dtype"),
        (_lse_used, torch.float32, "log-sum-exp"),
    ],
    ids=["dropout", "float64", "lse used"],
)
def test_refuses(fn: Callable[..., object], dtype: torch.dtype, why: str) -> None:
    q, k, v = qkv(1, 2, 2, 2, 6, 8, dtype, seed=4)
    gm = make_fx(fn, pre_dispatch=True)(q, k, v)
    (node,) = attention_nodes(gm)
    assert not SPEC.supports_node(node)
    assert why in unsupported_reason(node)


def _node_inputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], node: fx.Node):
    """The partition of ``node`` (with its getitems), and the values flowing into it from ``inputs``."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*inputs)
    getitems = [u for u in node.users if u.target is operator.getitem]
    part = extract(gm, [node, *getitems])
    return part, tuple(interpreter.env[n] for n in part.inputs), interpreter.env[getitems[0]]


def _sdpa64(q, k, v, mask, is_causal, scale):
    mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )


CASES = {  # name: (B, Hq, Hkv, Sq, L, D, mask kind, is_causal, scale, transposed)
    "decode, GQA, bool mask": (2, 8, 2, 1, 300, 64, "bool", False, None, False),
    "two queries, float mask, scale": (1, 4, 4, 2, 130, 32, "float", False, 0.2, False),
    "causal, Sq < L, GQA, HF layout": (1, 6, 3, 5, 40, 16, None, True, None, True),
    "causal, Sq > L": (2, 2, 1, 9, 4, 8, None, True, None, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_node_matches_sdpa(case: str, dtype: torch.dtype) -> None:
    b, hq, hkv, sq, kv_len, d, mask_kind, is_causal, scale, transposed = CASES[case]
    seed = 10 + list(CASES).index(case)
    q, k, v = qkv(b, hq, hkv, sq, kv_len, d, dtype, seed, transposed)
    g = torch.Generator().manual_seed(seed)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, 1, kv_len, generator=g) > 0.4
        mask[0] = False  # batch row 0 sees no key: SDPA's CPU kernel gives 0, and so does torch_cp
    elif mask_kind == "float":
        mask = (torch.randn(1, hq, sq, kv_len, generator=g) * 2).to(dtype)
        mask[..., 50:120] = float("-inf")

    def fn(q, k, v, *m):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=m[0] if m else None, is_causal=is_causal, scale=scale, enable_gqa=True
        )

    gm, graph_inputs = _capture(fn, *((q, k, v) if mask is None else (q, k, v, mask)))
    (node,) = attention_nodes(gm)
    assert SPEC.supports_node(node), unsupported_reason(node)
    part, part_inputs, eager_out = _node_inputs(gm, graph_inputs, node)
    (out,) = SPEC.compile(part.module, part_inputs)(*part_inputs)
    ref = _sdpa64(q, k, v, mask, is_causal, scale)
    assert out.dtype == eager_out.dtype and out.shape == eager_out.shape
    assert out.stride() == eager_out.stride()
    eager_err = (eager_out.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * eager_err + (1e-5 if dtype == torch.float32 else 1e-2), (err, eager_err)


class DecodeAttention(torch.nn.Module):
    """One query token over a static KV cache; the bool mask marks the slots that hold tokens."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_explain_places_decode_attention_on_torch_cp(tmp_path) -> None:
    kv_len = 4096
    q, k, v = qkv(1, 8, 2, 1, kv_len, 64, torch.float32, seed=20)
    mask = (torch.arange(kv_len) < int(0.75 * kv_len)).view(1, 1, 1, kv_len)
    options = {"backends": ["eager", "torch_cp"], "max_depth": 1, "repeats": 3, "warmup": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: two threads on a shared 2-core machine time the scheduler
    try:
        report = torch_collage.explain(DecodeAttention(), q, k, v, mask, cache_dir=tmp_path, **options)
        compiled = torch.compile(
            DecodeAttention(), backend="collage", options={**options, "cache_dir": str(tmp_path)}
        )
        with torch.no_grad():
            out = compiled(q, k, v, mask)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    (graph,) = report.graphs
    assert graph.usable.get("torch_cp", 0) >= 1  # collage ran its candidate and checked the output
    # measured faster than SDPA: the attention alone, or with the mask's where (the whole graph)
    assert "torch_cp[1]" in graph.searched or "torch_cp[2]" in graph.searched, report.to_markdown()
    assert graph.chosen in ("mixed", "torch_cp"), report.to_markdown()  # it may take the mask's where too
    (placed,) = [p for p in graph.partitions if any("attention" in n for n in p.nodes)]
    assert placed.backend == "torch_cp" and placed.runner_up == "eager"
    assert placed.measured_ms < placed.runner_up_ms
    torch.testing.assert_close(out, DecodeAttention()(q, k, v, mask), rtol=1e-5, atol=1e-5)

import pytest
import torch
import torch.nn.functional as F

import torch_cp
from torch_cp import _ops

needs_kernel = pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")
BACKENDS = ["cpp", "reference"] if _ops.HAS_CPU_KERNELS else ["reference"]


def _qkv(b, hq, hkv, sq, kv_len, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k, v = torch.randn(b, hkv, kv_len, d, generator=g), torch.randn(b, hkv, kv_len, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _assert_fp32_close(out, lse, ref_out, ref_lse, v):
    """The issue's bar: fp32 max error <= 2e-6 * max|V|, lse error <= 1e-5, against float64."""
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert not out.isnan().any()
    assert (out.double() - ref_out).abs().max() <= 2e-6 * v.abs().max()
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "kv_len", "d"),
    [
        (2, 8, 2, 1, 300, 64),
        (1, 4, 4, 3, 77, 32),
        (3, 6, 1, 2, 1000, 128),
        (1, 32, 8, 1, 40, 80),
        (2, 5, 5, 1, 1, 16),
    ],
)
def test_matches_float64_reference(backend, b, hq, hkv, sq, kv_len, d):
    q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=kv_len)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    _assert_fp32_close(out, lse, ref_out, ref_lse, v)


def test_matches_sdpa_without_cache_sharding():
    q, k, v = _qkv(2, 8, 2, 1, 500, 64, seed=3)
    torch.testing.assert_close(
        torch_cp.attention(q, k, v, enable_gqa=True), F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_dtype_rounding(dtype):
    q, k, v = _qkv(2, 8, 2, 2, 700, 64, dtype=dtype, seed=5)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert out.dtype == dtype
    # SDPA in the same dtype is the bar: we must be no worse than twice its error.
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    sdpa_err = (sdpa.double() - ref_out).abs().max()
    assert (out.double() - ref_out).abs().max() <= max(2 * sdpa_err, torch.finfo(dtype).eps)
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_lengths_causal_window_softcap(backend):
    q, k, v = _qkv(3, 8, 2, 3, 200, 64, seed=7)
    kv_lens = torch.tensor([200, 57, 3])
    opts = {"is_causal": True, "window": 40, "softcap": 5.0, "kv_lens": kv_lens}
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
    _assert_fp32_close(out, lse, ref_out, ref_lse, v)


@needs_kernel
def test_any_number_of_splits_agrees():
    q, k, v = _qkv(1, 8, 2, 1, 1500, 64, seed=11)
    results = [torch_cp.attention_state(q, k, v, num_splits=n) for n in (1, 2, 7, 64)]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_and_extreme_logits_are_finite(backend):
    q, k, v = _qkv(2, 4, 2, 1, 0, 32)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, seed=13)
    k[:, :, 17] = q[0, 0, 0] * 300.0  # logits around +-1e4 on one key
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and ref_lse.abs().max() > 1e3
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-2)


def test_attn_mask_runs_the_reference_path():
    q, k, v = _qkv(2, 4, 4, 2, 30, 32, seed=17)
    mask = torch.rand(2, 1, 2, 30) > 0.3
    torch.testing.assert_close(
        torch_cp.attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


@needs_kernel
def test_decode_op_opcheck_and_compile():
    q, k, v = _qkv(2, 8, 2, 1, 100, 64, seed=19)
    args = (q, k, v, torch.tensor([100, 40]), None, torch.tensor([99, 39]), 0.125, 0.0, True, -1, 0)
    torch.library.opcheck(torch.ops.torch_cp.decode_attention, args)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: torch_cp.attention(q * 2, k, v, enable_gqa=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), torch_cp.attention(q * 2, k, v, enable_gqa=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": torch.randn(2, 3, 10, 16), "v": torch.randn(2, 3, 10, 16)}, "multiple of k heads"),
        ({"enable_gqa": False}, "enable_gqa=True"),
        ({"v": torch.randn(2, 2, 11, 16)}, "same shape"),
        ({"k": torch.randn(2, 2, 10, 8), "v": torch.randn(2, 2, 10, 8)}, "head dim"),
        ({"q": torch.randn(4, 16)}, "q must be 4-D"),
        ({"v": torch.randn(2, 2, 10, 16, dtype=torch.float64)}, "share a dtype"),
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"kv_lens": torch.tensor([1, 2, 3])}, "kv_lens"),
        ({"window": 0}, "window"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"q": torch.randn(2, 4, 1, 16), "k": torch.randn(2, 2, 10, 16), "v": torch.randn(2, 2, 10, 16)}
    args.update(enable_gqa=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        torch_cp.attention(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_key_positions_default_to_the_last_queries(backend):
    # Keys stored out of order with gaps; the queries follow the largest valid position.
    q, k, v = _qkv(2, 4, 2, 2, 50, 32, seed=23)
    kv_pos = torch.stack([torch.randperm(50, generator=torch.Generator().manual_seed(s)) * 2 for s in (0, 1)])
    kv_lens = torch.tensor([50, 31])
    opts = {"is_causal": True, "kv_pos": kv_pos, "kv_lens": kv_lens, "window": 60}
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend, **opts)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
    _assert_fp32_close(out, lse, ref_out, ref_lse, v)
    assert torch.isfinite(lse).all()


_NARROW_ISA_CHECK = """
import torch, torch_cp
worst = 0.0
for b, hq, hkv, sq, kv_len, d, causal, softcap in [
    (2, 8, 2, 1, 300, 64, False, 0.0), (1, 6, 2, 2, 77, 32, True, 0.0), (1, 3, 1, 1, 1000, 128, False, 30.0),
    (1, 4, 4, 1, 40, 80, False, 0.0), (2, 5, 5, 1, 1, 16, False, 0.0),
]:
    g = torch.Generator().manual_seed(kv_len)
    q = torch.randn(b, hq, sq, d, generator=g)
    k, v = torch.randn(b, hkv, kv_len, d, generator=g), torch.randn(b, hkv, kv_len, d, generator=g)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, is_causal=causal, return_lse=True, backend="cpp",
                                  softcap=softcap or None)
    ref, ref_lse = torch_cp.attention_reference(q, k, v, is_causal=causal, softcap=softcap or None)
    assert (out.double() - ref).abs().max() <= 2e-6 * v.abs().max(), (b, hq, hkv, sq, kv_len, d)
    assert (lse.double() - ref_lse).abs().max() <= 1e-5, (b, hq, hkv, sq, kv_len, d)
print("ok")
"""


@needs_kernel
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_narrower_instruction_set_builds_match_the_reference(isa):
    """The kernel is compiled per instruction set; this CPU runs the widest, so the others are
    checked in a subprocess capped with TORCH_CP_CPU_ISA (16- and 8-lane reductions differ)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_CP_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _NARROW_ISA_CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]

"""The CUDA kernel (csrc/cuda/decode_attention.cu) and the Triton kernels on a GPU, against float64.

GPU twins of tests/torch_cp/test_attention.py (C++ CPU kernel) and test_triton.py (interpreter); they
skip without CUDA (tests/conftest.py). Every test runs once per GPU backend: ``cuda`` needs the built
``torch_cp._cuda`` extension, ``triton`` the triton package.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import torch_cp
from tests.torch_cp.test_attention import _assert_fp32_close
from tests.torch_cp.test_attention import _qkv as _qkv_cpu
from tests.torch_cp.test_masks import KINDS, POSITIONS, make_mask
from torch_cp import _ops

pytestmark = pytest.mark.gpu

BACKENDS = [
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not _ops.HAS_CUDA_KERNELS, reason="torch_cp._cuda not built")
    ),
    pytest.param(
        "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")
    ),
]


def _qkv(*args, **kwargs):
    return _qkv_cpu(*args, **kwargs, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "kv_len", "d"),
    [
        (2, 8, 2, 1, 300, 64),
        (1, 4, 4, 3, 77, 32),
        (3, 6, 1, 2, 1000, 128),
        (1, 32, 8, 1, 40, 80),
        (2, 5, 5, 1, 1, 16),
        (1, 32, 8, 1, 20000, 128),  # many tiles and splits
        (1, 32, 1, 1, 500, 128),  # MQA: 32 rows per KV head, two row blocks
        (2, 8, 4, 1, 333, 256),
        (1, 8, 2, 4, 129, 96),  # 16 rows per KV head
    ],
)
def test_matches_float64_reference(backend, b, hq, hkv, sq, kv_len, d):
    q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=kv_len)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    _assert_fp32_close(out, lse, ref_out, ref_lse, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_sdpa_error(backend, dtype):
    q, k, v = _qkv(2, 32, 8, 1, 4000, 128, dtype=dtype, seed=5)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert out.dtype == dtype
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    sdpa_err = (sdpa.double() - ref_out).abs().max()
    assert (out.double() - ref_out).abs().max() <= max(2 * sdpa_err, torch.finfo(dtype).eps)
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variable_lengths_causal_window_softcap(backend, dtype):
    q, k, v = _qkv(3, 8, 2, 3, 700, 64, dtype=dtype, seed=7)
    opts = {
        "is_causal": True,
        "window": 150,
        "softcap": 5.0,
        "kv_lens": torch.tensor([700, 257, 3], device="cuda"),
    }
    out, lse = torch_cp.attention_state(q, k, v, backend=backend, num_splits=3, **opts)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
    if dtype == torch.float32:
        _assert_fp32_close(out, lse, ref_out, ref_lse, v)
    else:  # float32 state of bfloat16 inputs: no rounding to bfloat16 yet
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_key_and_query_positions(backend):
    q, k, v = _qkv(2, 4, 2, 2, 200, 32, seed=9)
    kv_pos = torch.arange(1199, 999, -1, device="cuda").repeat(2, 1)
    opts = {
        "kv_pos": kv_pos,
        "q_pos": torch.tensor([1150, 1020], device="cuda"),
        "kv_lens": torch.tensor([200, 120], device="cuda"),
    }
    for extra in ({"is_causal": True}, {"window": 64}, {"is_causal": True, "window": 7}):
        out, lse = torch_cp.attention_state(q, k, v, backend=backend, num_splits=2, **opts, **extra)
        _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v, **opts, **extra), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_number_of_splits_agrees(backend):
    q, k, v = _qkv(1, 8, 2, 1, 1500, 64, seed=11)
    results = [torch_cp.attention_state(q, k, v, num_splits=n, backend=backend) for n in (1, 2, 7, 64)]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_extreme_logits_are_finite(backend):
    q, k, v = _qkv(2, 4, 2, 1, 0, 32)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v = _qkv(2, 4, 2, 1, 70, 32, seed=3)
    out, lse = torch_cp.attention_state(
        q, k, v, kv_lens=torch.tensor([0, 70], device="cuda"), backend=backend
    )
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, seed=13)
    k[:, :, 17] = q[0, 0, 0] * 300.0  # logits around +-1e4 on one key
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and ref_lse.abs().max() > 1e3
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_unaligned_caches(backend):
    """A [B, L, H, D] cache seen as [B, H, L, D] (no copy), an odd head dim and a misaligned slice."""
    q, k, v = _qkv(2, 8, 2, 1, 300, 64, dtype=torch.bfloat16, seed=15)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = torch_cp.attention_state(q, k_t, v_t, backend=backend)
    _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v), v.float())
    q, k, v = _qkv(2, 8, 2, 1, 300, 20, dtype=torch.bfloat16, seed=17)
    out, lse = torch_cp.attention_state(q, k, v, backend=backend)
    _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v), v.float())
    wide = torch.randn(2, 2, 300, 65, device="cuda", dtype=torch.bfloat16)
    q, k, v = q.new_empty(2, 8, 1, 64).normal_(), wide[..., 1:], wide.flip(-1)[..., 1:]  # 2-byte offset
    out, lse = torch_cp.attention_state(q, k, v, backend=backend)
    _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v), v.float())


def test_float64_on_the_cuda_kernel():
    if not _ops.HAS_CUDA_KERNELS:
        pytest.skip("torch_cp._cuda not built")
    q, k, v = _qkv(2, 8, 2, 2, 500, 64, dtype=torch.float64, seed=19)
    out, lse = torch_cp.attention_state(q, k, v, backend="cuda", num_splits=3)
    _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    q, k, v = _qkv(2, 8, 2, 1, 100, 64, seed=19)
    lens, q_pos = torch.tensor([100, 40], device="cuda"), torch.tensor([99, 39], device="cuda")
    op = (
        torch.ops.torch_cp.decode_attention
        if backend == "cuda"
        else torch.ops.torch_cp.triton_decode_attention
    )
    torch.library.opcheck(op, (q, k, v, lens, None, q_pos, 0.125, 0.0, True, -1, 2))
    torch._dynamo.reset()

    def step(q, k, v):
        return torch_cp.attention(q * 2, k, v, enable_gqa=True, backend=backend)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v), step(q, k, v))


def test_auto_picks_a_gpu_kernel():
    q, k, v = _qkv(1, 8, 2, 1, 64, 64)
    picked = importlib.import_module("torch_cp.attention")._pick_backend("auto", q, k, False)
    expected = (
        "cuda" if _ops.HAS_CUDA_KERNELS else "triton" if importlib.util.find_spec("triton") else "reference"
    )
    assert picked == expected
    out = torch_cp.attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out.double(), torch_cp.attention_reference(q, k, v)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positions", list(POSITIONS))
def test_masks_match_float64_reference(backend, kind, positions):
    """GPU twin of test_masks.py::test_mask_matches_float64_reference."""
    b, hq, hkv, sq, kv_len, d = 2, 8, 2, 3, 300, 64
    q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=len(kind) + 7 * len(positions))
    opts = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in POSITIONS[positions].items()}
    opts["attn_mask"] = make_mask(kind, b, hq, sq, kv_len, seed=len(kind)).cuda()
    for num_splits in (1, 3, 0):
        out, lse = torch_cp.attention_state(q, k, v, backend=backend, num_splits=num_splits, **opts)
        _assert_fp32_close(out, lse, *torch_cp.attention_reference(q, k, v, **opts), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_cache_mask_never_reads_hidden_tiles(backend):
    """GPU twin of test_masks.py::test_static_cache_never_reads_hidden_tiles."""
    lmax, length = 1024, 613
    q, k, v = _qkv(2, 32, 8, 1, lmax, 128, seed=205)
    clean = torch_cp.attention_reference(q, k[:, :, :length], v[:, :, :length])
    k[:, :, length:] = float("nan")
    v[:, :, 768:] = float("nan")
    mask = torch.arange(lmax, device="cuda") < length
    for num_splits in (1, 4, 0):
        out, lse = torch_cp.attention_state(q, k, v, attn_mask=mask, backend=backend, num_splits=num_splits)
        _assert_fp32_close(out, lse, *clean, v[:, :, :length])

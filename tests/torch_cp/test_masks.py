"""``attn_mask`` on the kernels: bool and additive masks, broadcast dims, fully masked rows, masks
combined with GQA, causal, window, softcap and kv_lens; tiles no query sees are never read (a static
cache). Every case is checked against the float64 reference; the Triton twins are in test_triton.py,
the GPU ones in test_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_cp
from tests.torch_cp.test_attention import _assert_fp32_close, _qkv
from torch_cp import _ops

needs_kernel = pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")
BACKENDS = ["cpp", "reference"] if _ops.HAS_CPU_KERNELS else ["reference"]
NEG_INF = float("-inf")


def make_mask(kind: str, b: int, hq: int, sq: int, kv_len: int, seed: int) -> torch.Tensor:
    """A fresh random mask of one broadcast form; some of its rows see no key at all."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bool [B,1,1,L]":
        return torch.rand(b, 1, 1, kv_len, generator=g) > 0.4
    if kind == "bool [B,Hq,Sq,L], empty rows":
        mask = torch.rand(b, hq, sq, kv_len, generator=g) > 0.7
        mask[0, 1] = False  # every query of head 1 in batch row 0 sees nothing
        mask[-1, :, -1] = False
        return mask
    if kind == "float [1,Hq,Sq,L] with -inf runs":
        mask = torch.randn(1, hq, sq, kv_len, generator=g) * 2
        mask[..., kv_len // 3 : kv_len // 3 + 70] = NEG_INF  # hidden tiles in the middle
        mask[:, 0, :, :] = NEG_INF  # head 0: no visible key
        return mask
    if kind == "bool [L], static cache":
        return torch.arange(kv_len) < int(0.6 * kv_len)
    if kind == "float16 [Sq,L]":
        mask = torch.randn(sq, kv_len, generator=g).half()
        return mask.masked_fill(torch.rand(sq, kv_len, generator=g) > 0.5, NEG_INF)
    if kind == "bool [B,1,Sq,L], a prefix per batch row":  # a prefill over a static cache
        held = torch.randint(1, kv_len, (b, 1, sq, 1), generator=g)
        return torch.arange(kv_len) < held - torch.arange(sq)[:, None]
    if kind == "bool [B,Hq,Sq,1]":  # broadcast over keys: a row sees all keys or none
        return torch.rand(b, hq, sq, 1, generator=g) > 0.3
    if kind == "bool expanded (stride 0)":
        return (torch.rand(b, 1, 1, kv_len, generator=g) > 0.5).expand(b, hq, sq, kv_len)
    raise AssertionError(kind)


KINDS = [
    "bool [B,1,1,L]",
    "bool [B,Hq,Sq,L], empty rows",
    "float [1,Hq,Sq,L] with -inf runs",
    "bool [L], static cache",
    "bool [B,1,Sq,L], a prefix per batch row",
    "float16 [Sq,L]",
    "bool [B,Hq,Sq,1]",
    "bool expanded (stride 0)",
]
POSITIONS = {
    "none": {},
    "causal": {"is_causal": True},
    "window, kv_lens, softcap": {"window": 90, "kv_lens": torch.tensor([300, 171]), "softcap": 4.0},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positions", list(POSITIONS))
def test_mask_matches_float64_reference(backend, kind, positions):
    b, hq, hkv, sq, kv_len, d = 2, 8, 2, 3, 300, 64  # GQA 4, Sq 3: 12 rows per KV head
    q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=len(kind) + 7 * len(positions))
    mask = make_mask(kind, b, hq, sq, kv_len, seed=len(kind))
    opts = {"attn_mask": mask, **POSITIONS[positions]}
    for num_splits in (1, 3, 0):
        out, lse = torch_cp.attention_state(q, k, v, backend=backend, num_splits=num_splits, **opts)
        ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
        _assert_fp32_close(out, lse, ref_out, ref_lse, v)
        assert torch.equal(out[torch.isneginf(ref_lse)], torch.zeros_like(out[torch.isneginf(ref_lse)]))


@needs_kernel
def test_mask_runs_on_the_kernel_and_matches_sdpa():
    q, k, v = _qkv(2, 8, 2, 1, 500, 64, seed=201)
    mask = torch.rand(2, 1, 1, 500, generator=torch.Generator().manual_seed(202)) > 0.5
    auto = torch_cp.attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(auto, torch_cp.attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpp"))
    assert not torch.equal(
        auto, torch_cp.attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="reference")
    )
    torch.testing.assert_close(auto, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    additive = torch.randn(2, 8, 1, 500, generator=torch.Generator().manual_seed(203))
    torch.testing.assert_close(
        torch_cp.attention(q, k, v, attn_mask=additive, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True),
    )


@needs_kernel
def test_static_cache_never_reads_hidden_tiles():
    """A static cache of 1024 slots holding 613 tokens: keys from slot 613 on and values from slot 768
    on (past a 128-key boundary) hold NaN. A kernel that read a hidden tile would get 0·NaN = NaN (the
    reference, which reads everything, does); a hidden NaN key never makes a row NaN."""
    lmax, length = 1024, 613
    q, k, v = _qkv(2, 32, 8, 1, lmax, 128, seed=205)
    clean = torch_cp.attention_reference(q, k[:, :, :length], v[:, :, :length])
    k[:, :, length:] = float("nan")
    v[:, :, 768:] = float("nan")
    mask = torch.arange(lmax) < length
    assert torch_cp.attention_reference(q, k, v, attn_mask=mask)[0].isnan().all()
    for num_splits in (1, 4, 0):
        out, lse = torch_cp.attention_state(q, k, v, attn_mask=mask, backend="cpp", num_splits=num_splits)
        _assert_fp32_close(out, lse, *clean, v[:, :, :length])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_mask_within_twice_sdpa_error(dtype):
    q, k, v = _qkv(2, 8, 2, 2, 700, 64, dtype=dtype, seed=207)
    mask = torch.rand(2, 8, 2, 700, generator=torch.Generator().manual_seed(208)) > 0.3
    out, lse = torch_cp.attention(q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, attn_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    sdpa_err = (sdpa.double() - ref_out).abs().max()
    assert out.dtype == dtype
    assert (out.double() - ref_out).abs().max() <= max(2 * sdpa_err, torch.finfo(dtype).eps)
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_hides_a_nan_key_and_nan_or_inf_in_the_mask_makes_the_row_nan(backend):
    q, k, v = _qkv(1, 4, 2, 2, 100, 32, seed=209)
    k[0, 0, 10] = float("nan")  # seen by heads 0 and 1 unless hidden
    mask = torch.randn(1, 4, 2, 100, generator=torch.Generator().manual_seed(210))
    mask[..., 10] = NEG_INF
    mask[0, 2, 1, 50] = float("nan")
    mask[0, 3, 0, 60] = float("inf")
    out, lse = torch_cp.attention_state(q, k, v, attn_mask=mask, backend=backend, num_splits=2)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, attn_mask=mask)
    nan_rows = torch.zeros(1, 4, 2, dtype=torch.bool)
    nan_rows[0, 2, 1] = nan_rows[0, 3, 0] = True
    assert torch.equal(lse.isnan(), nan_rows) and torch.equal(ref_lse.isnan(), nan_rows)
    assert out[nan_rows].isnan().all()
    _assert_fp32_close(out[~nan_rows], lse[~nan_rows], ref_out[~nan_rows], ref_lse[~nan_rows], v)


@needs_kernel
def test_decode_op_with_mask_opcheck_and_compile():
    q, k, v = _qkv(2, 8, 2, 1, 100, 64, seed=211)
    mask = torch.rand(2, 1, 1, 100, generator=torch.Generator().manual_seed(212)) > 0.5
    args = (q, k, v, torch.tensor([100, 40]), None, torch.tensor([99, 39]), 0.125, 0.0, True, -1, 0, mask)
    torch.library.opcheck(torch.ops.torch_cp.decode_attention, args)
    additive = torch.randn(1, 8, 1, 100, generator=torch.Generator().manual_seed(213))
    torch.library.opcheck(torch.ops.torch_cp.decode_attention, (*args[:-1], additive))
    torch._dynamo.reset()

    def step(q, k, v, mask):
        return torch_cp.attention(q * 2, k, v, attn_mask=mask, enable_gqa=True)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v, mask), step(q, k, v, mask))

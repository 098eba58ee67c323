"""Edges where a wrong number could pass silently: NaN and infinite inputs, NaN partial states in the
merges, invalid options, float64, autograd. Every backend must agree with the float64 reference
(see [Note: NaN in attention] in torch_cp/reference.py); the Triton twins are in test_triton.py."""

import math

import pytest
import torch

import torch_cp
from tests.torch_cp.test_attention import _assert_fp32_close
from torch_cp import _ops

needs_kernel = pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")
BACKENDS = ["cpp", "reference"] if _ops.HAS_CPU_KERNELS else ["reference"]
NAN = float("nan")


def _qkv(b, hq, hkv, sq, kv_len, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, kv_len, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _state(q, k, v, backend, **kw):
    return torch_cp.attention_state(q, k, v, backend=backend, **kw)


def _assert_rows(out, lse, ref_out, ref_lse, v, nan_rows):
    """Rows in ``nan_rows`` [B, Hq, Sq] are NaN in out and lse; the others match the float64 reference."""
    assert torch.equal(lse.isnan(), nan_rows) and torch.equal(ref_lse.isnan(), nan_rows)
    assert out[nan_rows].isnan().all()
    keep = ~nan_rows
    _assert_fp32_close(out[keep], lse[keep], ref_out[keep], ref_lse[keep], v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_in_q_makes_its_row_nan(backend, num_splits):
    q, k, v = _qkv(2, 4, 2, 2, 300, 64, seed=101)
    q[1, 2, 0, 5] = NAN
    out, lse = _state(q, k, v, backend, num_splits=num_splits)
    nan_rows = torch.zeros(2, 4, 2, dtype=torch.bool)
    nan_rows[1, 2, 0] = True
    _assert_rows(out, lse, *torch_cp.attention_reference(q, k, v), v, nan_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_inf_in_a_visible_key_makes_rows_nan(backend):
    q, k, v = _qkv(2, 4, 2, 1, 100, 32, seed=103)
    k[0, 1, 40, 3] = NAN  # every query of KV head 1 in batch row 0 sees it
    k[1, 0, 7] = math.inf  # q·k is NaN or +inf (a NaN row, as in SDPA's math path), or -inf (hidden)
    out, lse = _state(q, k, v, backend, num_splits=2)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    nan_rows = ref_lse.isnan()
    assert nan_rows[0, 2:].all() and not nan_rows[0, :2].any() and nan_rows[1].any()
    _assert_rows(out, lse, ref_out, ref_lse, v, nan_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_visible_value_makes_its_row_nan(backend):
    q, k, v = _qkv(1, 2, 1, 1, 50, 32, seed=105)
    v[0, 0, 20, 4] = NAN
    out, lse = _state(q, k, v, backend)
    assert out[..., 4].isnan().all() and not out[..., :4].isnan().any() and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_keys_and_unused_slots_never_make_nan(backend):
    """Slots past kv_lens (a static cache's unused slots) and causally hidden keys hold NaN here."""
    q, k, v = _qkv(2, 4, 2, 2, 80, 32, seed=107)
    kv_lens = torch.tensor([60, 0])
    clean = torch_cp.attention_reference(
        q, k, v, kv_lens=kv_lens, is_causal=True, q_pos=torch.tensor([30, 0])
    )
    k[:, :, 60:], v[:, :, 60:] = NAN, NAN
    k[0, :, 40] = NAN  # hidden from both queries (positions 30 and 31)
    out, lse = _state(q, k, v, backend, kv_lens=kv_lens, is_causal=True, q_pos=torch.tensor([30, 0]))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    _assert_fp32_close(out, lse, *clean, v[:, :, :60])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_nan_shard_poisons_the_exact_merge_and_an_empty_one_does_not(backend):
    q, k, v = _qkv(1, 4, 2, 1, 200, 32, seed=109)
    first = _state(q, k[:, :, :120], v[:, :, :120], backend)
    nan_k = torch.full_like(k[:, :, 120:], NAN)
    poisoned = _state(q, nan_k, v[:, :, 120:], backend)
    assert poisoned[1].isnan().all() and poisoned[0].isnan().all()
    empty = _state(q, k[:, :, 120:], v[:, :, 120:], backend, kv_lens=torch.tensor([0]))
    assert torch.equal(empty[0], torch.zeros_like(empty[0])) and torch.isneginf(empty[1]).all()
    for merge in (torch_cp.merge_states, torch_cp.merge_states_reference):
        out, lse = merge(torch.stack([first[0], poisoned[0]]), torch.stack([first[1], poisoned[1]]))
        assert out.isnan().all() and lse.isnan().all(), merge
        out, lse = merge(torch.stack([first[0], empty[0]]), torch.stack([first[1], empty[1]]))
        torch.testing.assert_close(out, first[0].to(out.dtype), rtol=0, atol=0)
        torch.testing.assert_close(lse.float(), first[1], rtol=0, atol=0)


@pytest.mark.parametrize("merge", [torch_cp.merge_states, torch_cp.merge_states_reference])
def test_merge_keeps_nan_partials_and_skips_empty_parts(merge):
    g = torch.Generator().manual_seed(111)
    out, lse = torch.randn(3, 6, 16, generator=g), torch.randn(3, 6, generator=g) * 3
    lse[0, 0] = NAN  # a NaN row's lse
    lse[1, 1] = math.inf
    out[2, 2, 5] = NAN  # NaN output of a part whose weight underflows to 0
    lse[2, 2] = lse[:2, 2].max() - 200.0
    lse[:, 3] = -math.inf  # all parts empty, holding NaN
    out[:, 3] = NAN
    lse[1, 4] = -math.inf  # one empty part holding NaN
    out[1, 4] = NAN
    merged, merged_lse = merge(out, lse)
    assert merged[:3].isnan().any(dim=-1).all() and merged_lse[:2].isnan().all()
    assert torch.equal(merged[3], torch.zeros(16)) and merged_lse[3] == -math.inf
    for row, parts in ((4, [0, 2]), (5, [0, 1, 2])):
        ref, ref_lse = torch_cp.merge_states_reference(out[parts, row].double(), lse[parts, row].double())
        torch.testing.assert_close(merged[row].double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged_lse[row].double(), ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scale": NAN}, ValueError, "scale"),
        ({"scale": math.inf}, ValueError, "scale"),
        ({"scale": True}, TypeError, "scale"),
        ({"softcap": -2.0}, ValueError, "softcap"),
        ({"softcap": NAN}, ValueError, "softcap"),
        ({"softcap": math.inf}, ValueError, "softcap"),
        ({"window": True}, TypeError, "window"),
        ({"window": 2.5}, TypeError, "window"),
        ({"window": -3}, ValueError, "window"),
        ({"window": 2**63}, ValueError, "window"),
        ({"kv_lens": torch.tensor([True, False])}, TypeError, "kv_lens"),
        ({"kv_lens": torch.tensor([3.0, 4.0])}, TypeError, "kv_lens"),
        ({"kv_lens": [3, 4]}, TypeError, "kv_lens"),
        ({"kv_pos": torch.zeros(2, 3, dtype=torch.long)}, ValueError, "kv_pos"),
        ({"q_pos": torch.tensor([1])}, ValueError, "q_pos"),
        ({"merge": "foo"}, ValueError, "merge"),
        ({"is_causal": 1}, TypeError, "is_causal"),
        ({"return_lse": "yes"}, TypeError, "return_lse"),
        (
            {"attn_mask": torch.ones(2, 1, 1, 10, dtype=torch.long)},
            ValueError,
            r"attn_mask \(shape \[2, 1, 1, 10\]\)",
        ),
        (
            {"attn_mask": torch.ones(2, 1, 1, 11, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \[2, 1, 1, 11\]",
        ),
        ({"attn_mask": torch.ones(3, 1, 1, 10)}, ValueError, r"attn_mask of shape \[3, 1, 1, 10\]"),
        ({"attn_mask": torch.ones(1, 2, 4, 1, 10, dtype=torch.bool)}, ValueError, r"attn_mask of shape"),
        ({"attn_mask": [[True]]}, TypeError, "attn_mask"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, error, match):
    q, k, v = _qkv(2, 4, 2, 1, 10, 16, seed=113)
    with pytest.raises(error, match=match):
        torch_cp.attention(q, k, v, enable_gqa=True, **kwargs)


def test_head_dim_zero_is_a_value_error():
    q, k, v = _qkv(1, 2, 2, 1, 5, 0, seed=115)
    with pytest.raises(ValueError, match="head dim"):
        torch_cp.attention(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        torch_cp.attention_state(q, k, v)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({3: torch.tensor([5])}, "kv_lens must have shape"),
        ({4: torch.zeros(2, 3, dtype=torch.long)}, "kv_pos must have shape"),
        ({5: torch.tensor([1])}, "q_pos must have shape"),
        ({3: torch.tensor([True, True])}, "kv_lens must be an integer"),
        ({6: NAN}, "scale"),
        ({7: -1.0}, "softcap"),
        ({10: -2}, "num_splits"),
        ({5: None}, "q_pos .* is required"),
        ({11: torch.ones(2, 4, 1, 301, dtype=torch.bool)}, r"attn_mask of shape \[2, 4, 1, 301\]"),
        ({11: torch.ones(2, 4, 2, 300, dtype=torch.bool)}, r"attn_mask of shape \[2, 4, 2, 300\]"),
        ({11: torch.ones(1, 2, 1, 1, 300, dtype=torch.bool)}, r"attn_mask of shape \[1, 2, 1, 1, 300\]"),
        ({11: torch.ones(300, dtype=torch.int32)}, r"attn_mask \(shape \[300\]\) must be bool or floating"),
    ],
)
def test_cpp_op_checks_every_argument_before_reading(change, match):
    q, k, v = _qkv(2, 4, 2, 1, 300, 16, seed=117)
    args = [q, k, v, torch.tensor([300, 100]), None, torch.tensor([299, 99]), 0.25, 0.0, True, -1, 0, None]
    for i, value in change.items():
        args[i] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.torch_cp.decode_attention(*args)


@needs_kernel
def test_cpp_op_refuses_float64_and_attention_computes_it_in_float64():
    q, k, v = _qkv(2, 4, 2, 2, 500, 64, seed=119, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        torch.ops.torch_cp.decode_attention(q, k, v, None, None, None, 0.125, 0.0, False, -1, 0)
    opts = {"is_causal": True, "kv_lens": torch.tensor([500, 321]), "softcap": 4.0}
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
    out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, **opts)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # float32 arithmetic errs by ~1e-7
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    parts = [torch_cp.attention_state(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 200), (200, 500))]
    merged, merged_lse = torch_cp.merge_states(
        torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    )
    full_out, full_lse = torch_cp.attention_reference(q, k, v)
    assert merged.dtype == torch.float64 and merged_lse.dtype == torch.float64
    torch.testing.assert_close(merged, full_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged_lse, full_lse, rtol=1e-12, atol=1e-12)


def test_attention_backward_matches_the_reference_gradcheck():
    q, k, v = _qkv(2, 4, 2, 2, 9, 8, seed=121, dtype=torch.float64)
    opts = {"is_causal": True, "kv_lens": torch.tensor([9, 4]), "softcap": 3.0, "window": 6}
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, **opts)
        return out, lse

    assert torch.autograd.gradcheck(fn, inputs)
    g = torch.Generator().manual_seed(122)
    grad_out = torch.randn(2, 4, 2, 8, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(fn(*inputs)[0], inputs, grad_out)
    ref_grads = torch.autograd.grad(torch_cp.attention_reference(*inputs, **opts)[0], inputs, grad_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_backward_and_explicit_kernel_backend_refused():
    q, k, v = _qkv(1, 4, 2, 1, 40, 16, seed=123)
    q.requires_grad_()
    out = torch_cp.attention(q, k, v, enable_gqa=True, kv_lens=torch.tensor([0]))  # empty rows: finite grad
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(grad, torch.zeros_like(grad))
    out = torch_cp.attention(q, k, v, enable_gqa=True)
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    qd = q.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch_cp.attention_reference(qd, k, v)[0].square().sum(), qd)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5)
    if _ops.HAS_CPU_KERNELS:
        with pytest.raises(ValueError, match="backward"):
            torch_cp.attention(q, k, v, enable_gqa=True, backend="cpp")
    with torch.no_grad():
        assert not torch_cp.attention(q, k, v, enable_gqa=True).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_lens_past_the_cache_is_the_whole_cache_for_the_default_query_positions(backend):
    """kv_lens > L means L valid keys (the reference's reading): the default q_pos follows the last of
    them (it was taken from kv_lens itself, which shifted the causal window by the excess)."""
    q, k, v = _qkv(2, 4, 1, 1, 5, 24, seed=125)
    opts = {"is_causal": True, "window": 4}
    over, over_lse = _state(q, k, v, backend, kv_lens=torch.tensor([5, 7]), **opts)
    exact = torch_cp.attention_reference(q, k, v, kv_lens=torch.tensor([5, 5]), **opts)
    _assert_fp32_close(over, over_lse, *exact, v)

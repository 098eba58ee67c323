import itertools
import math

import pytest
import torch

import torch_cp
from torch_cp import _ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _attention_state(q, k, v):
    """Partial attention state of queries q [R, D] over keys k/v [L, D], float64: (out [R, D], lse [R])."""
    scores = (q @ k.T) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    if k.shape[0] == 0:
        return torch.zeros(q.shape[0], v.shape[-1], dtype=q.dtype), torch.full((q.shape[0],), -math.inf)
    return torch.softmax(scores, dim=-1) @ v, lse


def _split_states(q, k, v, cuts):
    bounds = [0, *cuts, k.shape[0]]
    parts = [_attention_state(q, k[a:b], v[a:b]) for a, b in itertools.pairwise(bounds)]
    return torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_parts", [1, 2, 5])
def test_merge_of_split_attention_equals_full_attention(device, n_parts):
    g = torch.Generator().manual_seed(n_parts)
    q = torch.randn(7, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(40, 64, generator=g, dtype=torch.float64) for _ in range(2))
    cuts = sorted(torch.randperm(39, generator=g)[: n_parts - 1].add(1).tolist())
    out, lse = _split_states(q, k, v, cuts)
    full_out, full_lse = _attention_state(q, k, v)
    merged, merged_lse = torch_cp.merge_states(out.float().to(device), lse.float().to(device))
    assert merged.dtype == torch.float32 and merged_lse.dtype == torch.float32
    assert (merged.cpu().double() - full_out).abs().max() <= 2e-6 * v.abs().max()
    assert (merged_lse.cpu().double() - full_lse).abs().max() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64_reference_within_dtype_rounding(device, dtype):
    out, lse = torch.randn(4, 2, 8, 3, 128), torch.randn(4, 2, 8, 3) * 5
    ref_out, ref_lse = torch_cp.merge_states_reference(out.to(dtype).double(), lse.double())
    got_out, got_lse = torch_cp.merge_states(out.to(dtype).to(device), lse.to(device))
    assert got_out.shape == (2, 8, 3, 128) and got_out.dtype == dtype and got_lse.shape == (2, 8, 3)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        got_out.cpu().double(), ref_out, rtol=2 * eps, atol=2 * eps * ref_out.abs().max()
    )
    torch.testing.assert_close(got_lse.cpu().double(), ref_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_parts_never_give_nan(device):
    out, lse = torch.randn(3, 5, 16), torch.randn(3, 5)
    lse[:, 0] = -math.inf  # every part of row 0 is empty
    lse[1, 1:] = -math.inf  # part 1 is empty everywhere else
    out[1] = torch.nan  # an empty part's output must not leak, even when it is garbage
    got_out, got_lse = torch_cp.merge_states(out.to(device), lse.to(device))
    got_out, got_lse = got_out.cpu(), got_lse.cpu()
    assert torch.equal(got_out[0], torch.zeros(16)) and got_lse[0] == -math.inf
    ref_out, ref_lse = torch_cp.merge_states_reference(out[[0, 2], 1:].double(), lse[[0, 2], 1:].double())
    torch.testing.assert_close(got_out[1:].double(), ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_lse[1:].double(), ref_lse, rtol=1e-6, atol=1e-5)


def test_extreme_logits_stay_finite():
    out = torch.randn(4, 6, 32)
    lse = torch.tensor([1e4, -1e4, 0.0, 1e4 - 1.0]).repeat(6, 1).T.contiguous() + torch.rand(4, 6)
    got_out, got_lse = torch_cp.merge_states(out, lse)
    ref_out, ref_lse = torch_cp.merge_states_reference(out.double(), lse.double())
    assert torch.isfinite(got_out).all() and torch.isfinite(got_lse).all()
    torch.testing.assert_close(got_out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.double(), ref_lse, rtol=1e-6, atol=1e-3)


def test_merging_in_two_levels_equals_merging_at_once():
    out, lse = torch.randn(6, 3, 4, 64), torch.randn(6, 3, 4) * 3
    once = torch_cp.merge_states(out, lse)
    halves = [torch_cp.merge_states(out[i : i + 3], lse[i : i + 3]) for i in (0, 3)]
    twice = torch_cp.merge_states(torch.stack([h[0] for h in halves]), torch.stack([h[1] for h in halves]))
    torch.testing.assert_close(twice[0], once[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twice[1], once[1], rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")
def test_opcheck():
    for n, rows, dim in [(3, 10, 64), (1, 1, 8), (2, 0, 16)]:
        args = (torch.randn(n, rows, dim), torch.randn(n, rows))
        torch.library.opcheck(torch.ops.torch_cp.merge_states, args)


def test_traces_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda o, lse: torch_cp.merge_states(o * 2, lse), fullgraph=True, backend="inductor")
    out, lse = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5)
    got, want = fn(out, lse), torch_cp.merge_states(out * 2, lse)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize(
    ("out_shape", "lse_shape", "match"),
    [((3, 4, 8), (3, 5), "lse must have shape"), ((8,), (1,), "out must be"), ((2, 3, 8), (2, 3), "dtype")],
)
def test_bad_input_names_the_argument(out_shape, lse_shape, match):
    dtype = torch.int32 if match == "dtype" else torch.float32
    with pytest.raises(ValueError, match=match):
        torch_cp.merge_states(torch.zeros(out_shape, dtype=dtype), torch.zeros(lse_shape))


@pytest.mark.gpu
def test_cuda_kernel_is_loaded():
    assert _ops.HAS_CUDA_KERNELS

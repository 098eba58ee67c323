"""The Triton kernels of torch_cp, run on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first imported, so the cases
below run in one child process (this file run as a script, with the variable set), which reports
each case's outcome as JSON; the pytest tests assert one case each. Nothing leaks into the pytest
process or other test files. Cases are kept small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import torch_cp
from torch_cp.reference import merge_states_reference

CASES: dict[str, Callable[[], None]] = {}
_MARKER = "TORCH_CP_TRITON_RESULTS "


def case(fn: Callable[[], None]) -> Callable[[], None]:
    CASES[fn.__name__] = fn
    return fn


def _qkv(b, hq, hkv, sq, kv_len, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k, v = torch.randn(b, hkv, kv_len, d, generator=g), torch.randn(b, hkv, kv_len, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_fp32(out, lse, ref_out, ref_lse, v, what=""):
    """The issue's bar: max error <= 2e-6 * max|V| and lse error <= 1e-5, against float64."""
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: -inf pattern of lse differs"
    assert not out.isnan().any() and not lse.isnan().any(), f"{what}: NaN"
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= 2e-6 * v.abs().max().item(), f"{what}: out error {err:.3g} (max|V| {v.abs().max():.3g})"
    if finite.any():
        lse_err = (lse.double() - ref_lse)[finite].abs().max().item()
        assert lse_err <= 1e-5, f"{what}: lse error {lse_err:.3g}"


def _triton_state(q, k, v, **kw):
    return torch_cp.attention_state(q, k, v, backend="triton", **kw)


@case
def fp32_matches_float64_reference():
    shapes = [(2, 8, 2, 1, 300, 64), (1, 4, 4, 3, 77, 32), (2, 6, 1, 2, 150, 128), (1, 32, 8, 1, 40, 80)]
    for b, hq, hkv, sq, kv_len, d in [*shapes, (2, 5, 5, 1, 1, 16)]:
        q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=kv_len)
        out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend="triton")
        ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
        _check_fp32(out, lse, ref_out, ref_lse, v, f"shape {(b, hq, hkv, sq, kv_len, d)}")


@case
def low_precision_within_twice_sdpa_error():
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _qkv(2, 8, 2, 2, 200, 64, dtype=dtype, seed=5)
        out, lse = torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, backend="triton")
        ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
        sdpa_err = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True).double() - ref_out).abs().max()
        err = (out.double() - ref_out).abs().max()
        assert out.dtype == dtype
        assert err <= max(2 * sdpa_err, torch.finfo(dtype).eps), (
            f"{dtype}: error {err:.3g}, SDPA {sdpa_err:.3g}"
        )
        assert (lse.double() - ref_lse).abs().max() <= 1e-4, f"{dtype}: lse error"


@case
def variable_lengths_causal_window_softcap():
    q, k, v = _qkv(3, 8, 2, 3, 200, 64, seed=7)
    opts = {"is_causal": True, "window": 40, "softcap": 5.0, "kv_lens": torch.tensor([200, 57, 3])}
    out, lse = _triton_state(q, k, v, num_splits=3, **opts)
    _check_fp32(out, lse, *torch_cp.attention_reference(q, k, v, **opts), v, "varlen causal window softcap")
    for dtype in (torch.float16, torch.bfloat16):  # the low-precision path with every flag on
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        out, lse = _triton_state(ql, kl, vl, **opts)
        ref_out, ref_lse = torch_cp.attention_reference(ql, kl, vl, **opts)
        assert (out.double() - ref_out).abs().max() <= 1e-5, f"{dtype}: out error"
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), f"{dtype}: -inf pattern"


@case
def explicit_key_and_query_positions():
    """A shard holding keys 1000..1199 of a longer sequence, keys in reverse order, queries at 1150+i."""
    q, k, v = _qkv(2, 4, 2, 2, 200, 32, seed=9)
    kv_pos = torch.arange(1199, 999, -1).repeat(2, 1)
    opts = {"kv_pos": kv_pos, "q_pos": torch.tensor([1150, 1020]), "kv_lens": torch.tensor([200, 120])}
    for extra in ({"is_causal": True}, {"window": 64}, {"is_causal": True, "window": 7}):
        out, lse = _triton_state(q, k, v, num_splits=2, **opts, **extra)
        ref = torch_cp.attention_reference(q, k, v, **opts, **extra)
        _check_fp32(out, lse, *ref, v, f"positions {extra}")


@case
def any_number_of_splits_agrees_and_partials_merge():
    from torch_cp import triton as cp_triton

    q, k, v = _qkv(1, 8, 2, 1, 600, 64, seed=11)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    for n in (1, 2, 7, 64):
        _check_fp32(*_triton_state(q, k, v, num_splits=n), ref_out, ref_lse, v, f"{n} splits")
    parts, part_lse = cp_triton.decode_partial(q, k, v, None, None, None, 0.125, 0.0, False, -1, 5)
    assert parts.shape == (5, 1, 8, 1, 64) and part_lse.shape == (5, 1, 8, 1)
    _check_fp32(*merge_states_reference(parts.double(), part_lse.double()), ref_out, ref_lse, v, "partials")


@case
def large_gqa_group_uses_several_row_blocks():
    q, k, v = _qkv(1, 16, 1, 5, 90, 32, seed=21)  # 80 query rows per KV head > 64 rows per program
    out, lse = _triton_state(q, k, v, is_causal=True, num_splits=2)
    _check_fp32(out, lse, *torch_cp.attention_reference(q, k, v, is_causal=True), v, "MQA, 80 rows")


@case
def empty_rows_and_extreme_logits_are_finite():
    q, k, v = _qkv(2, 4, 2, 1, 0, 32)
    out, lse = _triton_state(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all(), "empty cache"
    q, k, v = _qkv(2, 4, 2, 1, 70, 32, seed=3)
    out, lse = _triton_state(q, k, v, kv_lens=torch.tensor([0, 70]), num_splits=3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all(), "zero-length row"
    q, k, v = _qkv(1, 4, 2, 1, 300, 32, seed=13)
    k[:, :, 17] = q[0, 0, 0] * 300.0  # logits around +-1e4 on one key
    out, lse = _triton_state(q, k, v, num_splits=3)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and ref_lse.abs().max() > 1e3
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-2)


@case
def merge_kernel_matches_reference_with_empty_parts():
    from torch_cp import triton as cp_triton

    g = torch.Generator().manual_seed(23)
    out, lse = torch.randn(5, 40, 72, generator=g), torch.randn(5, 40, generator=g) * 20
    lse[1, :10] = float("-inf")
    lse[:, 30:] = float("-inf")  # all-empty rows
    out[:, 30:] = float("nan")  # must not leak through a zero weight
    merged, merged_lse = cp_triton.merge_states(out, lse)
    ref, ref_lse = merge_states_reference(out.double(), lse.double())
    assert torch.equal(merged[30:], torch.zeros_like(merged[30:])) and torch.isneginf(merged_lse[30:]).all()
    torch.testing.assert_close(merged[:30].double(), ref[:30], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    half, _ = cp_triton.merge_states(out.half(), lse)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half[:30].double(), ref[:30], rtol=2e-3, atol=2e-3)


@case
def opcheck_and_compile_fullgraph():
    q, k, v = _qkv(2, 8, 2, 1, 100, 64, seed=19)
    args = (q, k, v, torch.tensor([100, 40]), None, torch.tensor([99, 39]), 0.125, 0.0, True, -1, 2)
    torch.library.opcheck(torch.ops.torch_cp.triton_decode_attention, args)
    g = torch.Generator().manual_seed(29)
    torch.library.opcheck(torch.ops.torch_cp.triton_merge_states, (torch.randn(3, 6, 32, generator=g),
                                                                    torch.randn(3, 6, generator=g)))  # fmt: skip
    torch._dynamo.reset()

    def step(q, k, v):
        return torch_cp.attention(q * 2, k, v, enable_gqa=True, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v))


@case
def bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 4, 2, 1, 10, 32, dtype=torch.float64)
    for kwargs, match in [
        ({}, "float64"),
        (
            {"attn_mask": torch.ones(1, 1, 1, 11, dtype=torch.bool), "q": q.float()},
            "attn_mask of shape [1, 1, 1, 11]",
        ),
        (
            {"attn_mask": torch.ones(1, 1, 1, 10, dtype=torch.int32), "q": q.float()},
            "attn_mask (shape [1, 1, 1, 10])",
        ),
    ]:
        args = {"q": q, "k": k, "v": v, **kwargs}
        args["k"], args["v"] = args["k"].to(args["q"].dtype), args["v"].to(args["q"].dtype)
        try:
            torch_cp.attention(**args, enable_gqa=True, backend="triton")
        except ValueError as err:
            assert match in str(err), f"{match!r} not in {err}"
        else:
            raise AssertionError(f"no ValueError for {kwargs or 'float64'}")


@case
def nan_rows_match_the_reference_and_merge_as_nan():
    """[Note: NaN in attention]: NaN in q, +inf or NaN in a key; hidden NaN keys and unused slots."""
    from torch_cp import triton as cp_triton

    q, k, v = _qkv(2, 4, 2, 1, 100, 32, seed=31)
    q[0, 1, 0, 3] = float("nan")
    k[1, 0, 9] = float("inf")
    k[1, 1, 50, 2] = float("nan")
    k[0, :, 90:], v[0, :, 90:] = float("nan"), float("nan")  # past kv_lens: never read
    opts = {"kv_lens": torch.tensor([90, 100])}
    out, lse = _triton_state(q, k, v, num_splits=3, **opts)
    ref_out, ref_lse = torch_cp.attention_reference(q, k, v, **opts)
    nan_rows = ref_lse.isnan()
    assert nan_rows[0, 1] and nan_rows[1, 2:].all() and not nan_rows[0, 2:].any(), "reference NaN rows"
    assert torch.equal(lse.isnan(), nan_rows) and out[nan_rows].isnan().all(), "NaN rows differ"
    keep = ~nan_rows
    _check_fp32(out[keep], lse[keep], ref_out[keep], ref_lse[keep], v[:, :, :90], "other rows")
    g = torch.Generator().manual_seed(37)
    parts, part_lse = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, generator=g)
    part_lse[0, 0], part_lse[:, 1], parts[:, 1] = float("nan"), float("-inf"), float("nan")
    parts[2, 2, 3], part_lse[2, 2] = float("nan"), part_lse[:2, 2].max() - 200.0  # weight underflows to 0
    merged, merged_lse = cp_triton.merge_states(parts, part_lse)
    assert merged[0].isnan().all() and merged_lse[0].isnan(), "a NaN part vanished"
    assert torch.equal(merged[1], torch.zeros(16)) and merged_lse[1] == float("-inf"), "empty row"
    assert merged[2, 3].isnan(), "a NaN output with a tiny weight vanished"
    ref, ref_lse = merge_states_reference(parts[:, 3].double(), part_lse[:, 3].double())
    torch.testing.assert_close(merged[3].double(), ref, rtol=1e-6, atol=1e-6)


@case
def op_checks_every_argument():
    q, k, v = _qkv(2, 4, 2, 1, 300, 16, seed=41)
    base = [q, k, v, torch.tensor([300, 100]), None, torch.tensor([299, 99]), 0.25, 0.0, True, -1, 0]
    for i, value, match in [
        (3, torch.tensor([5]), "kv_lens must have shape"),
        (4, torch.zeros(2, 3, dtype=torch.long), "kv_pos must have shape"),
        (5, torch.tensor([1]), "q_pos must have shape"),
        (3, torch.tensor([True, True]), "kv_lens must be an integer"),
        (6, float("nan"), "scale"),
        (7, -1.0, "softcap"),
        (10, -2, "num_splits"),
        (11, torch.ones(2, 4, 1, 301, dtype=torch.bool), "attn_mask of shape [2, 4, 1, 301]"),
        (11, torch.ones(2, 1, 1, 300, dtype=torch.int64), "attn_mask (shape [2, 1, 1, 300])"),
    ]:
        args = [*base, None]
        args[i] = value
        try:
            torch.ops.torch_cp.triton_decode_attention(*args)
        except ValueError as err:
            assert match in str(err), f"{match!r} not in {err}"
        else:
            raise AssertionError(f"no ValueError for argument {i} = {value!r}")


@case
def masks_match_float64_reference():
    """attn_mask on Triton: the broadcast forms of test_masks.py, alone and with causal/window/kv_lens."""
    from tests.torch_cp.test_masks import KINDS, POSITIONS, make_mask

    b, hq, hkv, sq, kv_len, d = 2, 8, 2, 3, 300, 32
    q, k, v = _qkv(b, hq, hkv, sq, kv_len, d, seed=43)
    for i, kind in enumerate(KINDS):
        positions = list(POSITIONS.values())[i % len(POSITIONS)]
        opts = {"attn_mask": make_mask(kind, b, hq, sq, kv_len, seed=i), **positions}
        out, lse = _triton_state(q, k, v, num_splits=1 + i % 3, **opts)
        _check_fp32(out, lse, *torch_cp.attention_reference(q, k, v, **opts), v, f"{kind}, {positions}")


@case
def static_cache_mask_never_reads_hidden_tiles():
    """As test_masks.py's: NaN keys from slot 213 on and NaN values from 320 on stay unread."""
    q, k, v = _qkv(2, 8, 2, 1, 512, 64, seed=47)
    clean = torch_cp.attention_reference(q, k[:, :, :213], v[:, :, :213])
    k[:, :, 213:], v[:, :, 320:] = float("nan"), float("nan")
    for num_splits in (1, 3):
        out, lse = _triton_state(q, k, v, attn_mask=torch.arange(512) < 213, num_splits=num_splits)
        _check_fp32(out, lse, *clean, v[:, :, :213], f"static cache, {num_splits} splits")


def _run_cases() -> dict[str, str]:
    """Runs every case (in the child process); returns "ok" or the traceback, and seconds, per case."""
    torch.set_num_threads(1)
    results = {}
    for name, fn in CASES.items():
        start = time.perf_counter()
        try:
            fn()
            outcome = "ok"
        except Exception:
            outcome = traceback.format_exc()
        results[name] = f"{outcome} ({time.perf_counter() - start:.1f} s)" if outcome != "ok" else "ok"
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(_MARKER) :])


@pytest.mark.parametrize("name", list(CASES))
def test_under_triton_interpreter(name: str, interpreted: dict[str, str]) -> None:
    assert interpreted[name] == "ok", interpreted[name]


def test_triton_backend_on_cpu_needs_the_interpreter() -> None:
    cp_triton = pytest.importorskip("torch_cp.triton", reason="triton is not installed")
    if cp_triton.INTERPRETED:
        pytest.skip("this process imported triton with TRITON_INTERPRET=1")
    q, k, v = _qkv(1, 4, 2, 1, 10, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        torch_cp.attention(q, k, v, enable_gqa=True, backend="triton")


@pytest.mark.parametrize("flags", ["bool mask, causal", "float mask, window, softcap", "no mask"])
def test_decode_kernel_compiles_for_a_gpu_without_one(flags: str) -> None:
    """The interpreter runs the kernel as Python: this compiles it to PTX for sm_90, as a GPU would
    (codegen only; no GPU needed), so code only the compiler refuses is caught here."""
    cp_triton = pytest.importorskip("torch_cp.triton", reason="triton is not installed")
    if cp_triton.INTERPRETED:
        pytest.skip("this process imported triton with TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torch_cp.triton._decode_kernel import decode_split_kernel as kernel

    mask_type = "*u8" if flags.startswith("bool") else "*fp32"
    types = {
        "qk_scale": "fp32",
        "cap2": "fp32",
        "mask_ptr": mask_type,
        "out_ptr": "*fp32",
        "lse_ptr": "*fp32",
    }
    types |= {name: "*i64" for name in ("lens_ptr", "kpos_ptr", "qpos_ptr")}
    types |= {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr")}
    flag_values = {
        "HAS_LENS": True, "HAS_POS": True, "SOFTCAP": "softcap" in flags, "CAUSAL": "causal" in flags,
        "WINDOW": "window" in flags, "HAS_MASK": "no mask" not in flags, "MASK_BOOL": flags.startswith("bool"),
        "LOWP_DOT": True, "BLOCK_R": 16, "BLOCK_N": 64, "BLOCK_D": 128,
    }  # fmt: skip
    signature = {
        n: "constexpr" if n in flag_values else types.get(n, "i64" if n.startswith("stride") else "i32")
        for n in kernel.arg_names
    }
    constexprs = {(kernel.arg_names.index(n),): value for n, value in flag_values.items()}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "num_stages": 3},
        )
    except (ImportError, RuntimeError, FileNotFoundError) as err:  # no CUDA backend or ptxas in this triton
        pytest.skip(f"triton cannot target CUDA here: {err}")
    assert ".entry decode_split_kernel" in compiled.asm["ptx"]


def test_unknown_backend_lists_the_choices() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 10, 32)
    with pytest.raises(ValueError, match="'triton'"):
        torch_cp.attention(q, k, v, enable_gqa=True, backend="tpu")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest, or with TRITON_INTERPRET=1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print(_MARKER + json.dumps(_run_cases()))

"""Fuzzing the decode attention entry points with random shapes and random, sometimes wrong, arguments.

Every case must end in a clean ``ValueError``/``TypeError`` when the generator made an argument wrong,
and in the float64 reference's result otherwise; never in a signal. The cases run in one child
process (this file run as a script) so that a segfault fails the test instead of killing pytest; the
child prints each case's index before running it, so a crash names its case, which is then re-run
alone to show it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import traceback

import pytest
import torch

import torch_cp
from torch_cp import _ops

_MARKER = "TORCH_CP_FUZZ "
_CASES = 400
_SEED = 2027
# A second block of seeds draws an attn_mask for every case, and no other argument wrong (in the first
# block, most calls with a mask are refused for another reason before the mask is used).
_MASK_SEED, _MASK_CASES = 100_000, 200


def _index_tensor(g: torch.Generator, shape: tuple[int, ...], low: int, high: int, wrong: str | None):
    """An int tensor of ``shape`` with values in [low, high), or one made wrong in the way ``wrong`` says."""
    if wrong == "short":
        shape = (max(0, shape[0] - 1), *shape[1:]) if shape[0] > 0 else (2, *shape[1:])
    elif wrong == "long":
        shape = (shape[0] + 3, *shape[1:])
    elif wrong == "rank":
        shape = (*shape, 2)
    t = torch.randint(low, max(high, low + 1), shape, generator=g)
    if wrong == "bool":
        return t > 0
    if wrong == "float":
        return t.float()
    if wrong is None and len(shape) == 2 and shape[0] > 1 and torch.rand(1, generator=g).item() < 0.3:
        return t.t().contiguous().t()  # a non-contiguous layout of the right shape is valid
    return t.to(torch.int32) if torch.rand(1, generator=g).item() < 0.3 else t


def _pick(g: torch.Generator, choices: list):
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


def _long_cache_case(g: torch.Generator, entry: str) -> dict:
    """A 16M-key cache with a 2-key kv_pos: reading kv_pos as [B, L] ran 128 MB past its end (rc 139)."""
    kv_len = 1 << 24
    k = torch.randn(1, 1, kv_len, 1, generator=g)
    opts = {"is_causal": True, "kv_pos": torch.arange(2)[None], "q_pos": torch.tensor([kv_len])}
    q = torch.randn(1, 1, 1, 1, generator=g)
    return {"q": q, "k": k, "v": k, "opts": opts, "invalid": "kv_pos short", "entry": entry}


def _mask(g: torch.Generator, full: tuple[int, int, int, int]) -> tuple[torch.Tensor, str | None]:
    """A random ``attn_mask`` broadcastable to ``full`` = (B, Hq, Sq, L), or a wrong one and why."""
    b, hq, sq, kv_len = full
    shape = _pick(g, [full, (b, 1, 1, kv_len), (1, hq, sq, kv_len), (kv_len,), (sq, kv_len), (b, hq, sq, 1)])
    shown = torch.rand(shape, generator=g) < _pick(g, [0.0, 0.3, 0.9, 1.0])  # 0.0: every key hidden
    kind = _pick(g, ["bool", "bool", "float32", "float16", "expanded"])
    if kind == "expanded":  # stride 0 on the broadcast dims
        shown = (torch.rand(b, 1, 1, kv_len, generator=g) < 0.5).expand(full)
    mask: torch.Tensor = shown
    if kind.startswith("float"):
        bias = torch.randn(shape, generator=g).to(getattr(torch, kind))
        mask = bias.masked_fill(~shown, float("-inf"))
    wrong = _pick(g, [None] * 6 + ["shape", "dtype"])
    if wrong == "shape":
        mask = torch.ones((*full[:3], kv_len + 1 if kv_len != 0 else 2), dtype=torch.bool)
    elif wrong == "dtype":
        mask = shown.to(torch.int32)
    return mask, None if wrong is None else f"attn_mask {wrong}"


def make_case(seed: int) -> dict:
    """One random call: its tensors, its options and the reason it is invalid (None when valid)."""
    g = torch.Generator().manual_seed(seed)
    masked = seed >= _MASK_SEED
    if seed % 50 == 0 and not masked:
        return _long_cache_case(g, _pick(g, ["attention", "attention_state", "op"]))
    sizes = [1, 2, 3] if masked else [0, 1, 2, 3]  # empty batches and caches: in the first block
    b, hkv, group, sq = _pick(g, sizes), _pick(g, [1, 2, 3]), _pick(g, [1, 2, 4]), _pick(g, sizes)
    kv_len = _pick(g, [1, 5, 33, 70, 130] if masked else [0, 1, 5, 33, 70])
    d = _pick(g, [1, 8, 16, 24, 40] if masked else [0, 1, 8, 16, 24, 40])
    dtype = _pick(g, [torch.float32, torch.float32, torch.float16, torch.bfloat16])
    q = torch.randn(b, hkv * group, sq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, kv_len, d, generator=g).to(dtype) for _ in range(2))
    entry = _pick(g, ["attention", "attention_state", "op"])
    invalid = "head dim 0" if d == 0 else None
    opts: dict = {"is_causal": _pick(g, [False, True])}
    for name, shape, low, high in [("kv_lens", (b,), -3, kv_len + 4), ("kv_pos", (b, kv_len), -20, 200),
                                   ("q_pos", (b,), -10, 220)]:  # fmt: skip
        roll = torch.rand(1, generator=g).item()
        if roll < 0.45:
            continue
        wrong = _pick(g, ["short", "long", "rank", "bool", "float"]) if roll > 0.85 and not masked else None
        opts[name] = _index_tensor(g, shape, low, high, wrong)
        if wrong is not None:
            invalid = invalid or f"{name} {wrong}"
    window = _pick(g, [None, None, 1, 4, 50] if masked else [None, None, 1, 4, 50, 0, -2, True])
    if window is not None:
        opts["window"] = window
        ok = window >= 1 and (window is not True or entry == "op")  # the op's int schema takes True as 1
        ok = ok or (entry == "op" and window < 0)  # the op's "no window"
        invalid = invalid or (None if ok else f"window {window!r}")
    scale = _pick(g, [None, None, 0.3, -0.5] if masked else [None, None, 0.3, 0.0, -0.5, math.nan, math.inf])
    if scale is not None:
        opts["scale"] = scale
        invalid = invalid or (None if math.isfinite(scale) else f"scale {scale}")
    softcap = _pick(g, [None, None, 3.0, 0.0] if masked else [None, None, 3.0, 0.0, -1.0, math.nan])
    if softcap is not None:
        opts["softcap"] = softcap
        invalid = invalid or (None if softcap >= 0 else f"softcap {softcap}")
    if masked or torch.rand(1, generator=g).item() < 0.35:
        opts["attn_mask"], wrong = _mask(g, (b, hkv * group, sq, kv_len))
        invalid = invalid or wrong
    return {"q": q, "k": k, "v": v, "opts": opts, "invalid": invalid, "entry": entry}


def _call(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, opts = case["q"], case["k"], case["v"], dict(case["opts"])
    if case["entry"] == "attention":
        return torch_cp.attention(q, k, v, enable_gqa=True, return_lse=True, **opts)
    if case["entry"] == "attention_state":
        return torch_cp.attention_state(q, k, v, num_splits=3, **opts)
    window = opts.get("window")
    window = None if window is not None and window < 0 else window
    masked = opts["is_causal"] or window is not None
    q_pos = opts.get("q_pos")
    if masked and q_pos is None:  # the op needs q_pos: give the default one, as attention does
        q_pos = torch.full((q.shape[0],), k.shape[2] - q.shape[2])
    return torch.ops.torch_cp.decode_attention(
        q, k, v, opts.get("kv_lens"), opts.get("kv_pos"), q_pos, float(opts.get("scale") or 0.25),
        float(opts.get("softcap") or 0.0), opts["is_causal"], -1 if window is None else window, 3,
        opts.get("attn_mask"),
    )  # fmt: skip


def _reference(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    opts = dict(case["opts"])
    if case["entry"] == "op":
        opts["scale"] = opts.get("scale") or 0.25
        if opts.get("window") is not None and opts["window"] < 0:
            del opts["window"]
        if opts.get("window") is True:
            opts["window"] = 1
        if (opts["is_causal"] or "window" in opts) and opts.get("q_pos") is None:
            opts["q_pos"] = torch.full((case["q"].shape[0],), case["k"].shape[2] - case["q"].shape[2])
    return torch_cp.attention_reference(case["q"], case["k"], case["v"], **opts)


def _check_result(case: dict, out: torch.Tensor, lse: torch.Tensor) -> str:
    ref_out, ref_lse = _reference(case)
    tol = 1e-4 if case["q"].dtype == torch.float32 else 3e-2
    if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
        return (
            f"shapes {tuple(out.shape)}, {tuple(lse.shape)} != {tuple(ref_out.shape)}, {tuple(ref_lse.shape)}"
        )
    if not torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) or not torch.equal(
        lse.isnan(), ref_lse.isnan()
    ):
        return "the -inf/NaN pattern of lse differs from the reference"
    if out.numel() and not torch.allclose(out.double(), ref_out, atol=tol, rtol=tol):
        return f"out differs from the reference by {(out.double() - ref_out).abs().max().item():.3g}"
    finite = torch.isfinite(ref_lse)
    if finite.any() and not torch.allclose(lse.double()[finite], ref_lse[finite], atol=tol, rtol=tol):
        return "lse differs from the reference"
    return ""


def run_case(seed: int) -> str:
    """An empty string when the case behaved, else what went wrong."""
    case = make_case(seed)
    try:
        out, lse = _call(case)
    except (ValueError, TypeError) as err:
        return "" if case["invalid"] else f"valid call raised {type(err).__name__}: {err}"
    except Exception:  # any other exception is a finding, not a crash
        return f"unexpected exception:\n{traceback.format_exc(limit=3)}"
    if case["invalid"]:
        return f"accepted an invalid call ({case['invalid']})"
    try:
        return _check_result(case, out, lse)
    except Exception:  # e.g. a result of the wrong type
        return f"checking the result failed:\n{traceback.format_exc(limit=3)}"


def describe(seed: int) -> str:
    case = make_case(seed)
    tensors = {n: (tuple(t.shape), t.dtype) for n, t in case.items() if isinstance(t, torch.Tensor)}
    opts = {
        n: (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for n, t in case["opts"].items()
    }
    return f"{case['entry']} {tensors} {opts} invalid={case['invalid']}"


def _child(first: int, count: int) -> None:
    torch.set_num_threads(1)
    failures = {}
    for seed in range(first, first + count):
        print(f"case {seed}", file=sys.stderr, flush=True)
        problem = run_case(seed)
        if problem:
            failures[seed] = f"{describe(seed)}: {problem}"
    print(_MARKER + json.dumps(failures), flush=True)


def _run_child(first: int, count: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, str(first), str(count)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not _ops.HAS_CPU_KERNELS, reason="C++ extension not built")
@pytest.mark.parametrize(
    ("first", "count"), [(_SEED, _CASES), (_MASK_SEED, _MASK_CASES)], ids=["any", "masked"]
)
def test_random_calls_raise_cleanly_or_match_the_reference(first, count):
    proc = _run_child(first, count)
    if proc.returncode != 0:
        started = [line for line in proc.stderr.splitlines() if line.startswith("case ")]
        seed = int(started[-1].split()[1]) if started else first
        alone = _run_child(seed, 1)
        pytest.fail(
            f"the fuzz child died (rc {proc.returncode}) in case {seed}: {describe(seed)}; "
            f"alone it ends with rc {alone.returncode}\n{alone.stderr[-2000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARKER)]
    failures = json.loads(lines[-1][len(_MARKER) :])
    assert not failures, "\n".join(f"case {s}: {p}" for s, p in list(failures.items())[:10])


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))

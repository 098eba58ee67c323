"""Decode attention on a GPU: torch_cp's CUDA and Triton kernels against the device's copy rate.

    python tools/gpu_bench_cp.py --json cp.json --md cp.md                       # on the GPU
    TRITON_INTERPRET=1 python tools/gpu_bench_cp.py --device cpu --contexts 1024 \
        --dtype float32 --backends cpp,triton,sdpa --repeats 3 --copy-mib 16      # CPU stand-in

One decode step (B 1, Hq 32, Hkv 8, D 128, Sq 1) over a KV cache of L tokens, by default L = 64K,
256K and 1M in bfloat16: K+V = 256 MiB, 1 GiB and 4 GiB, all far larger than the L2 cache, so every
call reads the cache from device memory. The ceiling is the measured device-to-device copy of
``--copy-mib`` MiB, counting bytes read plus bytes written (the device tool's METHOD.md); a kernel's
rate is the K+V bytes it must read over its time, and "of copy" is that rate over the copy rate.
Each output is compared with float64 attention on the same (rounded) inputs:
``|out - ref| / |ref|`` (Frobenius), which must be under 1e-3 (float32 arithmetic).

Timing: after warm-up, ``--repeats`` samples of 10 calls back to back between two CUDA events (the
launch gaps stay out), median per call (on CPU: the wall clock around one call). torch SDPA (``enable_gqa=True``) runs
beside the kernels as a baseline.
Issue 30's targets at L >= 256 MiB: CUDA kernel >= 85% and Triton kernel >= 70% of the copy rate.

This is tools/, not benchmarks/bench_cp.py: that script measures the CPU kernel and gloo ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch_cp  # noqa: E402

HQ, HKV, D = 32, 8, 128
TARGETS = {"cuda": 0.85, "triton": 0.70}  # share of the copy rate, at caches >= 256 MiB
TARGET_MIN_BYTES = 256 * 2**20
MAX_REL_ERR = 1e-3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(
    fn: Callable[[], Any], device: str, repeats: int, warmup: int = 3, inner: int = 10
) -> list[float]:
    """Per-call times in ms, ``repeats`` samples. On CUDA each sample is ``inner`` calls back to back
    between two events, divided by ``inner``: the host queues calls faster than a 256 MiB read takes,
    so the launch gaps stay out of the number. On CPU the wall clock around one call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_rate(device: str, mib: int, repeats: int) -> dict[str, float]:
    """Device-to-device copy of ``mib`` MiB: GB/s counting bytes read plus bytes written."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, repeats)
    if not torch.equal(dst, src):
        raise RuntimeError("the copy used as the ceiling did not copy")
    median = statistics.median(times)
    return {"mib": mib, "median_ms": median, "gbps": 2 * n * 4 / median / 1e6}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 attention, one KV head at a time (a float64 copy of the whole cache would be 4x its size)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(k.shape[1]):
        qh = q[:, h * group : (h + 1) * group].double()  # [B, group, Sq, D]
        kh, vh = k[:, h : h + 1].double(), v[:, h : h + 1].double()  # [B, 1, L, D]
        scores = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
        out[:, h * group : (h + 1) * group] = torch.softmax(scores, dim=-1) @ vh
        del kh, vh, scores
    return out


def _impls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends: Sequence[str]) -> dict[str, Callable]:
    fns: dict[str, Callable] = {}
    for name in backends:
        if name == "sdpa":
            fns[name] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            fns[name] = lambda name=name: torch_cp.attention_state(q, k, v, backend=name)[0]
    return fns


def rows_at(length: int, args: argparse.Namespace, copy_gbps: float) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=args.device).manual_seed(length)
    shape = (args.batch, HKV, length, D)
    q = torch.randn(args.batch, HQ, 1, D, device=args.device, generator=g).to(dtype)
    k = torch.randn(shape, device=args.device, generator=g).to(dtype)
    v = torch.randn(shape, device=args.device, generator=g).to(dtype)
    nbytes = 2 * k.numel() * k.element_size()
    ref = reference(q, k, v)
    rows = []
    for name, fn in _impls(q, k, v, args.backends).items():
        row: dict[str, Any] = {"context": length, "batch": args.batch, "dtype": args.dtype, "impl": name}
        row["cache_mib"] = nbytes / 2**20
        try:
            out = fn()
            _sync(args.device)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            times = time_ms(fn, args.device, args.repeats)
        except Exception as e:  # one implementation failing must not hide the others
            row |= {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            rows.append(row)
            print(f"L={length} {name}: {row['status']}", flush=True)
            continue
        median = statistics.median(times)
        gbps = nbytes / median / 1e6
        row |= {
            "status": "ok" if err < MAX_REL_ERR else f"WRONG: rel err {err:.1e} >= {MAX_REL_ERR:.0e}",
            "median_ms": median,
            "min_ms": min(times),
            "gbps": gbps,
            "of_copy": gbps / copy_gbps,
            "rel_err": err,
        }
        rows.append(row)
        print(
            f"L={length} ({nbytes / 2**20:.0f} MiB) {name}: {median:.3f} ms, {gbps:.0f} GB/s, "
            f"{gbps / copy_gbps:.0%} of copy, rel err {err:.1e}",
            flush=True,
        )
    del q, k, v, ref
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (context >= 256 MiB, kernel with a target): meets or MISSES."""
    lines = []
    for row in rows:
        target = TARGETS.get(row["impl"])
        if target is None or row["cache_mib"] * 2**20 < TARGET_MIN_BYTES:
            continue
        head = f"L={row['context']} ({row['cache_mib']:.0f} MiB) {row['impl']}"
        if "of_copy" not in row:
            lines.append(f"{head}: MISSES {target:.0%} of copy ({row['status']})")
            continue
        ok = row["of_copy"] >= target and row["status"] == "ok"
        lines.append(
            f"{head}: {row['of_copy']:.0%} of copy, rel err {row['rel_err']:.1e}: "
            f"{'meets' if ok else 'MISSES'} {target:.0%}"
            + ("" if row["status"] == "ok" else f" ({row['status']})")
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    copy = result["copy"]
    lines = [
        f"Device: {result['device_name']}; torch {result['torch']}; {result['dtype']}, B {result['batch']}, "
        f"Hq {HQ}, Hkv {HKV}, D {D}, Sq 1; median of {result['repeats']} calls.",
        f"Copy ceiling: {copy['mib']} MiB device-to-device in {copy['median_ms']:.3f} ms = "
        f"{copy['gbps']:.0f} GB/s (read + write).",
        "",
        "| L | cache MiB | impl | status | median ms | GB/s | of copy | rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [
            str(r["context"]), f"{r['cache_mib']:.0f}", r["impl"], r["status"],
            f"{r['median_ms']:.3f}" if "median_ms" in r else "-",
            f"{r['gbps']:.0f}" if "gbps" in r else "-",
            f"{r['of_copy']:.0%}" if "of_copy" in r else "-",
            f"{r['rel_err']:.1e}" if "rel_err" in r else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if result["verdicts"]:
        lines += ["", "Targets (issue 30, caches >= 256 MiB):", *[f"- {v}" for v in result["verdicts"]]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--contexts", default="65536,262144,1048576", help="comma-separated cache lengths L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backends", default="cuda,triton,sdpa", help="torch_cp backends and/or sdpa")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--copy-mib", type=int, default=2048, help="MiB copied for the ceiling")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    copy = copy_rate(args.device, args.copy_mib, args.repeats)
    print(
        f"copy ceiling: {copy['mib']} MiB in {copy['median_ms']:.3f} ms = {copy['gbps']:.0f} GB/s", flush=True
    )
    rows = [row for length in args.contexts for row in rows_at(length, args, copy["gbps"])]
    result = {
        "device_name": name, "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch,
        "repeats": args.repeats, "copy": copy, "rows": rows, "verdicts": verdicts(rows),
    }  # fmt: skip
    for line in result["verdicts"]:
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if args.md is not None:
        args.md.write_text(markdown(result))
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Single-backend baselines on CPU: every zoo model, whole graph, on each backend, side by side.

    python benchmarks/bench_baselines.py                   # all models, full size, batch 1 and default
    python benchmarks/bench_baselines.py --subset small    # a quick subset (make demo)
    python benchmarks/bench_baselines.py --models mlp --size tiny --backends eager,inductor

Writes ``benchmarks/results/baselines_<hardware>.{json,md,png}`` (``baselines_<subset>_<hardware>``
with ``--subset``, so a demo run does not overwrite the full results). See ``_notes`` for the protocol.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the packages

from benchmarks.checks import ERROR_FACTOR, compare_to_float64, float64_reference
from benchmarks.harness import (
    BASELINE_COLUMNS,
    DEFAULT_OUT_DIR,
    ResultTable,
    load_note,
    machine_info,
    measure_rounds,
    pool,
    print_header,
    progress,
    write_results,
)
from torch_collage.backends import Backend, get_backend
from torch_collage.timing import torch_threads
from torch_zoo import ZooModel, get_model, list_models

__all__ = ["BACKENDS", "SUBSETS", "main", "parse_args", "run_baselines", "runner"]

BACKENDS = ("eager", "inductor", "inductor_freezing", "onnxruntime", "openvino")
# Rows that are a backend with options, not a backend of their own.
_CONFIGURED = {"inductor_freezing": ("inductor", {"freezing": True})}
# name -> (models, batches); --subset small is `make demo`: about 2 minutes on 2 cores
SUBSETS = {"small": (("mlp", "resnet18", "bert"), ("1",))}
_DEFAULT_BATCHES = ("1", "default")
_TINY_DEFAULT_BATCH = 2  # the zoo's default batch at size "tiny"
_MAX_ERROR_CHARS = 500
_ROUNDS = 3  # interleaved timing rounds per (model, batch); backend order rotates each round


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv, default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--subset", choices=sorted(SUBSETS), default=None, help="named models (and batches)")
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument("--batches", type=_csv, default=None, help="ints or 'default' (default: 1,default)")
    p.add_argument("--backends", type=_csv, default=list(BACKENDS))
    p.add_argument("--repeats", type=int, default=30, help="timed calls per backend, over all rounds")
    p.add_argument("--max-block-s", type=float, default=5.0, help="time limit of one timing block")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--hardware", default="cpu", help="results go to <theme>_<hardware>.*")
    p.add_argument("--theme", default=None, help="default: baselines, or baselines_<subset> with --subset")
    args = p.parse_args(argv)
    if args.models and args.subset:
        p.error("give --models or --subset, not both")
    if args.batches is None:
        args.batches = list(SUBSETS[args.subset][1] if args.subset else _DEFAULT_BATCHES)
    for name, minimum in (("repeats", 1), ("threads", 1)):
        if getattr(args, name) < minimum:
            p.error(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    return args


def _models(args: argparse.Namespace) -> list[ZooModel]:
    names = list(SUBSETS[args.subset][0]) if args.subset else args.models or list_models()
    return [get_model(name) for name in names]


def _batches(spec: Sequence[str], model: ZooModel, size: str) -> list[int]:
    default = model.default_batch if size == "full" else _TINY_DEFAULT_BATCH
    batches: list[int] = []
    for item in spec:
        if item != "default" and not item.isdigit():
            raise ValueError(f"--batches entries must be positive ints or 'default', got {item!r}")
        batch = default if item == "default" else int(item)
        if batch >= 1 and batch not in batches:
            batches.append(batch)
    return batches


def runner(row: str) -> Backend:
    """The whole-module runner of a row: a backend, or a backend with options (``inductor_freezing``)."""
    name, options = _CONFIGURED.get(row, (row, {}))
    return get_backend(name, **options)


def _compile(name: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, float]:
    """Compile on backend ``name`` and make the first call (lazy backends compile there); return the
    callable and the seconds both took. Raises whatever the backend raises."""
    backend = runner(name)
    available, reason = backend.available()
    if not available:
        raise RuntimeError(f"backend unavailable: {reason}")
    start = time.perf_counter()
    fn = backend.compile(module, inputs)
    fn(*inputs)
    return fn, time.perf_counter() - start


def _error_text(exc: Exception) -> str:
    """``Type: first line`` of an exception, clipped (compiler tracebacks run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _row_base(model: ZooModel, batch: int, name: str) -> dict[str, Any]:
    try:
        version = runner(name).version()
    except Exception:  # a broken backend must not stop the benchmark; its row says "fail" anyway
        version = None
    return {"model": model.name, "batch": batch, "backend": name, "backend_version": version}


def _compile_and_check(
    name: str, module: torch.nn.Module, inputs: tuple, check: tuple, reference: tuple[Any, Any]
) -> tuple[dict[str, Any], Callable[..., Any] | None]:
    """``reference`` is (float64 output, eager output) on ``check``; see [Note: checking against float64]."""
    try:
        fn, compile_s = _compile(name, module, inputs)
        result = compare_to_float64(reference[0], reference[1], fn(*check))
    except Exception as exc:  # record the failure and go on with the next backend
        return {"status": "fail", "error": _error_text(exc)}, None
    status = "ok" if result.ok else "mismatch"
    return {
        "status": status,
        "compile_s": compile_s,
        "max_abs_err": result.max_abs_err,
        "error": result.message,
    }, fn


def _time_group(
    rows: list[dict[str, Any]], fns: dict[str, Callable], inputs: tuple, args: argparse.Namespace
) -> None:
    """Time the compiled callables side by side; add median, IQR, p20, speedup and the per-round
    medians (``round_ms``, for [Note: paired ratio]) to their rows."""
    calls = {name: (lambda fn=fn: fn(*inputs)) for name, fn in fns.items()}
    blocks = measure_rounds(
        calls,
        rounds=getattr(args, "rounds", _ROUNDS),
        repeats=args.repeats,
        warmup=2,
        threads=args.threads,
        max_time_s=args.max_block_s,
    )
    stats = {name: pool(ms) for name, ms in blocks.items()}
    eager = stats["eager"].median_ms if "eager" in stats else None
    for row in rows:
        m = stats.get(row["backend"])
        if m is not None:
            row.update(median_ms=m.median_ms, iqr_ms=m.iqr_ms, p20_ms=m.p20_ms, n=len(m.samples_ms))
            row["round_ms"] = [b.median_ms for b in blocks[row["backend"]]]
            row["speedup"] = eager / m.median_ms if eager else None


def _run_group(model: ZooModel, batch: int, args: argparse.Namespace, done: int, total: int) -> list:
    """Compile and check every backend on one (model, batch), then time them side by side; ``done``
    is how many progress lines earlier groups printed."""
    torch._dynamo.reset()  # fresh dynamo caches: no recompile limits carried over between groups
    module = model.build(args.size, seed=0)
    inputs = model.example_inputs(args.size, batch, seed=0)
    check = model.example_inputs(args.size, batch, seed=1)  # fresh inputs, unseen at compile time
    reference = (float64_reference(module, check), module(*check))
    rows, fns = [], {}
    for step, name in enumerate(args.backends, start=done + 1):
        row = _row_base(model, batch, name)
        outcome, fn = _compile_and_check(name, module, inputs, check, reference)
        rows.append(row | outcome)
        if fn is not None:
            fns[name] = fn
        compile_s = outcome.get("compile_s")
        timing = f" compile {compile_s:.1f} s" if compile_s is not None else ""
        progress(f"[{step}/{total}] {model.name} b={batch} {name}: {outcome['status']}{timing}")
    _time_group(rows, fns, inputs, args)
    del fns
    gc.collect()
    return rows


def best_backends(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (model, batch): its fastest backend with status "ok" and the speedup over eager."""
    lines: list[str] = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), members in groups.items():
        ok = [r for r in members if r["status"] == "ok" and r.get("median_ms") is not None]
        if not ok:
            lines.append(f"{model} b={batch}: no backend succeeded")
            continue
        best = min(ok, key=lambda r: r["median_ms"])
        speedup = f"{best['speedup']:.2f}x over eager" if best.get("speedup") else "no eager reference"
        lines.append(f"{model} b={batch}: best {best['backend']} {best['median_ms']:.3f} ms, {speedup}")
    return lines


def _notes(args: argparse.Namespace) -> list[str]:
    return [
        f"size {args.size}; inference under torch.no_grad(); {args.threads} torch threads for every backend.",
        f"Outputs checked on fresh inputs (seed 1, compiled on seed 0) against the model run in float64: "
        f"a backend's max error must be <= {ERROR_FACTOR:g}x eager's own float32 error (+1e-6 * max|ref|), "
        "integers exact; otherwise status 'mismatch' (still timed, never counted as best). "
        "'max abs err' is the largest difference from eager.",
        "compile s = backend.compile(...) plus the first call (Inductor compiles lazily there).",
        f"Timing: {_ROUNDS} rounds, backend order rotated each round, 2 warm-up calls per block, "
        f"{args.repeats} timed calls per backend in all (a block stops after {args.max_block_s:g} s); "
        "median and IQR of the pooled samples. speedup = eager median / backend median.",
        "Backends run with their defaults (ONNX Runtime spinning off, OpenVINO f32); the warm-up calls of"
        " each block absorb the previous runtime's thread-pool hand-over.",
    ]


def run_baselines(args: argparse.Namespace) -> ResultTable:
    """Compile, check and time every (model, batch, backend); return the table."""
    models = _models(args)
    groups = [(m, b) for m in models for b in _batches(args.batches, m, args.size)]
    total = len(groups) * len(args.backends)
    table = ResultTable(BASELINE_COLUMNS)
    with torch.no_grad(), torch_threads(args.threads):
        for i, (model, batch) in enumerate(groups):
            for row in _run_group(model, batch, args, i * len(args.backends), total):
                table.add(**row)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.backends:
        runner(name)  # an unknown name raises here, listing the valid ones
    with torch_threads(args.threads):
        info = machine_info()
    print_header(info)
    start = time.perf_counter()
    table = run_baselines(args)
    summary = best_backends(table.rows)
    load = load_note(info)
    notes = [*_notes(args), f"wall time {time.perf_counter() - start:.0f} s.", load, *summary]
    theme = args.theme or ("baselines_" + args.subset if args.subset else "baselines")
    write_results(theme, args.hardware, info, table, notes=notes, out_dir=args.out_dir)
    print("\n".join([*summary, load]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

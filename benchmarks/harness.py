"""What every ``benchmarks/bench_*.py`` shares: the machine description, fair side-by-side timing,
progress lines, and (re-exported from ``report``) the result table and its writer.

Import it as ``benchmarks.harness``, or as ``harness`` from a script in ``benchmarks/``; either way the
repository root must be on ``sys.path`` (``pip install -e .``/``PYTHONPATH``, or a script's first line
``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))`` as in ``bench_baselines.py``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.plotting import PlotSpec
from benchmarks.report import (
    BASELINE_COLUMNS,
    DEFAULT_OUT_DIR,
    Column,
    ResultTable,
    invocation,
    write_results,
)
from torch_collage.timing import Measurement, measure, torch_threads

__all__ = [
    "BASELINE_COLUMNS",
    "DEFAULT_OUT_DIR",
    "Column",
    "PlotSpec",
    "ResultTable",
    "invocation",
    "load_note",
    "machine_info",
    "measure_interleaved",
    "print_header",
    "progress",
    "rotated_orders",
    "write_results",
]

_PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "triton", "matplotlib")
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_AFFINITY", "KMP_BLOCKTIME")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, package versions, load, torch threads and threading env vars.

    ``load_avg_1m`` is the 1-minute load average when this is called: on a machine shared with other
    work, torch's OpenMP threads slow down by up to 10-40x (measured on the 2-core machine at load 6),
    far more than ONNX Runtime's or OpenVINO's thread pools, so results taken under load mislead."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "git_commit": _git_commit(),
    }


def load_note(info: Mapping[str, Any]) -> str:
    """A results note on machine load: at ``machine_info()`` time and now, with a warning when other
    work kept more than half the cores busy before the benchmark started."""
    start, cores = info.get("load_avg_1m"), info.get("cores") or 1
    now = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    note = f"1-minute load average: {start} at start, {now} at end ({cores} cores)."
    if start is not None and start > 0.5 * cores:
        note += " WARNING: the machine was busy before the run; PyTorch's OpenMP threads (eager, Inductor)"
        note += " slow down far more than ONNX Runtime's or OpenVINO's under load, so ratios are skewed."
    return note


def print_header(info: Mapping[str, Any]) -> None:
    """Print the machine description, one ``key: value`` per line, before a benchmark's table."""
    print("=" * 72)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        print(f"{key:>22}: {value}")
    print("=" * 72)


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays for the header and the table)."""
    print(message, file=sys.stderr, flush=True)


def rotated_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of ``names`` in each round: round r starts at name r (mod n), so every name goes
    first, last and after every other equally often over n rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)] if n else []


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 3,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    max_time_s: float | None = None,
) -> dict[str, Measurement]:
    """Time several callables side by side on a noisy machine.

    Each callable is measured in ``rounds`` blocks (``warmup`` untimed calls absorb the previous
    block's thread-pool hand-over, then ``ceil(repeats / rounds)`` timed calls); the order rotates
    every round (``rotated_orders``). The samples of all blocks are pooled per name. ``max_time_s``
    bounds each block. Returns {name: Measurement} in the order of ``fns``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    orders = rotated_orders(list(fns), rounds)
    per_round = -(-repeats // rounds)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch_threads(threads):
        for order in orders:
            for name in order:
                m = measure(fns[name], warmup=warmup, repeats=per_round, max_time_s=max_time_s)
                samples[name].extend(m.samples_ms)
    return {name: Measurement(samples_ms=tuple(s)) for name, s in samples.items()}

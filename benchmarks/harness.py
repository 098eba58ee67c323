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
from torch_collage.timing import Measurement, measure, quantile, torch_threads

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
    "measure_rounds",
    "paired_ratio",
    "pool",
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


def measure_rounds(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 3,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    max_time_s: float | None = None,
) -> dict[str, list[Measurement]]:
    """Time several callables side by side on a noisy machine; one Measurement per round each.

    Each callable is measured in ``rounds`` blocks (``warmup`` untimed calls absorb the previous
    block's thread-pool hand-over, then ``ceil(repeats / rounds)`` timed calls); the order rotates
    every round (``rotated_orders``). ``max_time_s`` bounds each block. Returns {name: [one
    Measurement per round]} in the order of ``fns``; ``paired_ratio`` compares two of them.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    orders = rotated_orders(list(fns), rounds)
    per_round = -(-repeats // rounds)
    blocks: dict[str, list[Measurement]] = {name: [] for name in fns}
    with torch_threads(threads):
        for order in orders:
            for name in order:
                blocks[name].append(
                    measure(fns[name], warmup=warmup, repeats=per_round, max_time_s=max_time_s)
                )
    return blocks


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 3,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    max_time_s: float | None = None,
) -> dict[str, Measurement]:
    """``measure_rounds`` with the samples of all rounds pooled per name."""
    blocks = measure_rounds(
        fns, rounds=rounds, repeats=repeats, warmup=warmup, threads=threads, max_time_s=max_time_s
    )
    return {name: pool(ms) for name, ms in blocks.items()}


def pool(blocks: Sequence[Measurement]) -> Measurement:
    """The samples of several Measurements of one callable as one."""
    return Measurement(samples_ms=tuple(s for m in blocks for s in m.samples_ms))


# [Note: paired ratio]
# On a shared 2-core VM a callable's speed drifts by more than the 3% a verdict needs (IQRs of
# 5-25% of the median in one run). Two callables timed in the same round saw the same drift, so the
# ratio of their medians within a round is steadier than the ratio of medians pooled over rounds;
# the median of those per-round ratios is what a verdict uses.
def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[r] / b[r]``: two callables' per-round medians (``measure_rounds``)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs equally many rounds, at least one; got {len(a)} and {len(b)}")
    return quantile([x / y for x, y in zip(a, b)], 0.5)

"""Wall-clock timing of a callable: the one timing core shared by the cost model and the benchmarks.

[Note: timing protocol]
``measure`` calls ``fn`` ``warmup`` times untimed, then times each of at least ``repeats`` calls with
``time.perf_counter_ns``. If the timed calls have not yet added up to ``min_time_s`` it keeps going;
once the whole measurement (warm-up included) has run for ``max_time_s`` it stops, keeping at least one
sample. Torch's intra-op thread count is pinned to ``threads`` for the duration and restored after, so
every backend is timed with the same number of threads. Grad mode is left to the caller. All times are
reported in milliseconds. On a noisy machine prefer ``p20_ms`` (steadier) or ``median_ms`` over
``mean_ms``, and report ``iqr_ms`` as the spread.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Budget",
    "InterferenceProbe",
    "Measurement",
    "QuietProbe",
    "measure",
    "quantile",
    "torch_threads",
]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) of ``values`` by linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Measurement:
    """Per-call wall-clock times of one measured callable, in milliseconds."""

    samples_ms: tuple[float, ...]  # one entry per timed call, in call order

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("samples_ms must hold at least one sample")

    @property
    def median_ms(self) -> float:
        return quantile(self.samples_ms, 0.5)

    @property
    def p20_ms(self) -> float:
        return quantile(self.samples_ms, 0.2)

    @property
    def iqr_ms(self) -> float:
        return quantile(self.samples_ms, 0.75) - quantile(self.samples_ms, 0.25)

    @property
    def spread(self) -> float:
        """The interquartile range over the median: how much the repeats disagreed (0 for one sample)."""
        median = self.median_ms
        return self.iqr_ms / median if median > 0 else 0.0

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def to_dict(self) -> dict[str, Any]:
        """Summary statistics plus the raw samples, JSON-ready."""
        return {
            "n": len(self.samples_ms),
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "iqr_ms": self.iqr_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "samples_ms": list(self.samples_ms),
        }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count to ``threads`` (None: leave it) and restore it afterwards."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _validate(warmup: int, repeats: int, min_time_s: float, max_time_s: float | None) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if min_time_s < 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s!r}")
    if max_time_s is not None and max_time_s <= 0:
        raise ValueError(f"max_time_s must be > 0 or None, got {max_time_s!r}")


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    max_time_s: float | None = None,
    threads: int | None = None,
) -> Measurement:
    """Time ``fn()`` per call; see [Note: timing protocol]. Returns the samples in milliseconds.

    When CUDA is in use in this process, each call is followed by ``torch.cuda.synchronize()`` inside
    the timed interval, so a sample is the kernels' time, not their launch.
    """
    _validate(warmup, repeats, min_time_s, max_time_s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        inner = fn

        def fn() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    deadline = None if max_time_s is None else time.perf_counter_ns() + int(max_time_s * 1e9)
    min_total_ns = int(min_time_s * 1e9)
    samples_ns: list[int] = []
    with torch_threads(threads):
        for _ in range(warmup):
            fn()
            if deadline is not None and time.perf_counter_ns() >= deadline:
                break
        total_ns = 0
        while True:
            start = time.perf_counter_ns()
            fn()
            elapsed = time.perf_counter_ns() - start
            samples_ns.append(elapsed)
            total_ns += elapsed
            if deadline is not None and start + elapsed >= deadline:
                break
            if len(samples_ns) >= repeats and total_ns >= min_total_ns:
                break
    return Measurement(samples_ms=tuple(ns / 1e6 for ns in samples_ns))


# [Note: quiet measurements]
# A cost is a fact only if the machine was quiet while it was taken: on a shared machine another
# process on a second core made one backend's whole graph time 7.6 ms in one minute and 1.4 ms in a
# quiet one, and a cache that kept the busy minute placed an unseen model 1.8x slower than that
# backend alone. So every timing of the cost model is bracketed by a calibration probe: a fixed
# elementwise kernel spread over the timing's threads, timed before and after (a probe that one
# thread runs misses a neighbour on the other core, and a small one reads up to 1.7x on a quiet
# machine, which would keep quiet timings out of the cache and have warm compiles measure them
# again). The process keeps the fastest probe it has seen at each thread count; a timing whose
# probes ran more than ``BUSY_FACTOR`` slower than that was taken under
# interference. Such a timing is taken once more; if the machine is still busy, its result is used
# for this search only and never written to the cost cache (nor are the search outcomes built on
# it), so a quiet compile later measures it afresh. The probe costs ~0.3 ms a side.
#
# Each cached cost also keeps the spread of its repeats (interquartile range over the median):
# interference too short for the probes to catch still shows there, and `python -m torch_collage
# cache` lists the entries whose spread was above ``HIGH_SPREAD`` (cache.py).
#
# A warm compile takes every cost from the cache, so a lie in it would be kept for good. It therefore
# re-checks what it chose, cheaply: the chosen placement and up to ``RECHECK_CONTENDERS`` of the
# fastest whole-graph backends are timed side by side for ``RECHECK_ROUNDS`` paired rounds of a few
# calls each (place.py's ``recheck``). A compile that measured some pieces again but read the whole
# graphs from the cache re-checks too: its choice rests on them. The cache is contradicted when the
# chosen placement now runs more than ``RECHECK_SLOWER`` times its cached end-to-end time, a
# contender runs that much faster than its cached cost (a busy minute that the probe missed made
# ONNX Runtime's whole MLP 2.2 ms in the cache, 1.2 ms quiet, and kept it out of every comparison),
# or a contender beats it by more than ``RECHECK_MARGIN`` (both beyond ``RECHECK_FLOOR_MS``, below which a call's jitter decides).
# A contender ahead by less, but by more than ``RECHECK_CLOSE``, is what a busy minute leaves
# behind too: the zoo MLP's cache from a run beside a busy loop kept Inductor, 5% slower than ONNX
# Runtime on the quiet machine, and two short rounds cannot tell 5% from jitter. So that contender
# and the choice run ``RECHECK_CONFIRM_ROUNDS`` more paired rounds, and the cache is contradicted
# only if the contender is still ahead by more than ``RECHECK_CLOSE`` over them.
# Then the whole-graph costs and the end-to-end check are measured again, not read, and the cache
# is overwritten with what a quiet machine measured. A re-check taken while the probe saw the machine
# busy proves nothing either way and is ignored. The re-check is not counted as a measurement. When
# it agrees, that is kept with the choice and the cached costs it rests on, and a later compile of
# the same graph on the same cached costs is not re-checked again: a rival that is not kept or saved
# must be compiled to be timed (Inductor's from its own FX cache), and that was most of a warm
# compile (Llama's generate() on the zoo's tiny config, warm: 8.0 s, of which 5.2 s re-checks). A
# paired comparison that agreed is a firmer fact than the single timings it confirmed; a contradicted
# or ignored re-check keeps nothing, and costs measured again make a new key.
BUSY_FACTOR = 1.5
RECHECK_CONTENDERS = 2
RECHECK_ROUNDS = 2
RECHECK_SLOWER = 1.5
RECHECK_MARGIN = 0.15
RECHECK_CLOSE = 0.03
RECHECK_CONFIRM_ROUNDS = 4
RECHECK_FLOOR_MS = 0.05


class InterferenceProbe:
    """Times a fixed CPU kernel; ``slowdown()`` is its time now over the fastest seen in this process
    at the same thread count.

    The kernel is an elementwise multiply of ``numel`` floats (2 MB in, 2 MB out at the default),
    which torch splits over all its intra-op threads: a neighbour on any core the timings use, or on
    the memory bus, shows in it; a small matrix product runs on one thread and does not. The minimum
    of ``calls`` calls after one untimed call is steady on a quiet machine (within 6% at the 99th
    percentile on the 2-core machine, where a 96x96 product read 1.4-1.5x at its 90th)."""

    def __init__(self, numel: int = 1 << 19, calls: int = 5) -> None:
        if numel < 1 or calls < 1:
            raise ValueError(f"numel and calls must be >= 1, got {numel!r} and {calls!r}")
        generator = torch.Generator().manual_seed(0)
        self._a = torch.randn(numel, generator=generator)
        self._out = torch.empty(numel)
        self._calls = calls
        self._best: dict[int, float] = {}  # torch's thread count -> fastest ms seen

    @property
    def best_ms(self) -> float:
        """The fastest probe seen at torch's current thread count (inf: none yet)."""
        return self._best.get(torch.get_num_threads(), math.inf)

    def slowdown(self) -> float:
        threads = torch.get_num_threads()  # the caller pins it to the timing's (cost.py)
        with torch.no_grad():
            ms = measure(
                lambda: torch.mul(self._a, 1.0001, out=self._out), warmup=1, repeats=self._calls
            ).min_ms
        best = min(self._best.get(threads, math.inf), ms)
        self._best[threads] = best
        return ms / best

    def busy(self, slowdown: float) -> bool:
        return slowdown > BUSY_FACTOR


class QuietProbe:
    """A probe that takes the machine as always quiet: for a dedicated machine, and for tests that
    count timings and must not depend on what else the machine runs."""

    best_ms = 0.0

    def slowdown(self) -> float:
        return 1.0

    def busy(self, slowdown: float) -> bool:
        return False


# [Note: the compile budget]
# ``time_budget_s`` caps the cold placement of one graph: recording eager's values, measuring
# candidates, merging, refinement, the end-to-end check and the verification all draw on one
# ``Budget`` started when the placement starts. Every stage asks it before each step whose cost it
# can predict from the steps already taken (seconds per candidate per backend, measured in this
# search and kept in the cost cache across processes), and leaves what the end-to-end check will
# need; what it skipped is counted by name in ``Budget.skipped`` and shown by ``explain``. A step
# already started is not interrupted (a backend's compile cannot be), so the budget can be overrun
# by the one step that was predicted wrong; timings get shorter as the budget runs out.


class Budget:
    """The wall-clock budget of one graph's placement: ``seconds`` from construction (inf: none).
    ``skipped`` counts, by what they were, the steps left out to stay within it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self.seconds, self._clock = seconds, clock
        self.start = clock()
        self.skipped: dict[str, int] = {}

    def spent(self) -> float:
        return self._clock() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    def fits(self, seconds: float, reserve: float = 0.0) -> bool:
        """Whether a step of ``seconds`` fits in what is left beyond ``reserve`` (always, without a cap)."""
        return math.isinf(self.seconds) or self.left() - reserve >= seconds

    def skip(self, what: str, count: int = 1) -> None:
        if count > 0:
            self.skipped[what] = self.skipped.get(what, 0) + count

    def timing_cap_s(self, default_s: float) -> float:
        """How long one timing may run: ``default_s``, shorter once less than ten times that is
        left (at least 0.05 s: warm-up and one sample still run)."""
        return max(0.05, min(default_s, self.left() / 10))

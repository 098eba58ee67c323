"""Measured costs: compile a candidate with its backend, check it against eager, time it; cache the result.

Also measures the cost of switching from one backend to another between two consecutive partitions
(copies, conversions, Python calls and thread-pool hand-over), on a small probe graph.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from torch_collage.artifacts import ArtifactStore
from torch_collage.backends._export import WHOLE_GRAPH
from torch_collage.backends.base import BackendSpec, deterministic, op_name
from torch_collage.cache import CachedCost, CostCache
from torch_collage.candidates import Candidate
from torch_collage.freeze import written_inputs
from torch_collage.graph import DataflowGraph
from torch_collage.options import CollageOptions
from torch_collage.subgraph import Subgraph, constants_digest, digest, extract, tensor_signature
from torch_collage.timing import Budget, InterferenceProbe, QuietProbe, measure, torch_threads

__all__ = [
    "CompiledPart",
    "CostModel",
    "RngState",
    "device_of",
    "kept_rng",
    "outputs_match",
    "record_values",
    "rng_state",
]

logger = logging.getLogger(__name__)

_PROBE_SHAPE = (64, 256)
_PROBE = InterferenceProbe()  # the process's fastest probe time is its baseline


def record_values(
    gm: fx.GraphModule, inputs: Sequence[Any], rng: dict[fx.Node, RngState] | None = None
) -> dict[fx.Node, Any]:
    """Every node's value when ``gm`` runs eagerly on clones of ``inputs`` (mutations stay on the
    clones). An input the graph writes keeps the value it had before ([Note: inputs the graph writes]).
    ``rng`` receives the random generator's state before each random op ([Note: random ops])."""
    values: dict[fx.Node, Any] = {}
    written = set(written_inputs(gm.graph))
    device = device_of(inputs)

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if rng is not None and n.op == "call_function" and not deterministic(n):
                rng[n] = rng_state(device)
            value = super().run_node(n)
            values[n] = copy_strided(value) if n in written and isinstance(value, torch.Tensor) else value
            return value

    clones = [copy_strided(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
        _Recorder(gm).run(*clones)
    return values


# [Note: timing a graph that writes its inputs]
# A candidate, or an assembled placement, is timed by calling it repeatedly on one set of copies of
# its inputs ([Note: inputs the graph writes]). Where it writes an input that it also reads, every
# call sees the previous call's write: the position counter of a Hugging Face StaticCache
# (``pos = arange(S) + n``, ``copy_(n, n + S)``) ran past the end of the cache after a few timed
# calls, and ``index_copy`` raised IndexError. So before each timed call the written inputs of at
# most ``RESTORE_BYTES`` (counters, positions, normalisation statistics) get their recorded values
# back, a copy of a few bytes. A larger written input (a KV cache) is not restored, which would time
# a copy of it with every call: with its positions restored, a cache update writes the same rows on
# every call, and what the other written state drifts to changes no shape and no index.
RESTORE_BYTES = 1 << 16


def _restorable(x: torch.Tensor) -> bool:
    return x.numel() * x.element_size() <= RESTORE_BYTES and all(
        s != 0 for s, n in zip(x.stride(), x.shape) if n > 1
    )


def copy_strided(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x``'s strides, also where ``x`` is a view with gaps (``h[:, 0]``) or an
    expanded one (stride 0), which ``clone`` would make contiguous: code compiled for a candidate may
    rely on the strides it was traced with (Inductor asserts its inputs' strides), and the real
    calls pass the views."""
    if x.is_contiguous():
        return x.clone()
    expanded = [d for d in range(x.dim()) if x.stride(d) == 0 and x.shape[d] > 1]
    src = x[tuple(slice(0, 1) if d in expanded else slice(None) for d in range(x.dim()))]
    try:
        out = torch.empty_strided(src.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(src)
    except RuntimeError:  # strides whose elements overlap otherwise: a contiguous copy
        return x.clone()
    return out.expand(x.shape) if expanded else out


LOW_PRECISION_RTOL = {
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}  # [Note: tolerance of low-precision outputs]


# Ops whose output holds whatever the allocator handed out (``empty_like`` before ``uniform_``
# fills it): a candidate ending at one is not compared on values, which no backend could match.
_UNINITIALIZED = frozenset(
    f"aten.{name}"
    for name in ("empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided")
)


def outputs_match(got: Sequence[Any], want: Sequence[Any], rtol: float, atol: float) -> str:
    """Empty when ``got`` equals ``want`` within tolerance, else why not.

    [Note: tolerance at the tensor's scale]
    Floating outputs pass when ``max|got - want| <= atol + rtol * max|want|``: the error of a
    reordered float32 sum grows with the magnitude of what was summed, not with the element, so an
    elementwise ``rtol`` rejected every backend's whole resnext50 (near-zero outputs off by 5e-4
    beside values in the hundreds) and collage fell back to eager, 1.3x slower than OpenVINO. A wrong
    op still shows as an error at the scale of the output. Other tensors must be equal.

    [Note: tolerance of low-precision outputs]
    ``rtol`` is float32's; a bfloat16 or float16 output is judged with at least ``LOW_PRECISION_RTOL``
    of its dtype (torch.testing's defaults). A backend that keeps intermediates in float32, as
    Inductor does when it fuses, differs from eager's rounding after every op by about the dtype's
    epsilon: a bfloat16 MLP through Inductor was off by 6.5e-3 of its largest output, and at 1e-3
    every backend of a bfloat16 model was rejected and collage could only choose eager.
    """
    if len(got) != len(want):
        return f"returned {len(got)} values, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            got_desc = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            return f"output {i} is {got_desc}, eager's is {tuple(w.shape)} {w.dtype}"
        if not w.is_floating_point() or w.numel() == 0:
            if not torch.equal(g.cpu(), w.cpu()):
                return f"output {i} differs from eager"
            continue
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        if not torch.equal(g64.isnan(), w64.isnan()) or not torch.equal(g64.isinf(), w64.isinf()):
            return f"output {i}: NaN or infinity where eager has none (or the reverse)"
        inf = w64.isinf()
        if not torch.equal(g64[inf], w64[inf]):
            return f"output {i}: infinities of the other sign than eager's"
        finite = torch.isfinite(w64)
        if finite.any():
            err = (g64[finite] - w64[finite]).abs().max().item()
            bound = atol + max(rtol, LOW_PRECISION_RTOL.get(w.dtype, 0.0)) * w64[finite].abs().max().item()
            if err > bound:
                return f"output {i} differs from eager: max abs error {err:.3g} > {bound:.3g} (atol + rtol * max|eager|)"
    return ""


@dataclass(frozen=True)
class CompiledPart:
    subgraph: Subgraph
    backend: str
    fn: Callable[..., Any] | None  # None when the backend failed or mismatched
    reason: str


class CostModel:
    """Costs (median ms) of candidates and backend switches for one graph with recorded values.

    ``warned`` holds the (backend, reason) failures already logged at WARNING; pass one set to the
    cost models of many graphs (the placer does) so that each failure is logged once."""

    def __init__(
        self,
        gm: fx.GraphModule,
        graph: DataflowGraph,
        values: dict[fx.Node, Any],
        specs: dict[str, BackendSpec],
        options: CollageOptions,
        cache: CostCache,
        warned: set[tuple[str, str]] | None = None,
        rng: dict[fx.Node, RngState] | None = None,
        probe: InterferenceProbe | QuietProbe | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.gm, self.graph, self.values, self.specs, self.options, self.cache = (
            gm,
            graph,
            values,
            specs,
            options,
            cache,
        )
        self.threads = options.threads or torch.get_num_threads()
        self.device = device_of(values.values())
        self.versions = {name: spec.version() for name, spec in specs.items()}
        self.measured = 0  # timings run by this model (cache misses)
        self.reasons: dict[tuple[int, str], str] = {}  # rejected candidates and why
        self._probes: dict[str, Callable[..., Any] | None] = {}  # one-op graphs for switch costs
        self.artifacts = ArtifactStore(options.cache_dir, options.compiled_cache_mb)
        self.loaded = 0  # partitions loaded from the artifact store instead of compiled
        # (nearly) whole-graph callables compiled while measuring, handed to assembly instead of compiling again
        self._kept: dict[str, Callable[..., Any]] = {}
        self._warned = set() if warned is None else warned
        self._written = frozenset(written_inputs(gm.graph))  # [Note: inputs the graph writes]
        self._rng = rng or {}  # the generator's state before each random op: [Note: random ops]
        self._session: dict[str, CachedCost] = {}  # verdicts and busy timings kept for this model only
        self._probe = probe or _PROBE
        self.noisy = 0  # timings still under interference when taken again: [Note: quiet measurements]
        self.budget = budget or Budget(options.time_budget_s)  # [Note: the compile budget] in timing.py
        # costs measured afresh instead of read from the cache, once a re-check contradicted it
        # ([Note: quiet measurements]); ``_fresh`` holds what was measured since
        self.refresh = False
        self._fresh: dict[str, CachedCost] = {}
        self.last_spread = 0.0  # the spread of the last timing's repeats
        self.rechecks = 0  # timings of a warm compile's re-check, not counted in ``measured``
        # backends whose whole-graph cost was read, not measured, by this search: what a re-check checks
        self.read_wholes: set[str] = set()
        # (backend, whole graph?) -> [seconds, candidates] measured (cache misses) in this search
        self._spent: dict[tuple[str, bool], list[float]] = {}

    def args(self, nodes: Sequence[fx.Node]) -> list[Any]:
        """The recorded values of ``nodes`` to run a part of the graph on: fresh copies of the inputs
        the graph writes, so that no run changes them ([Note: inputs the graph writes])."""
        return [copy_strided(self.values[n]) if n in self._written else self.values[n] for n in nodes]

    def restorer(self, nodes: Sequence[fx.Node], args: Sequence[Any]) -> Callable[[], None] | None:
        """For ``args = self.args(nodes)`` timed over repeated calls: a function giving the small inputs
        the graph writes their recorded values back, to call before each call (None when there are
        none); see [Note: timing a graph that writes its inputs]."""
        pairs = [
            (a, self.values[n])
            for n, a in zip(nodes, args)
            if n in self._written and isinstance(a, torch.Tensor) and _restorable(a)
        ]
        if not pairs:
            return None

        def restore() -> None:
            for dst, src in pairs:
                dst.copy_(src)

        return restore

    def replaying_rng(self, mask: int | None = None) -> contextlib.AbstractContextManager[None]:
        """Runs under the generator's state before the first random op of units ``mask`` (all of
        the graph when None) as the recording had it, so eager reproduces its random values; the
        caller's generator state is restored afterwards ([Note: random ops])."""
        nodes = self.gm.graph.nodes if mask is None else self.graph.nodes(mask)
        first = next((n for n in nodes if n in self._rng), None)
        return _replay_rng(self.device, self._rng[first] if first is not None else None)

    def key(self, kind: str, backend: str, sub: Subgraph) -> str:
        inputs = [self.values[n] for n in sub.inputs]
        return digest(
            kind,
            backend,
            self.versions[backend],
            sub.structure,
            tensor_signature(inputs),
            str(self.threads),
            device_label(self.device),
        )

    def cost(self, cand: Candidate) -> float:
        """Median ms of ``cand`` on its backend; ``inf`` if it fails to compile or differs from eager."""
        sub = extract(self.gm, self.graph.nodes(cand.mask))
        key = self.key("candidate", cand.backend, sub)
        cached = self._fresh.get(key) if self.refresh else self.cache.get(key) or self._session.get(key)
        if cached is not None and cand.mask == self.graph.full and not self.refresh:
            self.read_wholes.add(cand.backend)
        if cached is None:
            noisy, start = self.noisy, time.perf_counter()
            cached = self._measure(sub, cand.backend, cand.mask)
            self._spent_on(cand, time.perf_counter() - start)
            quiet = self.noisy == noisy  # [Note: quiet measurements]
            if self.refresh:
                self._fresh[key] = cached
            if (cached.ok and quiet) or (not cached.ok and self._trusted(sub)):
                self.cache.put(key, cached)
            else:  # [Note: verdicts on non-finite values]
                self._session[key] = cached
        if not cached.ok:
            self.reasons[(cand.mask, cand.backend)] = cached.reason
        return cached.ms

    def compile(self, mask: int, backend: str) -> CompiledPart:
        """Units ``mask`` compiled on ``backend`` and checked against eager (used by assembly): the
        whole graph as compiled while measuring, else loaded from the artifact store, else compiled
        (and saved there). See [Note: compiled artifacts] in artifacts.py."""
        sub = extract(self.gm, self.graph.nodes(mask))
        spec = self.specs[backend]
        # the key hashes every constant (0.3 s for gpt2's weights): computed once, only if used
        key = (
            self._artifact_key(backend, sub) if self.artifacts.enabled and (spec.save or spec.load) else None
        )
        fn: Callable[..., Any] | None = self._kept.pop(self._kept_key(backend, sub), None)
        reason = ""
        if fn is None and key is not None:
            fn = self._load(sub, backend, key, mask)
            if fn is not None:
                return CompiledPart(sub, backend, fn, "")
        if fn is None:
            fn, reason = self._compile_checked(sub, backend, mask)
        if fn is not None and spec.save is not None:
            if key is not None:
                save = spec.save
                self.artifacts.save(key, lambda directory: save(fn, directory))
            _release_saved_copy(fn)  # saved now, or never: [Note: the blob a runner keeps] in openvino.py
        return CompiledPart(sub, backend, fn, reason)

    def _measure(self, sub: Subgraph, backend: str, mask: int) -> CachedCost:
        label = self._label(mask, backend)
        fn, reason = self._compile_checked(sub, backend, mask)
        if fn is None:
            return CachedCost(math.inf, reason, 0.0, label)
        inputs = self.args(sub.inputs)
        restore = self.restorer(sub.inputs, inputs)  # [Note: timing a graph that writes its inputs]
        call = (lambda: fn(*inputs)) if restore is None else (lambda: (restore(), fn(*inputs)))
        ms = self.time_call(call)
        if 2 * mask.bit_count() >= self.graph.size:  # a whole or nearly whole graph: a contender end to end
            self._kept[self._kept_key(backend, sub)] = fn
        return CachedCost(ms, "", self.last_spread, label)

    def _label(self, mask: int, backend: str) -> str:
        """What a cached cost is of, for people (``python -m torch_collage cache``)."""
        if mask == self.graph.full:
            return f"{backend}: whole graph ({self.graph.size} ops)"
        names = self.graph.names(mask)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{backend}: {len(names)} ops ({shown})"

    # -- what measuring costs: [Note: the compile budget] in timing.py ---------------------------

    def _spent_on(self, cand: Candidate, seconds: float) -> None:
        whole = cand.mask == self.graph.full
        spent = self._spent.setdefault((cand.backend, whole), [0.0, 0])
        spent[0] += seconds
        spent[1] += 1
        if whole and cand.backend != "eager":
            key = self._rate_key(cand.backend)
            old = _float_or_none(self.cache.get_text(key))
            rate = seconds / max(1, self.graph.size)
            self.cache.put_text(key, json.dumps(rate if old is None else (old + rate) / 2))

    def predicted_s(self, cand: Candidate) -> float | None:
        """Seconds that measuring ``cand`` (compile, check, timing) will likely take: the mean over
        this search's candidates of its backend and kind (whole graph or not), else for a whole graph
        its backend's seconds per op on earlier graphs (cached) or its spec's prior
        (``compile_s_per_op``), else that mean over the other backends; None when nothing of the
        kind was measured yet."""
        whole = cand.mask == self.graph.full
        spent = self._spent.get((cand.backend, whole))
        if spent:
            return spent[0] / spent[1]
        if whole:
            rate = _float_or_none(self.cache.get_text(self._rate_key(cand.backend)))
            if rate is None:  # nothing measured on this machine yet: the backend's own prior
                rate = self.specs[cand.backend].compile_s_per_op
            if rate is not None:
                return rate * self.graph.size
        alike = [v for (b, w), v in self._spent.items() if w == whole and not (whole and b == "eager")]
        if alike:
            return sum(v[0] for v in alike) / sum(v[1] for v in alike)
        return None

    def search_key(self, *parts: str) -> str:
        """Cache key of a budgeted search step: the graph, its inputs, the backends, threads and ``parts``."""
        args = [self.values[n] for n in self.gm.graph.nodes if n.op == "placeholder"]
        backends = ",".join(f"{b}={self.versions[b]}" for b in sorted(self.specs))
        return digest(
            "search", str(self.gm.graph), tensor_signature(args), backends, str(self.threads), *parts
        )

    def was_cut(self, what: str) -> bool:
        """Whether a cold search left ``what`` out for the budget (``cut``): a warm compile, faster,
        leaves it out too, so that it finds every cost it needs cached ([Note: a budget-cut search
        replays its cut] in measure.py)."""
        return self.cache.get_text(self._cut_key(what)) is not None

    def cut(self, what: str, kind: str) -> None:
        """Leave ``what`` out for the budget, counted as ``kind`` in ``budget.skipped``; remembered."""
        self.budget.skip(kind)
        self.cache.put_text(self._cut_key(what), "cut")

    def _cut_key(self, what: str) -> str:
        return self.search_key("cut", str(self.options.time_budget_s), what)

    def _rate_key(self, backend: str) -> str:
        return digest("measure-rate", backend, self.versions[backend], device_label(self.device))

    def _trusted(self, sub: Subgraph) -> bool:
        """Whether a rejection of ``sub`` may be cached for good: eager's values it was checked on
        are all finite.

        [Note: verdicts on non-finite values]
        A NaN in a user's input spreads through eager's values, and a backend that orders a reduction
        differently may put its NaN elsewhere (or an overflow may make an infinity). Such a mismatch
        says nothing about the backend on ordinary inputs, so the rejection is kept for this search
        only, never written to the cost cache where it would reject the backend for every later
        input of this shape."""
        values = [self.values[n] for n in (*sub.inputs, *sub.outputs)]
        return all(
            bool(torch.isfinite(v).all())
            for v in values
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )

    def _kept_key(self, backend: str, sub: Subgraph) -> str:
        return f"{backend}\x1f{sub.structure}"

    def _artifact_key(self, backend: str, sub: Subgraph) -> str:
        return digest(self.key("artifact", backend, sub), constants_digest(sub))

    def _load(self, sub: Subgraph, backend: str, key: str, mask: int) -> Callable[..., Any] | None:
        load = self.specs[backend].load
        if load is None:
            return None
        inputs = tuple(self.args(sub.inputs))
        with torch.no_grad():
            fn = self.artifacts.load(key, lambda directory: load(directory, inputs))
        if fn is None:
            return None
        reason = self._check(fn, sub, mask)
        if reason:
            logger.warning(
                "torch_collage: saved %s partition differs from eager (%s); compiling again", backend, reason
            )
            self.artifacts.discard(key)
            return None
        self.loaded += 1
        return fn

    def time_call(self, call: Callable[[], Any], repeats: int | None = None) -> float:
        """Median ms of ``call()`` under the timing protocol and thread count (counted as a measurement),
        taken again once if the machine was busy; ``noisy`` counts those still busy the second time
        ([Note: quiet measurements]). ``repeats``: timed calls (default: option ``repeats``)."""
        for attempt in range(2):
            with torch_threads(self.threads):  # the probe spreads over the timing's threads
                before = self._probe.slowdown()
            ms = self._time_once(call, repeats)
            with torch_threads(self.threads):
                after = self._probe.slowdown()
            if not self._probe.busy(max(before, after)):
                return ms
            logger.debug(
                "torch_collage: timing under interference (probe %.2fx), attempt %d",
                max(before, after),
                attempt,
            )
        self.noisy += 1
        return ms

    def _time_once(self, call: Callable[[], Any], repeats: int | None) -> float:
        opts = self.options
        cap = self.budget.timing_cap_s(_MAX_TIMING_S)
        with torch.no_grad():
            m = measure(
                call,
                warmup=opts.warmup,
                repeats=repeats or opts.repeats,
                max_time_s=cap,
                threads=self.threads,
            )
        self.measured += 1
        self.last_spread = m.spread
        return m.median_ms

    def _compile_checked(
        self, sub: Subgraph, backend: str, mask: int
    ) -> tuple[Callable[..., Any] | None, str]:
        inputs = tuple(self.args(sub.inputs))
        if mask == self.graph.full:  # a runtime may then use the cores alone: [Note: ORT call path]
            sub.module.meta[WHOLE_GRAPH] = True
        try:
            with torch.no_grad():
                fn = self.specs[backend].compile(sub.module, inputs)
            reason = self._check(fn, sub, mask)
        except Exception as exc:
            return None, self._failed(backend, _reason(exc), exc)
        if reason:
            logger.info("torch_collage: %s candidate rejected: %s", backend, reason)
            return None, f"mismatch: {reason}"
        return fn, ""

    def _check(self, fn: Callable[..., Any], sub: Subgraph, mask: int) -> str:
        """Why ``fn``'s outputs on the recorded inputs differ from eager's; empty when they match."""
        with torch.no_grad(), self.replaying_rng(mask):
            got = fn(*self.args(sub.inputs))
        got = tuple(got) if isinstance(got, (list, tuple)) else (got,)
        want = [None if op_name(n) in _UNINITIALIZED else self.values[n] for n in sub.outputs]
        return outputs_match(got, want, self.options.rtol, self.options.atol)

    def _failed(self, backend: str, reason: str, exc: Exception) -> str:
        if self.options.on_backend_failure == "raise":
            raise exc
        if (backend, reason) not in self._warned:
            self._warned.add((backend, reason))
            logger.warning("torch_collage: %s could not run a candidate, using others: %s", backend, reason)
        return reason

    def switch_cost(self, a: str, b: str) -> float:
        """Extra ms of calling a ``b`` partition right after an ``a`` one, beyond their own times."""
        if a == b:
            return 0.0
        key = digest(
            "switch", a, self.versions[a], b, self.versions[b], str(self.threads), str(_PROBE_SHAPE),
            device_label(self.device),
        )  # fmt: skip
        cached = self.cache.get(key) or self._session.get(key)
        if cached is None:
            noisy = self.noisy
            cached = CachedCost(self._measure_switch(a, b), "")
            self.put_if_quiet(key, cached, noisy)
        return cached.ms if cached.ok else 0.0

    def put_if_quiet(self, key: str, cost: CachedCost, noisy_before: int) -> None:
        """Cache ``cost`` if no timing since ``noisy_before`` was busy, else keep it for this model only
        ([Note: quiet measurements])."""
        if self.noisy == noisy_before:
            self.cache.put(key, cost)
        else:
            self._session[key] = cost

    def _measure_switch(self, a: str, b: str) -> float:
        x = torch.randn(_PROBE_SHAPE, device=self.device)
        for name in (a, b):
            if name not in self._probes:
                self._probes[name] = _probe(self.specs[name], x)
        fa, fb = self._probes[a], self._probes[b]
        if fa is None or fb is None:
            return 0.0
        both = self.time_call(lambda: fb(fa(x)[0])[0])
        alone = self.time_call(lambda: fa(x)) + self.time_call(lambda: fb(x))
        return max(0.0, both - alone)


def device_of(values: Any) -> torch.device:
    """The device of the graph's tensors (the first one found; CPU when there is none)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """The device part of cache keys: ``cpu:<model>:<features>`` or ``cuda:<model name>``. Costs
    differ from one processor to another, and a compiled partition saved on one CPU may use
    instructions another lacks, so a cache directory shared between machines keeps them apart."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{_cpu_identity()}"
    return device.type


@functools.cache
def _cpu_identity() -> str:
    """The processor's model name and a digest of its feature flags (Linux), else what ``platform`` knows."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not flags:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if flags and model:
                    break
    except OSError:
        pass
    return f"{model}:{digest(flags)[:12]}"


def _probe(spec: BackendSpec, x: torch.Tensor) -> Callable[..., Any] | None:
    """A one-op graph (``relu``) compiled on ``spec``; None if it cannot."""
    graph = fx.Graph()
    inp = graph.placeholder("x")
    graph.output((graph.call_function(torch.ops.aten.relu.default, (inp,)),))
    try:
        with torch.no_grad():
            fn = spec.compile(fx.GraphModule(torch.nn.Module(), graph), (x,))
            fn(x)
        return fn
    except Exception:
        return None


_MAX_REASON_CHARS = 1000
_MAX_TIMING_S = 2.0  # one timing's cap (warm-up included), shorter as the budget runs out


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(json.loads(text)) if text is not None else None
    except (ValueError, TypeError):
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _reason(exc: BaseException) -> str:
    """Why a backend failed: the exception's type and whole message (a backend's error names the op
    and says why), on one line, clipped to ``_MAX_REASON_CHARS``."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    reason = f"{type(exc).__name__}: {text}"
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def _release_saved_copy(fn: Callable[..., Any]) -> None:
    """Let a runner drop what it kept only to be saved (the built-in runtimes keep their serialised
    model, as large as the weights), once it has been saved or will not be: the store is off
    (``compiled_cache_mb=0``) or already holds the entry."""
    release = getattr(fn, "release_saved_copy", None)
    if callable(release):
        release()


# [Note: random ops]
# Random ops (dropout, ``rand``, ``bernoulli``) run on eager only (``deterministic`` keeps them from
# the runtimes, whose generators differ). Eager reproduces the recorded values when it starts from
# the generator state the recording had: that state is kept before each random op, and a candidate
# is checked under the state before its first random op (the ops inside it run in graph order, as
# they did). Every run the placement makes restores the caller's generator afterwards, so the
# user's random stream advances exactly as one eager call advances it.
RngState = tuple[torch.Tensor, torch.Tensor | None]  # (CPU generator state, CUDA generator state)


def rng_state(device: torch.device) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def kept_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Restores the generator state of ``device`` (and the CPU's) on exit: [Note: random ops]."""
    return _replay_rng(device, None)


@contextlib.contextmanager
def _replay_rng(device: torch.device, state: RngState | None) -> Iterator[None]:
    saved = rng_state(device)
    try:
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield
    finally:
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], device)

"""Per-operator costs: measured forward / backward time, activation and parameter bytes.

Every operator runs on the real activations of one micro-batch (recorded by running the traced module
once); its forward and backward are timed separately, ``repeats`` times after a warm-up: the table
keeps the median, the interquartile range and the number of samples (the planner trusts a median
only as far as those allow, see [Note: plans that reproduce] in torch_graphpipe/stable.py).
Operators doing the same work (same module type and configuration, or the same function, on inputs
of the same shapes and dtypes; e.g. the blocks of parallel branches) pool their samples, get one
median and spread, and share ``OpCost.signature``: timings on a shared machine are noisy, and
identical branches measured apart came out up to 1.3x apart, which made the planner treat them
differently from run to run. A fixed :class:`CostTable` can be built by hand instead, for unit tests
of the planner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from torch_graphpipe.graph import OpGraph

__all__ = ["CommModel", "CostTable", "OpCost", "profile_graph"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpCost:
    """Cost of one operator for one micro-batch."""

    fwd_ms: float = 0.0  # forward time, milliseconds
    bwd_ms: float = 0.0  # backward time, milliseconds
    wgt_ms: float = 0.0  # the weight-gradient part of bwd_ms (see [Note: zero-bubble DAG schedule])
    out_bytes: int = 0  # bytes of its output (activation sent to a consumer, stored per micro-batch)
    param_bytes: int = 0  # bytes of the parameters it owns
    saves: tuple[str, ...] | None = None  # operators whose outputs it saves for backward (None: unknown)
    temp_bytes: int = 0  # bytes it saves for backward that are neither its inputs nor its output
    alias_of: str | None = None  # the operator whose output its output is a view of (same storage)
    fwd_spread_ms: float = (
        0.0  # interquartile range of the forward samples (see [Note: plans that reproduce])
    )
    bwd_spread_ms: float = 0.0  # interquartile range of the backward samples
    samples: int = 1  # timed runs of this operator behind the medians and spreads
    signature: str = ""  # equal for operators doing the same work ("": unknown; see the module docstring)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("saves", "alias_of", "signature") and getattr(self, f.name) < 0:
                raise ValueError(f"OpCost.{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.samples < 1:
            raise ValueError(f"OpCost.samples must be >= 1, got {self.samples}")
        if self.temp_bytes < 0:
            raise ValueError(f"OpCost.temp_bytes must be >= 0, got {self.temp_bytes}")
        if self.wgt_ms > self.bwd_ms:
            raise ValueError(f"OpCost.wgt_ms={self.wgt_ms} is part of bwd_ms={self.bwd_ms}, so at most it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommModel:
    """Affine point-to-point cost ``t = alpha_ms + bytes / bytes_per_ms`` of one message."""

    alpha_ms: float = 0.1  # latency per message (gloo over loopback TCP: tens to hundreds of us)
    bytes_per_ms: float = 1.0e6  # bandwidth, bytes per millisecond (1e6 = 1 GB/s)

    def __post_init__(self) -> None:
        if self.alpha_ms < 0:
            raise ValueError(f"CommModel.alpha_ms must be >= 0, got {self.alpha_ms}")
        if self.bytes_per_ms <= 0:
            raise ValueError(f"CommModel.bytes_per_ms must be > 0, got {self.bytes_per_ms}")

    def time_ms(self, nbytes: int) -> float:
        """Time of one message of ``nbytes`` bytes; zero bytes cost nothing."""
        return 0.0 if nbytes <= 0 else self.alpha_ms + nbytes / self.bytes_per_ms

    @classmethod
    def free(cls) -> CommModel:
        """Communication that costs nothing (for worked examples)."""
        return cls(alpha_ms=0.0, bytes_per_ms=float("inf"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostTable:
    """Costs of every operator of a graph, for one micro-batch of ``microbatch_size`` samples."""

    ops: Mapping[str, OpCost]  # node name -> cost
    comm: CommModel = dataclasses.field(default_factory=CommModel)  # communication model
    microbatch_size: int = 1  # samples per micro-batch (to report time per sample)
    param_copies: float = 4.0  # parameter-sized buffers per parameter (weights, grads, 2 Adam moments)
    tolerance: float = 0.05  # relative difference in simulated time planning treats as noise

    def of(self, name: str) -> OpCost:
        return self.ops.get(name, OpCost())

    def check_covers(self, graph: OpGraph) -> None:
        missing = [n.name for n in graph.nodes if n.name not in self.ops]
        if missing:
            raise ValueError(f"cost table has no entry for nodes {missing[:5]}")


def profile_graph(
    gm: fx.GraphModule,
    graph: OpGraph,
    microbatch_inputs: Sequence[Any],
    *,
    repeats: int = 7,
    comm: CommModel | None = None,
    microbatch_size: int = 1,
    num_threads: int | None = 1,
) -> CostTable:
    """Measure every operator of ``graph`` (captured from ``gm``) on one micro-batch.

    ``num_threads`` intra-op threads are used while timing (1: a CPU stage process runs one thread;
    ``None`` keeps the current setting). On a shared 2-core machine multi-threaded timings of small
    operators are dominated by waiting for a busy core.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with _model_state_kept(gm):
            ops = _profile_ops(gm, graph, microbatch_inputs, repeats)
    finally:
        torch.set_num_threads(previous)
    log.info("profiled %d operators, %d repeats each", len(ops), repeats)
    return CostTable(ops=ops, comm=comm or CommModel(), microbatch_size=microbatch_size)


@contextlib.contextmanager
def _model_state_kept(gm: fx.GraphModule) -> Iterator[None]:
    """Profiling runs the real model: keep its gradients, buffers (e.g. running stats) and the CPU random
    number generator as they were (only one rank profiles; the ranks' generators must stay in step)."""
    grads = [(p, p.grad) for p in gm.parameters()]
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _profile_ops(
    gm: fx.GraphModule, graph: OpGraph, microbatch_inputs: Sequence[Any], repeats: int
) -> dict[str, OpCost]:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*microbatch_inputs)
    env = interp.env
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    samples: dict[
        str, tuple[list[float], list[float], list[float]]
    ] = {}  # signature -> pooled (fwd, bwd, wgt)
    signature = {}
    for node in graph.nodes:
        fx_node = fx_nodes[node.name]
        fn = _callable(gm, fx_node)
        args, kwargs = fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda a: env[a])
        is_weight = fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda a: a.op == "get_attr")
        signature[node.name] = _signature(fn, fx_node, args, kwargs)
        timed = _time_node(fn, args, kwargs, pytree.tree_leaves(is_weight), repeats)
        pooled = samples.setdefault(signature[node.name], ([], [], []))
        for into, new in zip(pooled, timed):
            into.extend(new)
    ops = {}
    aliases = _aliases(gm, graph, env)
    for node in graph.nodes:
        fwd, bwd, wgt = samples[signature[node.name]]
        fx_node = fx_nodes[node.name]
        saves, temp = _saved(gm, fx_node, env)
        ops[node.name] = OpCost(
            fwd_ms=statistics.median(fwd),
            bwd_ms=statistics.median(bwd),
            fwd_spread_ms=_iqr(fwd),
            bwd_spread_ms=_iqr(bwd),
            samples=repeats,
            signature=signature[node.name],
            wgt_ms=min(statistics.median(wgt), statistics.median(bwd)),
            out_bytes=_nbytes(env[fx_node]),
            param_bytes=_param_bytes(gm, fx_node),
            saves=saves,
            temp_bytes=temp,
            alias_of=aliases.get(node.name),
        )
    return ops


def _iqr(samples: Sequence[float]) -> float:
    """Interquartile range (0 for fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]


def _signature(fn: Callable[..., Any], node: fx.Node, args: Any, kwargs: Any) -> str:
    """Equal for operators that do the same work (see the module docstring)."""
    if isinstance(fn, torch.nn.Module):
        params = [(tuple(p.shape), p.dtype, p.requires_grad) for p in fn.parameters()]
        what = f"{type(fn).__qualname__}({fn.extra_repr()}) {params}"
    else:
        what = f"{node.op}:{getattr(node.target, '__qualname__', node.target)!s}"

    def describe(x: Any) -> Any:
        return ("T", tuple(x.shape), x.dtype, x.stride()) if isinstance(x, torch.Tensor) else repr(x)

    return f"{what} {pytree.tree_map(describe, (args, kwargs))}"


def _callable(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    if node.op == "call_method":
        return lambda self, *a, **k: getattr(self, str(node.target))(*a, **k)
    target = node.target
    assert callable(target), f"{node.name}: {target!r} is not callable"
    return target


def _time_node(
    fn: Callable[..., Any], args: Any, kwargs: Any, is_weight: Sequence[bool], repeats: int
) -> tuple[list[float], list[float], list[float]]:
    """``repeats`` forward, backward and weight-gradient times (ms) after one warm-up.

    An operator with weights (its module's parameters, or arguments read from the model's attributes,
    ``is_weight`` per argument leaf) and other inputs is differentiated in two timed passes, input
    gradients then weight gradients, as a zero-bubble schedule runs it (see [Note: split backward]);
    the backward time is their sum, the weight-gradient time the second."""
    fwd_times, bwd_times, wgt_times = [], [], []
    own = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    for _ in range(repeats + 1):  # first round warms up
        a, k = pytree.tree_map(_leaf_input, (args, kwargs))
        start = time.perf_counter()
        out = fn(*a, **k)
        fwd_times.append((time.perf_counter() - start) * 1e3)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        leaves = [(x, w) for x, w in zip(pytree.tree_leaves((a, k)), is_weight) if _grad_leaf(x)]
        weights = [p for p in own if p.requires_grad] + [x for x, w in leaves if w]
        inputs = [x for x, w in leaves if not w]
        if not outs:
            bwd_times.append(0.0)
            wgt_times.append(0.0)
            continue
        grads = [torch.randn_like(t) for t in outs]
        start = time.perf_counter()
        if inputs:
            torch.autograd.grad(outs, inputs, grads, retain_graph=bool(weights), allow_unused=True)
        middle = time.perf_counter()
        if weights:
            torch.autograd.grad(outs, weights, grads, allow_unused=True)
        end = time.perf_counter()
        bwd_times.append((end - start) * 1e3)
        wgt_times.append((end - middle) * 1e3 if weights else 0.0)
    return fwd_times[1:], bwd_times[1:], wgt_times[1:]


def _saved(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple[str, ...], int]:
    """What ``node`` saves for backward (see [Note: held activations]): the operators (itself for its
    output) whose values it keeps, and the bytes of what else it keeps (weights and model inputs
    excepted)."""
    fn = _callable(gm, node)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
    a, k = pytree.tree_map(_leaf_input, (args, kwargs))
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*a, **k)
    owner: dict[int, str | None] = {}  # storage -> the operator whose value it is (None: not held per mb)
    for arg in node.all_input_nodes:
        held = None if arg.op in ("get_attr", "placeholder") else arg.name
        for t in _tensors(env[arg]):
            owner[_storage(t)] = held
    if isinstance(fn, torch.nn.Module):
        owner.update((_storage(p), None) for p in [*fn.parameters(), *fn.buffers()])
    owner.update((_storage(t), node.name) for t in _tensors(out))
    saves: dict[str, None] = {}
    temp: dict[int, int] = {}
    for t in kept:
        key = _storage(t)
        if key in owner:
            if owner[key] is not None:
                saves[str(owner[key])] = None
        else:
            temp[key] = t.untyped_storage().nbytes()
    return tuple(saves), sum(temp.values())


def _aliases(gm: fx.GraphModule, graph: OpGraph, env: dict[fx.Node, Any]) -> dict[str, str]:
    """``{operator: the earlier operator whose output storage its output shares}`` (views); a view of a
    model input maps to ``""``."""
    first: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            first.update((_storage(t), "") for t in _tensors(env.get(node)))
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, str] = {}
    for node in graph.nodes:
        tensors = _tensors(env[fx_nodes[node.name]])
        if tensors:
            base = first.setdefault(_storage(tensors[0]), node.name)
            if base != node.name:
                out[node.name] = base
    return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def _grad_leaf(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _leaf_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().requires_grad_(True)
    return x


def _nbytes(value: Any) -> int:
    leaves = pytree.tree_leaves(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _param_bytes(gm: fx.GraphModule, node: fx.Node) -> int:
    total = 0
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        total += sum(p.numel() * p.element_size() for p in mod.parameters())
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            total += _nbytes(_resolve_attr(gm, str(arg.target)))
    return total


def _resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

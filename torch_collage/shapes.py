"""Shape ranges: a graph with symbolic shapes is placed once and runs at every size of its range.

[Note: shape ranges]
Dynamo hands a backend a graph with symbolic sizes when an input's size changed between calls
(automatic dynamic shapes), under ``dynamic=True``, or where ``torch._dynamo.mark_dynamic`` asked
for it (with ``min``/``max``, the range). Its guards send every call whose sizes lie in the range
to that one graph, so one placement serves them all:

* The search runs once per graph, on the first call's real inputs: costs are measured at that
  representative size and cached under it. The placement (which nodes run on which backend) holds
  for the whole range; ``explain`` shows the range and the size it was measured at.
* Each partition then runs at any size of the range (``FlexibleStep``). A backend whose spec has a
  ``compile_dynamic`` (eager, Inductor through dynamo's symbolic shapes, ONNX Runtime and OpenVINO
  through an export with dynamic axes) compiles the partition once for the range; the first few
  new sizes are checked against eager, and a mismatch or failure falls back to compiling per size.
  Symbolic sizes that a partition takes as integer inputs are rebuilt inside it from its tensor
  inputs' dimensions (``aten.sym_size``), so runtimes that take tensors only can still compile it
  for the range; where that is impossible, the partition compiles per size.
* A backend without ``compile_dynamic``, or whose dynamic compile failed, compiles the partition
  again at each new size (kept, most recent ``MAX_SHAPES``), checked against eager before use;
  one that fails at a size runs that size on eager. Either way no size searches again.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch import fx

from torch_collage.artifacts import ArtifactStore
from torch_collage.assembly import AssembledGraph, Step
from torch_collage.backends.base import BackendSpec
from torch_collage.backends.registry import get_spec
from torch_collage.cost import device_of, kept_rng, outputs_match, record_values
from torch_collage.options import CollageOptions
from torch_collage.subgraph import Subgraph, constants_digest, digest, tensor_signature

__all__ = [
    "MAX_SHAPES",
    "FlexibleStep",
    "RangeKey",
    "describe_range",
    "dynamic_dims",
    "flexible",
    "has_symbolic_inputs",
    "range_key",
]

logger = logging.getLogger(__name__)

MAX_SHAPES = 16  # compiled sizes a partition keeps when its backend compiles per size
_CHECKED_SIZES = 2  # new sizes of a range-compiled partition checked against eager


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, torch.SymInt) and not isinstance(value.node.expr, sympy.Integer)


def dynamic_dims(node: fx.Node) -> tuple[int, ...]:
    """The dimensions of ``node``'s tensor value whose size is symbolic (empty for other values)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return ()
    return tuple(d for d, size in enumerate(val.shape) if _is_symbolic(size))


def _symbolic_scalar(node: fx.Node) -> bool:
    return _is_symbolic(node.meta.get("val"))


def has_symbolic_inputs(gm: fx.GraphModule) -> bool:
    """Whether any input of ``gm`` has a symbolic size or stride (or its example value is unknown)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) or (val is None and "val" not in node.meta):
            return True
        if isinstance(val, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in (*val.shape, *val.stride(), val.storage_offset())
        ):
            return True
    return False


class RangeKey:
    """Keys a call's inputs by everything but their symbolic sizes: calls with the same key share a
    placement ([Note: shape ranges])."""

    def __init__(self, gm: fx.GraphModule) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._dims = tuple(frozenset(dynamic_dims(n)) for n in placeholders)
        self._scalar = tuple(_symbolic_scalar(n) for n in placeholders)

    def __call__(self, args: Sequence[Any]) -> str:
        return range_key(args, self._dims, self._scalar)


def range_key(args: Sequence[Any], dims: Sequence[frozenset[int]], scalar: Sequence[bool]) -> str:
    """``args``' signature with the sizes at ``dims`` (per input) and the ``scalar`` inputs left out;
    strides only as contiguous or not."""
    parts = []
    for i, v in enumerate(args):
        if isinstance(v, torch.Tensor):
            shape = ",".join("*" if d in dims[i] else str(s) for d, s in enumerate(v.shape))
            parts.append(
                f"({shape}):{v.dtype}:{int(v.is_contiguous())}:{v.device.type}:{int(v.requires_grad)}"
            )
        elif i < len(scalar) and scalar[i]:
            parts.append("*")
        else:
            parts.append(repr(v))
    return ";".join(parts)


def describe_range(gm: fx.GraphModule, args: Sequence[Any]) -> str:
    """``"s0 in [2, inf), s1 in [4, 64]; placed at s0=3, s1=9"``: the symbolic sizes of ``gm``'s
    inputs, their ranges, and their values in ``args`` (empty when ``gm`` has static shapes)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: dict[sympy.Symbol, tuple[Any, int]] = {}
    for node, arg in zip(placeholders, args):
        val = node.meta.get("val")
        sizes: list[tuple[Any, Any]] = []
        if isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor):
            sizes = list(zip(val.shape, arg.shape))
        elif isinstance(val, torch.SymInt) and isinstance(arg, int):
            sizes = [(val, arg)]
        for size, real in sizes:
            if _is_symbolic(size) and isinstance(size.node.expr, sympy.Symbol):
                found.setdefault(size.node.expr, (size.node.shape_env, int(real)))
    if not found:
        return ""
    ranges, values = [], []
    for sym in sorted(found, key=str):
        env, real = found[sym]
        vr = env.var_to_range.get(sym) if env is not None else None
        low = _bound(vr.lower) if vr is not None else None
        high = _bound(vr.upper) if vr is not None else None
        upper = f"{high}]" if high is not None else "inf)"
        ranges.append(f"{sym} in [{low or 0}, {upper}")
        values.append(f"{sym}={real}")
    return f"{', '.join(ranges)}; placed at {', '.join(values)}"


def _bound(value: Any) -> int | None:
    """A range's bound as an int; None when infinite."""
    return int(value) if isinstance(value, sympy.Integer) else None


# --- partitions at any size of the range -----------------------------------------------------------


class FlexibleStep:
    """One partition of a placement, callable at any size of its graph's range ([Note: shape ranges]).

    ``fn`` is what the placement compiled at ``example`` (the representative size). With a
    range-compiled callable the step calls it for every size (checking the first few new sizes
    against eager); otherwise it compiles ``spec`` again for each new size."""

    def __init__(
        self, spec: BackendSpec, sub: Subgraph, fn: Any, example: Sequence[Any], parent_inputs: Sequence[fx.Node],
        rtol: float, atol: float, store: ArtifactStore | None = None,
    ) -> None:  # fmt: skip
        self.spec, self.sub, self.rtol, self.atol, self._store = spec, sub, rtol, atol, store
        self._fns: OrderedDict[str, Any] = OrderedDict({tensor_signature(example): fn})
        self._lock = threading.Lock()
        self._ranged: Any = None
        self._seen: set[str] = set(self._fns)
        self._warned = False
        if spec.compile_dynamic is not None:
            self._ranged = self._compile_ranged(example, parent_inputs)

    @property
    def ranged(self) -> bool:
        """Whether one compile serves every size (else: one compile per size)."""
        return self._ranged is not None

    def __call__(self, *args: Any) -> Any:
        ranged = self._ranged
        if ranged is not None:
            if len(self._seen) > _CHECKED_SIZES:
                return ranged(*args)
            return self._checked_ranged(args)
        sig = tensor_signature(args)
        fn = self._fns.get(sig)
        if fn is None:
            with self._lock:
                fn = self._fns.get(sig) or self._compile_size(args, sig)
        return fn(*args)

    def _compile_ranged(self, example: Sequence[Any], parent_inputs: Sequence[fx.Node]) -> Any:
        compile_dynamic = self.spec.compile_dynamic
        assert compile_dynamic is not None
        try:
            gm, keep = _without_scalars(self.sub, parent_inputs)
            gm.meta.update(self.sub.module.meta)  # a whole graph's mark ([Note: ORT call path])
        except _NotRebuildable as exc:
            logger.info("torch_collage: %s partition compiles per size: %s", self.spec.name, exc)
            return None
        dims = tuple(dynamic_dims(parent_inputs[i]) for i in keep)
        tensors = tuple(example[i] for i in keep)
        key = self._artifact_key(tensors, dims)
        inner = self._load(key, tensors, example)
        if inner is None:
            try:
                with torch.no_grad():
                    inner = compile_dynamic(gm, tensors, dims)
                    got = inner(*tensors)
            except Exception as exc:  # a backend's failure for the range: compile per size instead
                logger.info(
                    "torch_collage: %s could not compile a partition for the range, compiling per size: %s",
                    self.spec.name,
                    exc,
                )
                return None
            reason = self._mismatch(got, example)
            if reason:
                logger.info(
                    "torch_collage: %s range-compiled partition differs from eager: %s",
                    self.spec.name,
                    reason,
                )
                return None
            self._save(key, inner)
        return _DropScalars(inner, keep) if len(keep) < len(example) else inner

    def _artifact_key(self, tensors: Sequence[Any], dims: Sequence[tuple[int, ...]]) -> str | None:
        """The compiled store's key of this partition compiled for the range ([Note: compiled
        artifacts] in artifacts.py): structure, constants, and the inputs without their dynamic sizes."""
        store, spec = self._store, self.spec
        if store is None or not store.enabled or spec.load is None or spec.save is None:
            return None
        shapes = range_key(tensors, [frozenset(d) for d in dims], [False] * len(tensors))
        return digest("range", spec.name, spec.version(), self.sub.structure, shapes,
                      str(torch.get_num_threads()), constants_digest(self.sub))  # fmt: skip

    def _load(self, key: str | None, tensors: Sequence[Any], example: Sequence[Any]) -> Any:
        load = self.spec.load
        if key is None or self._store is None or load is None:
            return None
        with torch.no_grad():
            inner = self._store.load(key, lambda directory: load(directory, tuple(tensors)))
        if inner is None:
            return None
        try:
            with torch.no_grad():
                reason = self._mismatch(inner(*tensors), example)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            logger.warning(
                "torch_collage: saved %s range partition unusable (%s); compiling again",
                self.spec.name,
                reason,
            )
            self._store.discard(key)
            return None
        return inner

    def _save(self, key: str | None, inner: Any) -> None:
        save = self.spec.save
        if key is not None and self._store is not None and save is not None:
            self._store.save(key, lambda directory: save(inner, directory))
        release = getattr(inner, "release_saved_copy", None)
        if callable(release):
            release()

    def _checked_ranged(self, args: Sequence[Any]) -> Any:
        sig = tensor_signature(args)
        if sig in self._seen:
            return self._ranged(*args)
        try:
            with torch.no_grad():
                got = self._ranged(*args)
            reason = self._mismatch(got, args)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._seen.add(sig)
            if reason:
                logger.warning(
                    "torch_collage: %s partition compiled for the range failed at a new size (%s); "
                    "compiling per size from now on",
                    self.spec.name,
                    reason,
                )
                self._ranged = None
        return self(*args)

    def _compile_size(self, args: Sequence[Any], sig: str) -> Any:
        fn: Any = None
        try:
            with torch.no_grad():
                fn = self.spec.compile(self.sub.module, tuple(args))
                reason = self._mismatch(fn(*args), args)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "torch_collage: %s partition failed at a new size, running it on eager there: %s",
                    self.spec.name,
                    reason,
                )
            fn = self.sub.module
        else:
            logger.info("torch_collage: %s partition compiled for a new size", self.spec.name)
        self._fns[sig] = fn
        while len(self._fns) > MAX_SHAPES:
            self._fns.popitem(last=False)
        return fn

    def _mismatch(self, got: Any, args: Sequence[Any]) -> str:
        with torch.no_grad():
            want = self.sub.module(*args)
        got = got if isinstance(got, (tuple, list)) else (got,)
        return outputs_match(list(got), list(want), self.rtol, self.atol)


class _DropScalars:
    """Calls ``fn`` with the inputs at ``keep`` only (the others are rebuilt inside its graph)."""

    def __init__(self, fn: Any, keep: Sequence[int]) -> None:
        self._fn, self._keep = fn, tuple(keep)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*[args[i] for i in self._keep])


class _NotRebuildable(Exception):
    """A symbolic integer input that the partition's tensor inputs do not determine."""


def _without_scalars(sub: Subgraph, parent_inputs: Sequence[fx.Node]) -> tuple[fx.GraphModule, list[int]]:
    """``sub``'s graph with its symbolic integer inputs computed from its tensor inputs' sizes
    (``aten.sym_size.int``), and the positions of the inputs it still takes."""
    scalars = [i for i, n in enumerate(parent_inputs) if not isinstance(n.meta.get("val"), torch.Tensor)]
    if not scalars:
        return sub.module, list(range(len(parent_inputs)))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if i not in scalars:
            env[node] = graph.node_copy(node)
    where: dict[sympy.Symbol, tuple[fx.Node, int]] = {}
    for i, node in enumerate(placeholders):
        val = parent_inputs[i].meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    where.setdefault(size.node.expr, (env[node], d))
    for i in scalars:
        val = parent_inputs[i].meta.get("val")
        if not isinstance(val, torch.SymInt):
            raise _NotRebuildable(f"input {i} is a {type(val).__name__}, not a size")
        env[placeholders[i]] = _build(graph, val.node.expr, where)
    for node in sub.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    keep = [i for i in range(len(placeholders)) if i not in scalars]
    return fx.GraphModule(sub.root, graph), keep


def _build(graph: fx.Graph, expr: sympy.Expr, where: dict[sympy.Symbol, tuple[fx.Node, int]]) -> Any:
    """Nodes computing ``expr`` (integers, sizes, sums and products of them) from tensor sizes."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        if expr not in where:
            raise _NotRebuildable(f"size {expr} is no dimension of the partition's tensor inputs")
        tensor, dim = where[expr]
        return graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        op = operator.add if isinstance(expr, sympy.Add) else operator.mul
        terms = [_build(graph, a, where) for a in expr.args]
        acc = terms[0]
        for term in terms[1:]:
            acc = graph.call_function(op, (acc, term))
        return acc
    raise _NotRebuildable(f"size {expr} is not a sum or product of dimensions")


def flexible(
    gm: fx.GraphModule, assembled: AssembledGraph, args: Sequence[Any], options: CollageOptions
) -> AssembledGraph:
    """``assembled`` (placed at ``args``) with each partition able to run at any size of ``gm``'s
    range ([Note: shape ranges]). Eager partitions run the graph as it is and stay as they are."""
    steps: list[Step] = []
    values: dict[fx.Node, Any] | None = None
    store = ArtifactStore(options.cache_dir, options.compiled_cache_mb)
    for step in assembled.steps:
        if step.backend == "eager":
            steps.append(step)
            continue
        if values is None:  # each partition's inputs at the placed size, from one eager run on copies
            with kept_rng(device_of(args)):
                values = record_values(gm, args)
        example = [values[n] for n in step.subgraph.inputs]
        flex = FlexibleStep(
            get_spec(step.backend), step.subgraph, step.fn, example, step.subgraph.inputs,
            options.rtol, options.atol, store,
        )  # fmt: skip
        steps.append(Step(step.backend, flex, step.subgraph))
    return AssembledGraph(gm, steps)

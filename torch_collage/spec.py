"""What a backend can run: capability specs (ops with predicates, fusion style, compile, availability)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx

__all__ = [
    "BackendInfo",
    "BackendSpec",
    "CompileFn",
    "Fusion",
    "LoadFn",
    "OpRule",
    "SaveFn",
    "node_tensor_meta",
    "op_name",
]

Fusion = Literal["single", "elementwise_epilogue", "region"]
CompileFn = Callable[[fx.GraphModule, tuple[torch.Tensor, ...]], Callable[..., Any]]
SaveFn = Callable[[Callable[..., Any], Path], bool]  # (compiled callable, empty directory) -> saved?
LoadFn = Callable[[Path, tuple[torch.Tensor, ...]], Callable[..., Any]]  # (directory, example inputs)
NodePredicate = Callable[[fx.Node], bool]


def op_name(node: fx.Node) -> str:
    """``"aten.addmm"`` for ``aten.addmm.default`` (the overload packet's name); the target's name otherwise."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return f"{packet._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def node_tensor_meta(node: fx.Node) -> list[torch.Tensor]:
    """The (fake) tensors ``node`` produces according to its ``meta["val"]`` (empty if it has none)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


@dataclass(frozen=True, kw_only=True)
class OpRule:
    """One supported ATen op (``"aten.addmm"``) with optional predicates on its tensor outputs."""

    op: str  # overload packet name, e.g. "aten.mm"; "*" matches every op
    dtypes: frozenset[torch.dtype] | None = None  # allowed output dtypes; None: any
    min_rank: int = 0  # smallest allowed output rank
    max_rank: int | None = None  # largest allowed output rank; None: any
    where: NodePredicate | None = None  # extra predicate on the node (shapes, attributes, ...)

    def matches(self, node: fx.Node) -> bool:
        if self.op not in ("*", op_name(node)):
            return False
        for t in node_tensor_meta(node):
            if self.dtypes is not None and t.dtype not in self.dtypes:
                return False
            if t.dim() < self.min_rank or (self.max_rank is not None and t.dim() > self.max_rank):
                return False
        return self.where is None or self.where(node)


def _always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """A placeable backend. ``supports`` is a collection of ``OpRule``/op names or a node predicate."""

    name: str  # registry name
    compile: CompileFn  # FX GraphModule (ATen) + example inputs -> callable returning a tuple of tensors
    supports: Collection[OpRule | str] | NodePredicate = ("*",)  # which nodes it can run
    fusion: Fusion = "region"  # single ops, an op + elementwise epilogue, or convex regions
    max_depth: int | None = None  # most ops per candidate for this backend; None: the option's max_depth
    available: Callable[[], tuple[bool, str]] = _always  # (ok, reason why not)
    version: Callable[[], str] = lambda: "0"  # part of every cache key
    patterns: tuple[
        tuple[str, ...], ...
    ] = ()  # op chains fused as one candidate, e.g. ("aten.mm", "aten.relu")
    mutating_ok: bool = False  # may run ops that mutate inputs or return non-tensors (eager does)
    # Optional: write a compiled callable into a directory (False: this one cannot be saved), and
    # rebuild it from there, so that a warm compile skips compiling; see [Note: compiled artifacts].
    save: SaveFn | None = None
    load: LoadFn | None = None
    rules: tuple[OpRule, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        if self.fusion not in ("single", "elementwise_epilogue", "region"):
            raise ValueError(f"fusion must be single, elementwise_epilogue or region, got {self.fusion!r}")
        if not callable(self.supports):
            rules = tuple(r if isinstance(r, OpRule) else OpRule(op=str(r)) for r in self.supports)
            object.__setattr__(self, "rules", rules)

    def supports_node(self, node: fx.Node) -> bool:
        """Whether this backend may run ``node`` (a ``call_function`` node of an ATen graph)."""
        if not self.mutating_ok and (_mutates(node) or not _tensor_valued(node)):
            return False
        if callable(self.supports):
            return bool(self.supports(node))
        return any(rule.matches(node) for rule in self.rules)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _tensor_valued(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return bool(vals) and all(isinstance(v, torch.Tensor) for v in vals)


@dataclass(frozen=True)
class BackendInfo:
    """``list_backends()`` entry: whether the backend can be used here, and why not."""

    name: str
    available: bool
    reason: str  # empty when available
    fusion: Fusion
    version: str  # empty when unavailable

"""Freezing: an inference graph's parameter inputs become constants of the graph.

[Note: freezing]
aot_autograd hands backends ATen graphs whose parameters and buffers are graph *inputs*. A runtime
such as ONNX Runtime or OpenVINO then cannot fold or pre-pack the weights and receives them on every
call: the same MLP ran 1.35x slower on OpenVINO with its weights as inputs than as constants. So an
inference graph is placed with its static inputs (``fw_metadata.static_input_indices``: parameters
and buffers) baked in as ``get_attr`` constants. The weights must then not change behind the
compiled graph's back: :class:`FrozenInputs` remembers each static input's identity and version
counter (bumped by every in-place update, e.g. ``optimizer.step()``), and the graph is placed again
(from cached costs) when one of them changes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = [
    "FROZEN_PREFIX",
    "FrozenInputs",
    "fetch_attr",
    "freeze_inputs",
    "refresh",
    "static_input_indices",
    "written_inputs",
]

FROZEN_PREFIX = "_collage_frozen_"  # attribute names of frozen inputs


def static_input_indices() -> tuple[int, ...]:
    """Indices of the graph inputs that are parameters or buffers, from aot_autograd's tracing context."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fw_metadata is None:
        return ()
    return tuple(context.fw_metadata.static_input_indices)


@dataclass(frozen=True)
class FrozenInputs:
    """Which inputs were frozen, and the identity and version of each tensor when it was.

    Both methods run on every call of a compiled graph, so they are plain loops over tuples built
    once: with 80 frozen weights they cost ~5 us, where generator expressions took ~20 us.
    """

    indices: tuple[int, ...]
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    pointers: tuple[int, ...]  # data pointers: ``p.data = new`` keeps identity and version
    keep: tuple[int, ...]  # indices of the inputs that were not frozen

    @classmethod
    def of(cls, args: Sequence[Any], indices: Sequence[int]) -> FrozenInputs:
        tensors = tuple(args[i] for i in indices)
        frozen = set(indices)
        keep = tuple(i for i in range(len(args)) if i not in frozen)
        versions = tuple(t._version for t in tensors)
        return cls(tuple(indices), tensors, versions, tuple(t.data_ptr() for t in tensors), keep)

    def still_valid(self, args: Sequence[Any]) -> bool:
        """True while every frozen input is the same tensor on the same storage, not modified in
        place since (in-place writes through ``.data`` are invisible here: [Note: writes through
        .data])."""
        if len(args) != len(self.indices) + len(self.keep):
            return False
        for i, t, v, p in zip(self.indices, self.tensors, self.versions, self.pointers):
            if args[i] is not t or t._version != v or t.data_ptr() != p:
                return False
        return True

    def dynamic(self, args: Sequence[Any]) -> list[Any]:
        """The inputs that were not frozen, in order."""
        return list(self._pick(args))

    @functools.cached_property
    def _pick(self) -> Callable[[Sequence[Any]], Sequence[Any]]:
        return items_getter(self.keep)


def items_getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """``seq -> the items of seq at indices``, always a sequence, from a C-level getter: no Python
    frame per call, where every call of a compiled model runs it ([Note: call overhead] in entry.py)."""
    if len(indices) >= 2:
        return operator.itemgetter(*indices)
    return operator.itemgetter(slice(indices[0], indices[0] + 1) if indices else slice(0, 0))


def written_inputs(graph: fx.Graph) -> list[fx.Node]:
    """The placeholders of ``graph`` that an op writes in place (``copy_`` of BatchNorm's running
    statistics, a counter's ``add_``, a cache's ``index_copy_``), in placeholder order.

    [Note: inputs the graph writes]
    aot_autograd keeps an inference graph's input mutations in the graph (``copy_`` into the input at
    the end). Such an input is state, not a weight: it is never frozen (a frozen constant aliases the
    user's tensor, so every measurement would update the user's module), and everything that runs a
    part of the graph to check or time it runs on copies of it. Only the placed graph, called by the
    user, writes the user's tensor: once per call, as eager does.
    """
    written: set[fx.Node] = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node) and value.op == "placeholder":
                written.add(value)
    return [n for n in graph.nodes if n in written]


def freeze_inputs(gm: fx.GraphModule, args: Sequence[Any], indices: Sequence[int]) -> fx.GraphModule:
    """A copy of ``gm`` whose placeholders at ``indices`` read the tensors ``args[i]`` as constants.

    The constants alias the given tensors (no copy). See [Note: freezing].
    """
    frozen = fx.GraphModule(gm, fx.Graph())  # shares gm's attributes; the graph is rebuilt below
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    wanted = set(indices)
    for i, node in enumerate(placeholders):
        if i in wanted and isinstance(args[i], torch.Tensor):
            name = f"{FROZEN_PREFIX}{i}"
            frozen.register_buffer(name, args[i].detach(), persistent=False)
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":  # lifted constants (``torch.tensor([])`` in a model's forward)
            _copy_attr(gm, frozen, str(node.target))
    frozen.graph = graph
    frozen.recompile()
    return frozen


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    """``dst.<target>`` = ``src.<target>`` (a dotted path), creating empty submodules on the way."""
    *path, name = target.split(".")
    for part in path:
        if not hasattr(dst, part):
            dst.add_module(part, torch.nn.Module())
        src, dst = getattr(src, part), getattr(dst, part)
    value = getattr(src, name)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        dst.register_buffer(name, value, persistent=False)
    else:
        setattr(dst, name, value)


def refresh(module: torch.nn.Module) -> None:
    """Tell compiled graphs that ``module``'s parameters and buffers changed behind autograd's back.

    [Note: writes through .data]
    Collage freezes an inference graph's weights and places it again when one changes: a new tensor,
    a new storage (``p.data = new``), or an in-place update (``p.mul_(2)`` under ``no_grad``, an
    optimizer step), which bumps the tensor's version counter. An in-place write through ``.data``
    (``p.data.mul_(2)``) bumps no counter, by design of ``.data``, and reading every weight on every
    call to notice it would cost more than most calls. After such writes, call ``refresh(module)``:
    it bumps the counters, and the next call of a compiled graph places it again (from the cache)."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            torch.autograd.graph.increment_version(t)


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` node with ``target`` (a dotted path) reads from ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

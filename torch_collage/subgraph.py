"""Cut a set of FX nodes out of a GraphModule into a standalone GraphModule, with a canonical key.

The submodule takes the values flowing into the set as positional inputs (in order of first use) and
returns, as a tuple, every value of the set that is used outside it (in graph order). Its canonical
key names nodes by position, so two structurally equal subgraphs (repeated blocks) share a key.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from torch_collage.freeze import FROZEN_PREFIX, fetch_attr
from torch_collage.graph import constant_expressions, find_constant_expressions
from torch_collage.rewrite import IN_PLACE

__all__ = ["Subgraph", "constants_digest", "digest", "extract", "fold_constants", "tensor_signature"]


@dataclass(frozen=True)
class Subgraph:
    root: torch.nn.Module  # holds the constants the graph's get_attr nodes read
    graph: fx.Graph  # standalone; returns a tuple
    inputs: tuple[fx.Node, ...]  # nodes of the parent graph feeding it, positionally
    outputs: tuple[fx.Node, ...]  # nodes of the parent graph it returns, in order
    structure: str  # canonical text of its ops (no names), the structural part of cache keys

    @functools.cached_property
    def module(self) -> fx.GraphModule:
        """The graph as a module, built on first use: generating its code costs ~1 ms, and a warm
        compile looks up hundreds of candidates by ``structure`` without ever running them."""
        return fx.GraphModule(self.root, self.graph)


def extract(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> Subgraph:
    """``nodes`` (any order) as a submodule of ``gm``; get_attr constants are copied in."""
    inside = set(nodes)
    ordered = [n for n in gm.graph.nodes if n in inside]
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []
    local: dict[fx.Node, int] = {}
    lines: list[str] = []

    consts = constant_expressions(gm.graph)

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg in consts:  # computed inside from its constants: [Note: constant expressions]
                env[arg] = graph.node_copy(arg, lookup)
                env[arg].meta = {}
                lines.append(_op_line(arg, local))
            elif arg.op == "get_attr":
                name = f"c{len(env)}"
                _attach(root, name, fetch_attr(gm, str(arg.target)))
                env[arg] = graph.get_attr(name)
                lines.append(f"const {_const_digest(getattr(root, name), by_value=not _is_frozen(arg))}")
            else:
                env[arg] = graph.placeholder(f"in{len(inputs)}")
                inputs.append(arg)
                lines.append(f"input {len(inputs) - 1}")
            local[arg] = len(lines) - 1
        return env[arg]

    for node in ordered:
        env[node] = graph.node_copy(node, lookup)
        env[node].meta = {}  # the parent's fake values and traces confuse re-tracing backends
        line = _op_line(node, local)
        if node.meta.get(IN_PLACE):  # [Note: rewrites before placing] in rewrite.py
            env[node].meta[IN_PLACE] = True
            line += " in place"
        lines.append(line)
        local[node] = len(lines) - 1
    outputs = tuple(n for n in ordered if any(u not in inside for u in n.users))
    graph.output(tuple(env[n] for n in outputs))
    lines.append(f"out {[local[n] for n in outputs]}")
    return Subgraph(root, graph, tuple(inputs), outputs, "\n".join(lines))


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its constant expressions ([Note: constant expressions] in graph.py)
    evaluated once into constants, for a backend that takes weights only as plain constants (CUTLASS
    reads ``addmm(b, x, t(W))`` as a GEMM on a constant ``t(W)``). ``gm`` itself is left alone."""
    consts = find_constant_expressions(gm.graph)
    if not consts:
        return gm
    graph = fx.Graph()
    attrs: dict[str, Any] = {}
    values: dict[fx.Node, Any] = {}
    env: dict[fx.Node, fx.Node] = {}

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:  # a constant expression read by a kept node: it becomes a constant
            name = f"folded{len(attrs)}"
            attrs[name] = values[arg]
            env[arg] = graph.get_attr(name)
        return env[arg]

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = fetch_attr(gm, str(node.target))
            attrs[str(node.target)] = values[node]
            env[node] = graph.get_attr(str(node.target))
        elif node in consts:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
        else:
            env[node] = graph.node_copy(node, lookup)
    graph.eliminate_dead_code()
    return fx.GraphModule(attrs, graph)


def constants_digest(sub: Subgraph) -> str:
    """A digest of the values of ``sub``'s constants (frozen weights included), for keys of what a
    backend compiled with those values baked in; see [Note: compiled artifacts] in artifacts.py."""
    parts = []
    for node in sub.graph.nodes:
        if node.op == "get_attr":
            parts.append(_const_digest(fetch_attr(sub.root, str(node.target))))
    return digest(*parts)


def tensor_signature(values: Iterable[Any]) -> str:
    """Shapes, dtypes, strides and devices of ``values`` (other values by repr), for cache keys."""
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            parts.append(f"{tuple(v.shape)}:{v.dtype}:{v.stride()}:{v.device.type}:{int(v.requires_grad)}")
        else:
            parts.append(repr(v))
    return ";".join(parts)


def _op_line(node: fx.Node, local: dict[fx.Node, int]) -> str:
    """``node``'s line of a canonical key: its op and arguments, nodes named by position."""
    return f"{node.target} {_canon(node.args, local)} {_canon(node.kwargs, local)}"


def _canon(value: Any, local: dict[fx.Node, int]) -> str:
    if isinstance(value, fx.Node):
        return f"%{local[value]}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canon(v, local) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_canon(v, local)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def _attach(root: torch.nn.Module, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        root.register_buffer(name, value)
    else:
        setattr(root, name, value)


def _is_frozen(node: fx.Node) -> bool:
    """A frozen parameter (see [Note: freezing] in freeze.py): its values do not change costs."""
    return str(node.target).startswith(FROZEN_PREFIX)


def _const_digest(value: Any, *, by_value: bool = True) -> str:
    if isinstance(value, torch.Tensor) and not by_value:
        return f"{tuple(value.shape)}:{value.dtype}:{value.stride()}"
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        return f"{tuple(value.shape)}:{value.dtype}:{hashlib.sha256(data.data).hexdigest()[:16]}"
    return repr(value)


def digest(*parts: str) -> str:
    """A short stable hash of ``parts`` (cache keys)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

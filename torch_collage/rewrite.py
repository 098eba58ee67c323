"""Exact rewrites of an inference graph before it is placed: what a traced decoder copies that its
eager forward never would.

[Note: rewrites before placing]
The graph collage receives is not the user's eager code: dynamo traces a Hugging Face decoder with a
``StaticCache`` into a graph that copies the KV cache again and again, and every backend, eager
included, then runs those copies. Profiled on a 2-layer Llama decode step at 32K cache slots, the
graph on eager ran 43 ms where the model's own forward ran 2.8 ms; ``aten::copy_`` took 70% of it.
Two rewrites remove the copies without changing any value:

- **Grouped attention.** Transformers expands K and V to every query head before SDPA
  (``repeat_kv``: ``unsqueeze(2) -> expand -> clone -> _unsafe_view``, ``Hq / Hkv`` copies of the
  cache per step). Where both the key and the value of an attention node are such chains, the node
  reads the chains' sources instead: ``aten.scaled_dot_product_attention`` with ``enable_gqa=True``,
  and ``aten._scaled_dot_product_flash_attention_for_cpu`` (aot_autograd's CPU lowering of SDPA)
  as it is, since its kernel maps query head ``h`` to KV head ``h // (Hq / Hkv)`` itself, the head
  order ``repeat_kv`` lays out; the result is bitwise the same (32K slots, 16/4 heads: 5.0 ms
  against 68 ms with the copies). Only inference graphs: a training graph saves the expanded K and
  V for its backward.
- **Cache updates in place.** Functionalized, ``self.keys.index_copy_(2, pos, k)`` becomes
  ``new = index_copy(keys, 2, pos, k)`` read by the attention and ``copy_(keys, new)`` at the end:
  the whole cache read and written twice per step. Where ``keys`` is a graph input read by nothing
  but that ``index_copy`` and the ``copy_`` writing it back (``inplace_update_reason``), the node is
  marked ``IN_PLACE``: the graph stays functional for every backend (a runtime may take the node
  and return the whole new cache), while eager, the backend that runs mutations, runs it as
  ``keys.index_copy_(...)`` on the tensor it is given and the ``copy_`` then copies ``keys`` onto
  itself, which ``Tensor.copy_`` skips. Collage measures and verifies on copies of the inputs a graph
  writes ([Note: inputs the graph writes] in freeze.py), so only the user's call writes the user's
  cache. The mark travels with the node into a partition (``subgraph.extract``) and into its cache
  key, so a cost measured in place is never read for the functional node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

import torch
from torch import fx

__all__ = [
    "IN_PLACE",
    "chain_source",
    "group_attention",
    "inplace_update_reason",
    "mark_in_place_updates",
    "meta_shape",
    "read_chain_sources",
    "rewrite_for_placing",
    "run_marked_in_place",
]

IN_PLACE = (
    "collage_in_place"  # node meta: an index_copy that may run in place ([Note: rewrites before placing])
)

_aten = torch.ops.aten
_INDEX_COPY, _COPY_ = _aten.index_copy, _aten.copy_
_UNSQUEEZE, _EXPAND, _CLONE = _aten.unsqueeze, _aten.expand, _aten.clone
_RESHAPES = (_aten._unsafe_view, _aten.view, _aten.reshape)
_SDPA, _FLASH_CPU = _aten.scaled_dot_product_attention, _aten._scaled_dot_product_flash_attention_for_cpu

Shape = Callable[[fx.Node], "tuple[int, ...] | None"]


def _runs(node: object, *ops: object) -> TypeGuard[fx.Node]:
    """Whether ``node`` is a call of one of the ATen ops (overload packets) ``ops``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return getattr(node.target, "overloadpacket", None) in ops


def meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The static shape of ``node``'s value from its ``val`` metadata (None if unknown or symbolic)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return None
    return tuple(val.shape)


def chain_source(end: fx.Node, shape: Shape = meta_shape) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """``(x, chain)`` when ``end`` is the last node of ``repeat_kv(x)``: ``x [B, Hkv, L, D]``
    -> ``unsqueeze(2)`` -> ``expand([B, Hkv, n, L, D])`` -> ``clone`` (optional) -> a reshape to
    ``[B, Hkv * n, L, D]``, each node read only by the next; ``chain`` lists them from ``x`` on
    (without ``x``). None otherwise. ``shape`` gives a node's static shape."""
    if not _runs(end, *_RESHAPES):
        return None
    nodes = [end]
    node = end.args[0]
    if _runs(node, _CLONE) and node.kwargs.get("memory_format") in (None, torch.contiguous_format):
        nodes.append(node)
        node = node.args[0]
    if not _runs(node, _EXPAND):
        return None
    nodes.append(node)
    unsq = node.args[0]
    if not _runs(unsq, _UNSQUEEZE) or unsq.args[1:] != (2,):
        return None
    nodes.append(unsq)
    x = unsq.args[0]
    if not isinstance(x, fx.Node) or any(len(n.users) != 1 for n in nodes[1:]):
        return None
    src, out, wide = shape(x), shape(end), shape(node)
    if src is None or out is None or wide is None or len(src) != 4:
        return None
    b, hkv, length, d = src
    n_rep = wide[2] if len(wide) == 5 else 0
    if wide != (b, hkv, n_rep, length, d) or out != (b, hkv * n_rep, length, d):
        return None
    return x, tuple(reversed(nodes))


def inplace_update_reason(node: fx.Node) -> str:
    """Why ``node`` is not a cache update that may run in place ("" when it is); see
    [Note: rewrites before placing]."""
    if not _runs(node, _INDEX_COPY):
        return f"{node.target} is not aten.index_copy"
    cache = node.args[0]
    if not isinstance(cache, fx.Node) or cache.op != "placeholder":
        return "index_copy's destination is not a graph input"
    writes = [u for u in cache.users if u is not node]
    if len(writes) != 1 or not _runs(writes[0], _COPY_) or writes[0].args[:2] != (cache, node):
        return "the graph input is read by other nodes than index_copy and the copy_ writing it back"
    if any(u.op == "output" for u in node.users):
        return "the updated cache is a graph output"
    return ""


def _kv_positions(node: fx.Node) -> list[tuple[int | None, str, object]]:
    """Key and value of an attention call: ``(position or None for a keyword, name, arg)``."""
    found: list[tuple[int | None, str, object]] = []
    for i, name in ((1, "key"), (2, "value")):
        if i < len(node.args):
            found.append((i, name, node.args[i]))
        elif name in node.kwargs:
            found.append((None, name, node.kwargs[name]))
    return found


def read_chain_sources(node: fx.Node, shape: Shape = meta_shape) -> list[tuple[fx.Node, ...]] | None:
    """Where the key and value of attention ``node`` are both ``repeat_kv`` chains grouped alike,
    points the node at the chains' sources and returns the chains (now read by nothing but each
    other); else None and ``node`` is unchanged."""
    kv = _kv_positions(node)
    maybe = [chain_source(a, shape) if isinstance(a, fx.Node) else None for _, _, a in kv]
    found = [f for f in maybe if f is not None]
    if len(kv) != 2 or len(found) != 2:
        return None
    if shape(found[0][1][-1]) != shape(found[1][1][-1]) or shape(found[0][0]) != shape(found[1][0]):
        return None  # key and value grouped alike: the kernels take one Hkv
    for (i, name, _), (source, _chain) in zip(kv, found):
        if i is None:
            node.update_kwarg(name, source)
        else:
            node.update_arg(i, source)
    return [chain for _source, chain in found]


def group_attention(graph: fx.Graph, shape: Shape = meta_shape) -> int:
    """Points the key and value of each SDPA node whose key and value are both ``repeat_kv`` chains
    at the chains' sources (grouped-query attention), drops the chains, and returns how many nodes
    it rewrote ([Note: rewrites before placing])."""
    count = 0
    for node in list(graph.nodes):
        if not _runs(node, _SDPA, _FLASH_CPU):
            continue
        chains = read_chain_sources(node, shape)
        if chains is None:
            continue
        if _runs(node, _SDPA):
            node.update_kwarg("enable_gqa", True)
        for chain in chains:
            for dead in reversed(chain):
                if not dead.users:
                    graph.erase_node(dead)
        count += 1
    return count


def mark_in_place_updates(graph: fx.Graph) -> int:
    """Marks each ``index_copy`` that may run in place with ``IN_PLACE``; returns how many."""
    count = 0
    for node in graph.nodes:
        if _runs(node, _INDEX_COPY) and not inplace_update_reason(node):
            node.meta[IN_PLACE] = True
            count += 1
    return count


def run_marked_in_place(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it whose ``IN_PLACE`` nodes run as ``index_copy_`` (returning their
    destination): what eager runs for a partition ([Note: rewrites before placing])."""
    if not any(n.meta.get(IN_PLACE) for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, new in copies.items():
        if old.meta.get(IN_PLACE):
            new.target = torch.ops.aten.index_copy_.default
    return fx.GraphModule(gm, graph)


def rewrite_for_placing(gm: fx.GraphModule, kind: str) -> dict[str, int]:
    """Applies the rewrites of [Note: rewrites before placing] to an ``inference`` graph ``gm`` in
    place; returns how many of each it made (nothing for other kinds)."""
    if kind != "inference":
        return {}
    grouped = group_attention(gm.graph)
    if grouped:
        gm.recompile()
    done = {"grouped attention": grouped, "in-place cache updates": mark_in_place_updates(gm.graph)}
    return {k: v for k, v in done.items() if v}

"""The KV-cache side of torch_cp's Collage backend: the cache update it runs in place, and the
``repeat_kv`` copies of the cache it never makes.

[Note: KV cache nodes torch_cp claims]
A Hugging Face ``StaticCache`` decode step reaches collage functionalized (aot_autograd with
``keep_inference_input_mutations``): ``self.keys.index_copy_(2, pos, k)`` becomes
``new = index_copy(keys, 2, pos, k)``, the attention reads ``new``, and ``copy_(keys, new)`` at the
end of the graph writes it back. Run as written, every step reads and writes the whole cache twice,
and a runtime given ``index_copy`` returns the whole new cache as an output (one more copy): the step
costs ``Lmax``, not the tokens held. Grouped-query attention adds ``repeat_kv``
(``unsqueeze(2) -> expand -> clone -> _unsafe_view``), which materialises the cache ``Hq / Hkv``
times over before SDPA reads it. So the backend also claims:

- an **in-place cache update**: ``index_copy(p, dim, index, src)`` whose ``p`` is a graph input that
  nothing else reads but the ``copy_(p, <this node>)`` writing the result back (the condition
  collage marks for eager too: ``torch_collage.rewrite.inplace_update_reason``). Compiled, it runs
  ``p.index_copy_(dim, index, src)`` on the user's tensor and returns ``p``; the ``copy_`` (on eager,
  the only backend that runs mutations) then copies ``p`` onto itself, which ``Tensor.copy_`` skips.
  The graph's result is the same; the write happens once, in place, touching ``index`` rows only.
  Collage measures and checks candidates on copies of the inputs a graph writes, so only the user's
  call writes the user's cache ([Note: inputs the graph writes] in torch_collage/freeze.py).
- a **repeat_kv chain** feeding a claimed attention node as its key or value: in a partition that
  holds the chain and the attention node, the kernel reads the chain's source ``[B, Hkv, L, D]``
  with grouped heads (head ``h`` reads KV head ``h // (Hq / Hkv)``, as ``repeat_kv`` lays them out)
  and the chain is never run. A partition holding part of a chain runs that part as ATen ops
  (correct, never faster; the search measures it and moves on). Collage itself removes such chains
  in front of SDPA before placing where the graph's shapes are static ([Note: rewrites before
  placing] in torch_collage/rewrite.py); the claim covers the graphs it leaves them in.
- the ``where`` that turns a boolean mask into the additive one SDPA's CPU lowering passes, where
  the attention node alone reads it. It runs as it is; claiming it keeps the attention's partition
  reachable by the cover search, which expands only candidates holding the lowest uncovered node:
  aot_autograd places that ``where`` after the ``repeat_kv`` chains, so a partition starting at the
  cache update but without the ``where`` would wait on a node that comes later in the order.
"""

from __future__ import annotations

import torch
from torch import fx

from torch_collage.backends.base import op_name
from torch_collage.rewrite import Shape, chain_source, inplace_update_reason, meta_shape, read_chain_sources

__all__ = [
    "chain_nodes",
    "chain_source",
    "collapse_chains",
    "inplace_targets",
    "inplace_update_reason",
    "is_chain_op",
    "is_inplace_update",
    "mask_user",
    "meta_shape",
    "run_in_place",
]

_INDEX_COPY = "aten.index_copy"
_WHERE = "aten.where"
_UNSQUEEZE, _EXPAND, _CLONE = "aten.unsqueeze", "aten.expand", "aten.clone"
_RESHAPES = ("aten._unsafe_view", "aten.view", "aten.reshape")
_CHAIN_OPS = (_UNSQUEEZE, _EXPAND, _CLONE, *_RESHAPES)


def is_chain_op(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in _CHAIN_OPS


def chain_nodes(node: fx.Node, shape: Shape = meta_shape) -> tuple[fx.Node, fx.Node] | None:
    """``(end, user)`` when ``node`` lies on a repeat_kv chain (see ``chain_source``) whose last node
    ``end`` is read by ``user`` alone; None otherwise."""
    end = node
    for _ in range(len(_CHAIN_OPS)):
        if not is_chain_op(end) or len(end.users) != 1:
            return None
        (user,) = end.users
        found = chain_source(end, shape)
        if found is not None and node in found[1]:
            return end, user
        end = user
    return None


def mask_user(node: fx.Node) -> fx.Node | None:
    """The attention node that alone reads ``node``, a ``where`` making an additive mask, as its
    ``attn_mask``; None otherwise."""
    if node.op != "call_function" or op_name(node) != _WHERE or len(node.users) != 1:
        return None
    (user,) = node.users
    mask = user.args[3] if len(user.args) > 3 else user.kwargs.get("attn_mask")
    return user if mask is node else None


def is_inplace_update(node: fx.Node) -> bool:
    return not inplace_update_reason(node)


def collapse_chains(graph: fx.Graph, attention: list[fx.Node], shape: Shape) -> None:
    """Points each attention node's key and value past their repeat_kv chains in ``graph`` at the
    chains' sources, where both have one (the kernel takes K and V alike), then drops the chains
    (they are read by nothing)."""
    for node in attention:
        read_chain_sources(node, shape)
    graph.eliminate_dead_code()


def inplace_targets(graph: fx.Graph) -> list[fx.Node]:
    """The ``index_copy`` nodes of a partition (each one claimed as an in-place update)."""
    return [n for n in graph.nodes if n.op == "call_function" and op_name(n) == _INDEX_COPY]


def run_in_place(node: fx.Node) -> None:
    """Makes ``index_copy(p, ...)`` run as ``p.index_copy_(...)`` (it returns ``p``)."""
    node.target = torch.ops.aten.index_copy_.default

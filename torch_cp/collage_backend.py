"""torch_cp's C++ decode-attention kernel as a Collage backend, placed like any user backend.

Registered through the ``torch_collage.backends`` entry point (pyproject.toml), so
``torch_collage.list_backends()`` lists ``torch_cp`` without importing this package by hand; listed
unavailable, with the reason, where ``torch_cp._C`` cannot be imported. It claims the attention
nodes whose result the kernel computes as SDPA does and compiles them to
``torch.ops.torch_cp.decode_attention``; beside them, a KV cache's update (run in place) and the
``repeat_kv`` chains feeding the attention (never run: the kernel reads the cache with grouped heads).
The measured placement decides what runs there. What it claims and why: [Note: attention nodes
torch_cp claims], and [Note: KV cache nodes torch_cp claims] in collage_kv.py.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from torch_collage.backends.base import BackendCompileError, BackendSpec, node_tensor_meta, op_name
from torch_cp import _ops, collage_kv

__all__ = ["NAME", "SPEC", "backend_spec", "unsupported_reason"]

NAME = "torch_cp"

# [Note: attention nodes torch_cp claims]
# The ATen attention ops of CPU inference graphs: ``aten.scaled_dot_product_attention`` (pre-dispatch
# graphs) and ``aten._scaled_dot_product_flash_attention_for_cpu`` (what aot_autograd lowers SDPA to on
# CPU: a bool mask arrives as an additive float one, GQA as fewer K/V heads). Claimed only where the
# kernel's result is SDPA's:
# - float32/bfloat16/float16 CPU tensors q [B, Hq, Sq, D], k and v [B, Hkv, L, D] (k and v alike),
#   Hq % Hkv == 0, static sizes >= 1; no dropout; ``scale`` any finite float;
# - ``attn_mask``: bool or q's dtype, broadcastable to [B, Hq, Sq, L] (a row that hides every key gives
#   0, as SDPA's CPU kernels do);
# - ``is_causal``: SDPA's is top-left aligned (query i sees keys j <= i) while torch_cp's default puts
#   the queries at the last Sq positions (they differ unless Sq == L); the compiled call passes
#   ``q_pos = 0``, which is SDPA's alignment for every Sq and L;
# - outputs: the flash op also returns a log-sum-exp in its own layout, which for a row with no
#   visible key is 0 there and -inf in torch_cp; a node whose log-sum-exp is used is not claimed
#   (inference graphs use only the output). The output keeps the node's strides.
# The CUDA variants (``_scaled_dot_product_flash_attention``, ``_efficient_attention``) are not
# claimed: this backend runs the CPU kernel.
_SDPA = "aten.scaled_dot_product_attention"
_FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu"
_CLAIMED = (_SDPA, _FLASH_CPU)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Call:
    """The arguments of an SDPA-like call, by name (fx Nodes at placement, tensors at run time)."""

    q: Any
    k: Any
    v: Any
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    """``args``/``kwargs`` of a call of ``target`` by the names of its schema, defaults filled in."""
    values = {a.name: a.default_value for a in target._schema.arguments if a.has_default_value()}
    values.update({a.name: x for a, x in zip(target._schema.arguments, args)})
    values.update(kwargs)
    return _Call(
        q=values["query"], k=values["key"], v=values["value"], attn_mask=values.get("attn_mask"),
        dropout_p=values.get("dropout_p", 0.0), is_causal=values.get("is_causal", False),
        scale=values.get("scale"), enable_gqa=values.get("enable_gqa", False),
    )  # fmt: skip


def _fake(arg: Any) -> torch.Tensor | None:
    vals = node_tensor_meta(arg) if isinstance(arg, fx.Node) else []
    return vals[0] if len(vals) == 1 else None


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride()))


def _tensor_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    if not all(t.dim() == 4 and t.device.type == "cpu" and _static(t) for t in (q, k, v)):
        return "q, k, v must be 4-D CPU tensors of static shape"
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: one of float32/bfloat16/float16, alike"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} are not [B,Hq,Sq,D], [B,Hkv,L,D] x2"
    if min(*q.shape, *k.shape) < 1 or q.shape[1] % k.shape[1]:
        return f"empty sizes or Hq not a multiple of Hkv: q {list(q.shape)}, k {list(k.shape)}"
    return ""


def _mask_reason(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> str:
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.device.type != "cpu" or not _static(mask) or mask.dim() > 4:
        return "attn_mask must be a static CPU tensor of at most 4 dims"
    if any(s not in (1, n) for s, n in zip(reversed(mask.shape), reversed(full))):
        return f"attn_mask {list(mask.shape)} is not broadcastable to {list(full)}"
    if mask.dtype not in (torch.bool, q.dtype):
        return f"attn_mask dtype {mask.dtype} is neither bool nor q's {q.dtype}"
    return ""


def _scalar_reason(call: _Call, op: str) -> str:
    if not isinstance(call.dropout_p, numbers.Real) or call.dropout_p != 0.0:
        return f"dropout_p must be 0, got {call.dropout_p!r}"
    if not isinstance(call.is_causal, bool) or not isinstance(call.enable_gqa, bool):
        return "is_causal and enable_gqa must be constants"
    if call.scale is not None and not (isinstance(call.scale, numbers.Real) and math.isfinite(call.scale)):
        return f"scale must be a finite constant, got {call.scale!r}"
    if op == _SDPA and call.is_causal and call.attn_mask is not None:
        return "SDPA refuses attn_mask with is_causal"
    return ""


def _outputs_reason(node: fx.Node) -> str:
    if op_name(node) == _SDPA:
        return ""
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return "an output other than the attention output (the log-sum-exp) is used"
    return ""


def unsupported_reason(node: fx.Node) -> str:
    """Why the ``torch_cp`` backend does not claim ``node`` ("" when it does); see
    [Note: attention nodes torch_cp claims]."""
    op = op_name(node)
    if node.op != "call_function" or op not in _CLAIMED:
        return f"{op} is not an attention op torch_cp claims ({', '.join(_CLAIMED)})"
    call = _bind(node.target, node.args, node.kwargs)
    q, k, v = _fake(call.q), _fake(call.k), _fake(call.v)
    if q is None or k is None or v is None:
        return "q, k, v have no tensor metadata"
    reason = _scalar_reason(call, op) or _tensor_reason(q, k, v) or _outputs_reason(node)
    if reason:
        return reason
    if op == _SDPA and q.shape[1] != k.shape[1] and not call.enable_gqa:
        return "Hq != Hkv without enable_gqa"
    if call.attn_mask is None:
        return ""
    mask = _fake(call.attn_mask)
    return "attn_mask has no tensor metadata" if mask is None else _mask_reason(mask, q, k)


def _supports(node: fx.Node) -> bool:
    if collage_kv.is_chain_op(node):  # [Note: KV cache nodes torch_cp claims]
        found = collage_kv.chain_nodes(node)
        return found is not None and not unsupported_reason(found[1])
    user = collage_kv.mask_user(node)
    if user is not None:
        return not unsupported_reason(user)
    return collage_kv.is_inplace_update(node) or not unsupported_reason(node)


# --- compile: each claimed node of the partition runs the kernel ----------------------------------
class _KernelCall:
    """Runs one claimed node with ``torch.ops.torch_cp.decode_attention``: takes the node's arguments
    and returns what it returns (``(out, lse)`` for the flash op, whose lse is unused), ``out`` in q's
    dtype with the node's strides."""

    def __init__(self, op: str, target: Any, out_stride: tuple[int, ...]) -> None:
        self.op, self.target, self.out_stride = op, target, out_stride
        self.__name__ = f"torch_cp_{op.rpartition('.')[2].lstrip('_')}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = _bind(self.target, args, kwargs)
        q = call.q
        scale = 1.0 / math.sqrt(q.shape[-1]) if call.scale is None else float(call.scale)  # as SDPA
        q_pos = torch.zeros(q.shape[0], dtype=torch.long) if call.is_causal else None  # SDPA's alignment
        out, lse = _ops.decode_attention_op(
            q, call.k, call.v, None, None, q_pos, scale, 0.0, call.is_causal, -1, 0, call.attn_mask
        )
        if out.dtype != q.dtype or out.stride() != self.out_stride:
            out = torch.empty_strided(out.shape, self.out_stride, dtype=q.dtype).copy_(out)
        return out if self.op == _SDPA else (out, lse)


class _FakeValues(fx.Interpreter):
    """Runs a graph on fake tensors and records each node's value (shapes and strides)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = result
        return result


def _fake_values(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, Any]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    interpreter = _FakeValues(gm)
    with mode:
        interpreter.run(*fakes)
    return interpreter.values


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in _CLAIMED


def _compile(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    """A copy of ``gm`` whose attention nodes call the kernel (reading the sources of the repeat_kv
    chains in the partition) and whose cache updates run in place; returns ``gm``'s tuple."""
    if not _ops.HAS_CPU_KERNELS:
        raise BackendCompileError(NAME, f"the C++ extension is not loaded: {_ops.extension_error()}")
    graph, copies = fx.Graph(), dict[fx.Node, fx.Node]()
    graph.output(graph.graph_copy(gm.graph, copies))
    nodes = [n for n in gm.graph.nodes if _is_attention(n)]
    try:
        fake = _fake_values(gm, tuple(example_inputs))
    except Exception as exc:  # the partition does not run on its example inputs' shapes
        raise BackendCompileError.from_exception(NAME, exc) from exc
    shapes = {copies[n]: tuple(v.shape) for n, v in fake.items() if isinstance(v, torch.Tensor)}
    collage_kv.collapse_chains(graph, [copies[n] for n in nodes], shapes.get)  # part of a chain: runs as is
    for node in nodes:
        out = fake[node] if isinstance(fake[node], torch.Tensor) else fake[node][0]
        copies[node].target = _KernelCall(op_name(node), node.target, tuple(out.stride()))
    for node in collage_kv.inplace_targets(graph):
        collage_kv.run_in_place(node)
    return fx.GraphModule(gm, graph)


# --- availability and version --------------------------------------------------------------------
def _available() -> tuple[bool, str]:
    if _ops.HAS_CPU_KERNELS:
        return True, ""
    return False, f"{_ops.extension_error()}; build it with `pip install --no-build-isolation -e .`"


@functools.cache
def _version() -> str:
    """torch, the package and the built extension's size and mtime (a rebuilt kernel is a new version)."""
    ok, reason = _available()
    if not ok:
        raise RuntimeError(reason)
    import torch_cp._C as ext

    stat = Path(str(ext.__file__)).stat()
    return (
        f"torch_cp {metadata.version('torch-collage')} (_C {stat.st_size} bytes, mtime {stat.st_mtime_ns}), "
        f"claims rev {_CLAIMS_REVISION}, torch {torch.__version__}"
    )


# What the compiled partitions compute for the nodes claimed; part of the version, so that costs
# cached for older claims are not reused. 2: KV cache updates in place, repeat_kv chains collapsed.
_CLAIMS_REVISION = 2

# The largest partition: an attention node, its mask's ``where``, the repeat_kv chains of its key and
# value (4 nodes each) and the updates of both caches.
_MAX_PARTITION = 12


def backend_spec() -> BackendSpec:
    """The ``torch_cp`` backend's spec (what the ``torch_collage.backends`` entry point loads)."""
    return BackendSpec(
        name=NAME,
        compile=_compile,
        supports=_supports,
        fusion="region",  # connected claimed nodes
        max_depth=_MAX_PARTITION,
        available=_available,
        version=_version,
        threads="torch",  # at::parallel_for: torch's intra-op pool
    )


SPEC = backend_spec()

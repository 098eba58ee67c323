"""CUTLASS through its Python interface (the ``nvidia-cutlass`` package): GEMM and 2-D convolution
kernels with fused epilogues, for the patterns it matches.

A candidate must be one *anchor* followed by an elementwise epilogue chain, each op consuming the
previous one's result and used by nothing else:

- anchors: ``aten.mm`` (``[M, K] @ [K, N]``), ``aten.addmm`` (bias, ``beta``, ``alpha``), ``aten.bmm``
  (``[b, M, K] @ [b, K, N]``), ``aten.convolution`` (2-D, not transposed, ``groups == 1``, with or
  without bias; NCHW in, run as NHWC);
- then any number of ``aten.add.Tensor`` with a tensor (a residual, a bias) or number that
  broadcasts to the anchor's output (``alpha`` scales it);
- then at most one activation, last: ``relu``, ``gelu`` (exact, erf form), ``sigmoid``, ``tanh``.

That is CUTLASS's linear-combination epilogue ``D = act(alpha * (A @ B) + beta * C)``: the additive
terms are summed (in torch) into ``C``. An activation before an add (``relu(x @ w) + r``) is not this
form and is not claimed. dtypes: float32 (run on CUDA cores, ``OpcodeClass.Simt``, so fp32 stays
fp32; ``allow_low_precision`` lets CUTLASS pick tensor cores, i.e. TF32), float16 and bfloat16
(tensor cores, float32 accumulation); float64 and integer ops are not claimed.

Compiled kernels are cached twice: one CUTLASS plan per (kind, dtype, activation, op class) per
process, and CUTLASS's own compilation cache (``compiled_cache.db``, in the working directory) across
processes. Costs include the Python interface's per-call overhead (it re-checks the arguments and
synchronises on every call), so the search only picks CUTLASS where it pays anyway. Operands are
made contiguous (row-major; channels-last for convolutions) before each call, and ``C`` is
materialised at full output size when the epilogue adds anything.

Needs ``nvidia-cutlass`` (``pip install torch-collage[gpu]``), ``nvcc`` and a CUDA device.
Unverified on a GPU so far.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Number
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from torch_collage.backends._gpu import (
    GPU_EXTRA_HINT,
    check_cuda_inputs,
    cuda_reason,
    dist_version,
    input_tensor_meta,
    on_cuda,
)
from torch_collage.backends.base import BackendCompileError, node_tensor_meta, op_name, runner_spec
from torch_collage.subgraph import fold_constants

__all__ = ["CUTLASS_PATTERNS", "SPEC", "CutlassBackend", "cutlass_claims"]

logger = logging.getLogger(__name__)

_NAME = "cutlass"
_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_ANCHORS = frozenset({"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution"})
_ACTIVATIONS = {"aten.relu": "relu", "aten.gelu": "gelu", "aten.sigmoid": "sigmoid", "aten.tanh": "tanh"}
_ADD = "aten.add"
_MAX_EPILOGUE = 3  # ops after the anchor that a claimed epilogue op may be away from it

# The chains the capability spec lists as patterns (the elementwise_epilogue fusion style finds the
# same ones by growing from each anchor; patterns document them and reach past max_depth).
CUTLASS_PATTERNS: tuple[tuple[str, ...], ...] = tuple(
    chain
    for anchor in ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution")
    for chain in (
        *((anchor, act) for act in _ACTIVATIONS),
        (anchor, _ADD),
        *((anchor, _ADD, act) for act in _ACTIVATIONS),
    )
)


# --- capability ---------------------------------------------------------------------------------------


def cutlass_claims(node: fx.Node) -> bool:
    """Capability of ``cutlass``: GEMM/convolution anchors it has kernels for, and the epilogue ops
    (add, relu, gelu, sigmoid, tanh) that directly follow such an anchor; all on CUDA, in
    float32/float16/bfloat16. Whether a whole candidate fits the epilogue form is decided when
    compiling (see the module docstring)."""
    if not on_cuda(node) or not _float_node(node):
        return False
    name = op_name(node)
    if name in _ANCHORS:
        return _anchor_ok(node)
    if name in _ACTIVATIONS or name == _ADD:
        return _epilogue_ok(node, _MAX_EPILOGUE)
    return False


def _float_node(node: fx.Node) -> bool:
    outs = node_tensor_meta(node)
    dtypes = {t.dtype for t in (*outs, *input_tensor_meta(node))}
    return bool(outs) and len(dtypes) == 1 and dtypes <= _DTYPES


def _rank(arg: Any) -> int | None:
    vals = node_tensor_meta(arg) if isinstance(arg, fx.Node) else []
    return vals[0].dim() if len(vals) == 1 else None


def _anchor_ok(node: fx.Node) -> bool:
    name, args = op_name(node), node.args
    if name == "aten.mm":
        return _rank(args[0]) == 2 and _rank(args[1]) == 2
    if name == "aten.addmm":
        return _rank(args[1]) == 2 and _rank(args[2]) == 2 and (_rank(args[0]) or 0) in (1, 2)
    if name == "aten.bmm":
        return _rank(args[0]) == 3 and _rank(args[1]) == 3
    if name == "aten.convolution":
        if len(args) < 9 or _rank(args[0]) != 4 or _rank(args[1]) != 4:
            return False
        stride, padding, dilation, transposed, _, groups = args[3:9]
        pairs = all(isinstance(p, (list, tuple)) and len(p) == 2 for p in (stride, padding, dilation))
        return bool(pairs and transposed is False and groups == 1)
    return False


def _epilogue_ok(node: fx.Node, depth: int) -> bool:
    """``node`` is an epilogue op whose chain input leads back to a claimable anchor within ``depth``
    ops, each link used only by the next."""
    if depth <= 0:
        return False
    chain = _chain_input(node)
    if chain is None or len(chain.users) != 1:
        return False
    if op_name(chain) in _ANCHORS:
        return _anchor_ok(chain) and _float_node(chain)
    return op_name(chain) == _ADD and _epilogue_ok(chain, depth - 1)


def _chain_input(node: fx.Node) -> fx.Node | None:
    """The operand of epilogue op ``node`` that carries the anchor's result (the op's form checked)."""
    name = op_name(node)
    if name in _ACTIVATIONS:
        if len(node.args) != 1 or (name == "aten.gelu" and node.kwargs.get("approximate", "none") != "none"):
            return None
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if name == _ADD and node.target is torch.ops.aten.add.Tensor and len(node.args) == 2:
        x, y = node.args
        producers = [a for a in (x, y) if isinstance(a, fx.Node) and op_name(a) in (*_ANCHORS, _ADD)]
        if not producers:
            return None
        chain = producers[0]
        if chain is y and node.kwargs.get("alpha", 1) != 1:
            return None  # alpha would scale the anchor's result: not the epilogue form
        out, ins = node_tensor_meta(node), node_tensor_meta(chain)
        if not out or not ins or out[0].shape != ins[0].shape:
            return None  # the other operand must broadcast to the anchor's output, not widen it
        return chain
    return None


# --- the fused form of a candidate ----------------------------------------------------------------------


@dataclass
class _Fused:
    """``D = act(alpha * (A @ B) + sum(scale * term))`` read off a candidate's graph."""

    kind: str  # "gemm", "bmm" or "conv"
    a: fx.Node
    b: fx.Node
    alpha: float = 1.0
    terms: list[tuple[Any, float]] = field(default_factory=list)  # (node or number, scale)
    activation: str | None = None
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None  # stride, padding, dilation
    conv_bias: fx.Node | None = None
    tuple_output: bool = True


def match_fused(gm: fx.GraphModule) -> _Fused:
    """The fused form of ``gm``, or ``BackendCompileError`` naming the op that does not fit it."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    if not calls:
        raise BackendCompileError(_NAME, "the candidate has no op")
    anchor = calls[0]
    if op_name(anchor) not in _ANCHORS:
        raise BackendCompileError(
            _NAME, "a CUTLASS candidate must start with mm, addmm, bmm or convolution", op=str(anchor.target)
        )
    fused = _anchor_form(anchor)
    chain = anchor
    for node in calls[1:]:
        if len(chain.users) != 1 or node not in chain.users:
            raise BackendCompileError(
                _NAME, "each op must consume only the previous op's result", op=str(node.target)
            )
        name = op_name(node)
        if fused.activation is not None:
            raise BackendCompileError(_NAME, "the activation must be the last op", op=str(node.target))
        if name in _ACTIVATIONS and _chain_args_ok(node, chain):
            fused.activation = _ACTIVATIONS[name]
        elif name == _ADD and node.target is torch.ops.aten.add.Tensor and len(node.args) == 2:
            fused.terms.append(_add_term(node, chain))
        else:
            raise BackendCompileError(_NAME, "not an epilogue CUTLASS can fuse", op=str(node.target))
        chain = node
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = list(output) if isinstance(output, (list, tuple)) else [output]
    if outs != [chain]:
        raise BackendCompileError(_NAME, "only the last op's result may leave a CUTLASS candidate")
    fused.tuple_output = isinstance(output, (list, tuple))
    return fused


def _anchor_form(anchor: fx.Node) -> _Fused:
    name, args, kwargs = op_name(anchor), anchor.args, anchor.kwargs
    if name in ("aten.mm", "aten.bmm"):
        return _Fused("gemm" if name == "aten.mm" else "bmm", _operand(args[0]), _operand(args[1]))
    if name == "aten.addmm":
        fused = _Fused("gemm", _operand(args[1]), _operand(args[2]), alpha=_scalar(kwargs.get("alpha", 1)))
        fused.terms.append((_operand(args[0]), _scalar(kwargs.get("beta", 1))))
        return fused
    stride, padding, dilation, transposed, _, groups = args[3:9]
    if transposed or groups != 1:
        raise BackendCompileError(
            _NAME, "only 2-D, non-transposed, groups=1 convolutions", op=str(anchor.target)
        )
    fused = _Fused("conv", _operand(args[0]), _operand(args[1]))
    fused.conv = (_pair(stride), _pair(padding), _pair(dilation))
    fused.conv_bias = _operand(args[2]) if args[2] is not None else None
    return fused


def _scalar(value: Any) -> float:
    if not isinstance(value, Number) or isinstance(value, complex):
        raise BackendCompileError(_NAME, f"alpha/beta must be real numbers, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise BackendCompileError(_NAME, f"convolution stride/padding/dilation must be 2 ints, got {value!r}")
    return int(value[0]), int(value[1])


def _operand(arg: Any) -> fx.Node:
    if not isinstance(arg, fx.Node) or arg.op not in ("placeholder", "get_attr"):
        raise BackendCompileError(_NAME, f"operand {arg} must be an input of the candidate")
    return arg


def _chain_args_ok(node: fx.Node, chain: fx.Node) -> bool:
    gelu_exact = op_name(node) != "aten.gelu" or node.kwargs.get("approximate", "none") == "none"
    return node.args == (chain,) and gelu_exact


def _add_term(node: fx.Node, chain: fx.Node) -> tuple[Any, float]:
    x, y = node.args
    alpha = _scalar(node.kwargs.get("alpha", 1))
    if x is chain and y is not chain:
        other, scale = y, alpha
    elif y is chain and x is not chain and alpha == 1:
        other, scale = x, 1.0
    else:
        raise BackendCompileError(
            _NAME, "an add must take the previous result once, unscaled", op=str(node.target)
        )
    if isinstance(other, fx.Node):
        _operand(other)
    elif not isinstance(other, Number):
        raise BackendCompileError(_NAME, f"cannot add {type(other).__name__}", op=str(node.target))
    return other, scale


# --- the backend -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CutlassBackend:
    """CUTLASS GEMM / convolution kernels with the candidate's epilogue fused, inference only.

    The callable takes CUDA tensors of the example inputs' shapes and dtypes and returns what the
    candidate returns (a convolution's output is a channels-last NCHW tensor).
    """

    allow_low_precision: bool = False  # float32 on tensor cores (TF32) when True; CUDA cores otherwise

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        if dist_version("nvidia-cutlass") == "unknown" or importlib.util.find_spec("cutlass_library") is None:
            return False, f"nvidia-cutlass is not installed ({GPU_EXTRA_HINT})"
        reason = cuda_reason()
        if reason:
            return False, reason
        if not (shutil.which("nvcc") or os.environ.get("CUDA_INSTALL_PATH") or os.environ.get("CUDA_HOME")):
            return (
                False,
                "nvcc not found (CUTLASS compiles its kernels with it): put it on PATH or set CUDA_INSTALL_PATH",
            )
        return True, ""

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        return (
            f"nvidia-cutlass {dist_version('nvidia-cutlass')} (torch {torch.__version__}, "
            f"{'tf32' if self.allow_low_precision else 'fp32'})"
        )

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        start = time.perf_counter()
        check_cuda_inputs(_NAME, example_inputs)
        if not isinstance(module, fx.GraphModule):
            raise BackendCompileError(
                _NAME, f"takes ATen graphs (fx.GraphModule), got {type(module).__name__}"
            )
        module = fold_constants(module)  # t(W) in front of addmm: a constant B, as CUTLASS takes it
        fused = match_fused(module)
        dtype = _dtype(module, fused, example_inputs)
        try:
            plan = _plan(fused.kind, dtype, fused.activation, exact=not self.allow_low_precision)
            runner = _CutlassRunner(module, fused, plan, len(example_inputs))
            runner(*example_inputs)  # warm-up: CUTLASS emits and compiles the kernel on its first run
        except BackendCompileError:
            raise
        except Exception as exc:
            anchor = next(n for n in module.graph.nodes if n.op == "call_function")
            raise BackendCompileError(
                _NAME, f"{type(exc).__name__}: {exc}"[:300], op=str(anchor.target)
            ) from exc
        logger.debug("%s: compiled %s in %.2f s", _NAME, fused.kind, time.perf_counter() - start)
        return runner


def _dtype(gm: fx.GraphModule, fused: _Fused, example_inputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The one dtype of A, B and every tensor term (mixed dtypes would need type promotion)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {node: example_inputs[i] for i, node in enumerate(placeholders)}
    nodes = [fused.a, fused.b, *(t for t, _ in fused.terms if isinstance(t, fx.Node))]
    if fused.conv_bias is not None:
        nodes.append(fused.conv_bias)
    dtypes = {(values[n] if n.op == "placeholder" else _attr(gm, n)).dtype for n in nodes}
    if len(dtypes) != 1 or not dtypes <= _DTYPES:
        raise BackendCompileError(_NAME, f"operands must share one of float32/float16/bfloat16, got {dtypes}")
    return dtypes.pop()


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


# --- CUTLASS plans ---------------------------------------------------------------------------------------

_PLANS: dict[tuple[str, torch.dtype, str | None, bool], Any] = {}
_PLANS_LOCK = threading.Lock()


def _cutlass() -> ModuleType:
    """CUTLASS's Python interface: ``cutlass_cppgen`` (CUTLASS 4) or ``cutlass`` (CUTLASS 3)."""
    try:
        import cutlass_cppgen as cl
    except ImportError:
        import cutlass as cl
    if not hasattr(cl, "op"):
        raise BackendCompileError(
            _NAME, f"{cl.__name__} has no Python interface (cutlass.op); is it CuTe DSL?"
        )
    return cl


def _plan(kind: str, dtype: torch.dtype, activation: str | None, *, exact: bool) -> Any:
    """One CUTLASS plan per (kind, dtype, activation, op class) per process."""
    key = (kind, dtype, activation, exact)
    with _PLANS_LOCK:
        if key in _PLANS:
            return _PLANS[key]
        cl = _cutlass()
        if kind == "conv":
            plan = cl.op.Conv2d(kind="fprop", element=dtype, element_accumulator=torch.float32)
        else:
            plan = cl.op.Gemm(element=dtype, layout=cl.LayoutType.RowMajor, element_accumulator=torch.float32)
        if exact and dtype == torch.float32:
            plan.opclass = cl.OpcodeClass.Simt  # no TF32: fp32 products on CUDA cores
        if activation is not None:
            plan.activation = getattr(cl.epilogue, activation)
        _PLANS[key] = plan
        return plan


class _CutlassRunner:
    """Runs one fused candidate: gathers A, B and the epilogue terms, calls the plan, returns D."""

    def __init__(self, gm: fx.GraphModule, fused: _Fused, plan: Any, n_inputs: int) -> None:
        self._fused = fused
        self._plan = plan
        self._n_inputs = n_inputs
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._index = {node: i for i, node in enumerate(placeholders)}
        self._consts = {n: _attr(gm, n) for n in gm.graph.nodes if n.op == "get_attr"}

    def _value(self, arg: Any, args: Sequence[torch.Tensor]) -> Any:
        if isinstance(arg, fx.Node):
            return args[self._index[arg]] if arg in self._index else self._consts[arg]
        return arg

    def __call__(self, *args: torch.Tensor) -> Any:
        if len(args) != self._n_inputs:
            raise ValueError(f"expected {self._n_inputs} input tensors, got {len(args)}")
        f = self._fused
        a, b = self._value(f.a, args), self._value(f.b, args)
        terms = [(self._value(t, args), s) for t, s in f.terms]
        if f.kind == "conv" and f.conv_bias is not None:
            bias = self._value(f.conv_bias, args)
            terms.insert(0, (bias.view(1, -1, 1, 1), 1.0))  # per output channel
        d = self._run_conv(a, b, terms) if f.kind == "conv" else self._run_gemm(a, b, terms)
        return (d,) if f.tuple_output else d

    def _run_gemm(self, a: torch.Tensor, b: torch.Tensor, terms: list[tuple[Any, float]]) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        shape = (*a.shape[:-1], b.shape[-1])
        d = torch.empty(shape, dtype=a.dtype, device=a.device)
        c = _sum_terms(terms, shape, a, torch.contiguous_format)
        self._plan.run(
            a, b, d if c is None else c, d, alpha=self._fused.alpha, beta=0.0 if c is None else 1.0
        )
        return d

    def _run_conv(self, x: torch.Tensor, w: torch.Tensor, terms: list[tuple[Any, float]]) -> torch.Tensor:
        f = self._fused
        assert f.conv is not None
        stride, padding, dilation = f.conv
        x = x.contiguous(memory_format=torch.channels_last)  # CUTLASS convolutions read NHWC memory
        w = w.contiguous(memory_format=torch.channels_last)
        n, _, h, wd = x.shape
        k, _, r, s = w.shape
        p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
        q = (wd + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
        shape = (n, k, p, q)
        d = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        c = _sum_terms(terms, shape, x, torch.channels_last)
        self._plan.run(
            x, w, c, d, stride=stride, padding=padding, dilation=dilation,
            alpha=f.alpha, beta=0.0 if c is None else 1.0,
        )  # fmt: skip
        return d

    def __repr__(self) -> str:
        f = self._fused
        return f"<cutlass runner: {f.kind}, {len(f.terms)} added terms, activation {f.activation}>"


def _sum_terms(
    terms: list[tuple[Any, float]],
    shape: Sequence[int],
    like: torch.Tensor,
    memory_format: torch.memory_format,
) -> torch.Tensor | None:
    """``sum(scale * term)`` broadcast to ``shape`` and materialised (CUTLASS reads C densely), or None."""
    if not terms:
        return None
    total: Any = 0
    for term, scale in terms:
        total = total + (term if scale == 1 else term * scale)
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
    out.copy_(torch.as_tensor(total, dtype=like.dtype, device=like.device).expand(shape))
    return out


SPEC = runner_spec(
    _NAME,
    CutlassBackend,
    supports=cutlass_claims,
    fusion="elementwise_epilogue",
    patterns=CUTLASS_PATTERNS,
    max_depth=4,
)

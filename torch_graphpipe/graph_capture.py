"""Graph capture: trace a module with ``torch.fx`` at leaf-module granularity into an :class:`OpGraph`.

Leaf modules are those of ``torch.nn`` (``Linear``, ``Conv2d``, ``ReLU``, ...) plus any module types
the caller names; containers and user modules are traced through. Model inputs (placeholders) and
parameter reads (``get_attr``) are not operators of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from collections.abc import Sequence

import torch
import torch.fx as fx

from torch_graphpipe.graph import OpGraph, OpKind, OpNode

__all__ = ["CapturedGraph", "GraphCaptureError", "capture"]

log = logging.getLogger(__name__)


class GraphCaptureError(ValueError):
    """The model could not be traced into an operator graph."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapturedGraph:
    """A traced module and the operator DAG read from it."""

    graph_module: fx.GraphModule  # the traced module (runs the whole model)
    graph: OpGraph  # compute operators in topological order


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def capture(module: torch.nn.Module, leaf_modules: Sequence[type] = ()) -> CapturedGraph:
    """Trace ``module`` symbolically; raise :class:`GraphCaptureError` naming the cause if it cannot."""
    tracer = _LeafTracer(tuple(leaf_modules))
    try:
        fx_graph = tracer.trace(module)
    except Exception as exc:  # FX raises many types; all mean "not traceable"
        raise GraphCaptureError(_describe_failure(module, exc)) from exc
    gm = fx.GraphModule(tracer.root, fx_graph, module.__class__.__name__)
    graph = _to_op_graph(gm)
    if len(graph) == 0:
        raise GraphCaptureError(f"{type(module).__name__} has no operators to partition")
    log.debug("captured %s: %d operators", type(module).__name__, len(graph))
    return CapturedGraph(graph_module=gm, graph=graph)


def _describe_failure(module: torch.nn.Module, exc: Exception) -> str:
    where = ""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not frame.filename.startswith(torch_dir):
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
            break
    return (
        f"cannot trace {type(module).__name__} with torch.fx{where}: {type(exc).__name__}: {exc}. "
        "Data-dependent control flow and Python calls on tensor values are not traceable; "
        "mark the offending submodule as a leaf (leaf_modules=) or rewrite it."
    )


def _to_op_graph(gm: fx.GraphModule) -> OpGraph:
    compute: dict[str, OpNode] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = tuple(dict.fromkeys(a.name for a in node.all_input_nodes if a.name in compute))
        compute[node.name] = OpNode(
            name=node.name, kind=_kind(node), target=_target_name(node), inputs=inputs
        )
    output_names = _output_names(gm, compute)
    nodes = [dataclasses.replace(n, is_output=n.name in output_names) for n in compute.values()]
    return OpGraph(nodes)


_KINDS: dict[str, OpKind] = {"call_module": "module", "call_function": "function", "call_method": "method"}


def _kind(node: fx.Node) -> OpKind:
    return _KINDS[node.op]


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", repr(node.target))
    return f"{module}.{name}" if module else name


def _output_names(gm: fx.GraphModule, compute: dict[str, OpNode]) -> set[str]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return {a.name for a in out.all_input_nodes if a.name in compute}

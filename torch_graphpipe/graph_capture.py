"""Graph capture: a module's operator graph as an :class:`OpGraph`, by symbolic tracing or ``torch.export``.

``method="fx"`` traces with ``torch.fx`` at leaf-module granularity: leaf modules are those of
``torch.nn`` (``Linear``, ``Conv2d``, ``ReLU``, ...) plus any module types the caller names;
containers and user modules are traced through. ``method="export"`` captures ATen operators with
``torch.export`` (non-strict; see [Note: export capture] in torch_graphpipe/graph_export.py), which
follows Python control flow that symbolic tracing cannot (Hugging Face models). ``"auto"`` (the
default) traces, and exports when tracing fails and example inputs are given. Model inputs
(placeholders) and parameter reads (``get_attr``) are not operators of their own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx as fx

from torch_graphpipe.graph import OpGraph, OpKind, OpNode
from torch_graphpipe.graph_export import export_graph_module, user_frame

__all__ = ["CaptureMethod", "CapturedGraph", "GraphCaptureError", "capture"]

CaptureMethod = Literal["auto", "fx", "export"]

log = logging.getLogger(__name__)


class GraphCaptureError(ValueError):
    """The model could not be traced into an operator graph."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapturedGraph:
    """A traced module and the operator DAG read from it."""

    graph_module: fx.GraphModule  # the traced module (runs the whole model)
    graph: OpGraph  # compute operators in topological order
    method: Literal["fx", "export"] = "fx"  # how it was captured


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def capture(
    module: torch.nn.Module,
    leaf_modules: Sequence[type] = (),
    example_inputs: Sequence[Any] | None = None,
    method: CaptureMethod = "auto",
) -> CapturedGraph:
    """Capture ``module``'s operator graph (see the module docstring); raise :class:`GraphCaptureError`
    naming the construct and the line when it cannot be captured. ``example_inputs`` (one micro-batch)
    are needed by ``method="export"`` and let ``"auto"`` fall back to it."""
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"capture method must be 'auto', 'fx' or 'export', got {method!r}")
    if method == "export" and example_inputs is None:
        raise ValueError("capture method 'export' needs example_inputs")
    if method == "export":
        return _export(module, example_inputs, None)
    try:
        return _trace(module, leaf_modules)
    except GraphCaptureError as exc:
        if method == "fx" or example_inputs is None:
            raise
        log.info("symbolic tracing failed (%s); capturing with torch.export", exc)
        return _export(module, example_inputs, exc)


def _trace(module: torch.nn.Module, leaf_modules: Sequence[type]) -> CapturedGraph:
    tracer = _LeafTracer(tuple(leaf_modules))
    try:
        fx_graph = tracer.trace(module)
    except Exception as exc:  # FX raises many types; all mean "not traceable"
        raise GraphCaptureError(_describe_failure(module, exc)) from exc
    gm = fx.GraphModule(tracer.root, fx_graph, module.__class__.__name__)
    return _captured(module, gm, "fx")


def _export(module: torch.nn.Module, example_inputs: Any, traced: GraphCaptureError | None) -> CapturedGraph:
    try:
        gm = export_graph_module(module, tuple(example_inputs))
    except Exception as exc:  # torch.export raises many types; all mean "not capturable"
        first = f"{traced}; then " if traced is not None else ""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Cache" in detail and "not a known type" in detail:  # transformers' KV cache in the output
            detail += (
                " (a Hugging Face model returns its KV cache: build it with use_cache=False to train it)"
            )
        raise GraphCaptureError(
            f"{first}cannot capture {type(module).__name__} with torch.export (non-strict){user_frame(exc)}: "
            f"{type(exc).__name__}: {detail}. Python control flow on tensor values (if / while on a "
            "tensor, .item(), data-dependent shapes) cannot be captured: rewrite it with torch.where / "
            "torch.cond, or keep it outside the model"
        ) from exc
    return _captured(module, gm, "export")


def _captured(module: torch.nn.Module, gm: fx.GraphModule, method: Literal["fx", "export"]) -> CapturedGraph:
    graph = _to_op_graph(gm)
    if len(graph) == 0:
        raise GraphCaptureError(f"{type(module).__name__} has no operators to partition")
    log.debug("captured %s with %s: %d operators", type(module).__name__, method, len(graph))
    return CapturedGraph(graph_module=gm, graph=graph, method=method)


def _describe_failure(module: torch.nn.Module, exc: Exception) -> str:
    return (
        f"cannot trace {type(module).__name__} with torch.fx{user_frame(exc)}: {type(exc).__name__}: {exc}. "
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

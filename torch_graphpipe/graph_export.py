"""Capture through ``torch.export`` (non-strict): the graph of models symbolic tracing cannot follow.

[Note: export capture]
``torch.export.export(model, example_inputs, strict=False)`` runs the model's Python once on fake
tensors, so Python control flow on anything but tensor values (config flags, shapes, ``None``
checks: what Hugging Face models are full of) simply runs; only control flow on tensor *values*
fails, and the error names the line. The batch dimension of every tensor input is exported as
``Dim.AUTO`` (dynamic unless the model fixes it). The result is flattened into one FX graph of ATen
operators (``ep.module()``): parameters and buffers are ``get_attr`` nodes under the model's own
qualified names (so stage ``state_dict`` keys are the model's) and share the model's tensors, the
inputs are the flat positional tensors, and a last ``tree_unflatten`` operator rebuilds the model's
output structure (a ``ModelOutput``, a dict) from the flat outputs, so ``loss_fn`` gets what the model
returns. Differences from symbolic tracing: operators are ATen ops, not leaf modules (``leaf_modules``
and explicit partitions by module name do not apply), and the graph is specialised to the training
mode at capture time (dropout and BatchNorm behave as in that mode; ``eval()`` does not change them).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["OUT_SPEC_ATTR", "export_graph_module", "user_frame"]

OUT_SPEC_ATTR = "_graphpipe_out_spec"  # attribute holding the output's pytree structure


def user_frame(exc: BaseException) -> str:
    """`` at file.py:LINE `code` `` for the innermost frame of the traceback outside torch and this
    package (the model's line), or ``""``."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__), "<")
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not frame.filename.startswith(skip):
            return f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
    return ""


def export_graph_module(module: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The model's ATen graph (see [Note: export capture]); raises what ``torch.export`` raises."""
    args = tuple(example_inputs)
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in args
    )
    ep = torch.export.export(module, args, strict=False, dynamic_shapes=dynamic)
    unlifted = ep.module()
    return _plain_graph_module(unlifted, ep.call_spec.out_spec)


def _plain_graph_module(gm: fx.GraphModule, out_spec: pytree.TreeSpec | None) -> fx.GraphModule:
    """``gm`` with the default calling convention (flat positional inputs) and, unless the output is
    a flat tuple, a ``tree_unflatten`` operator that rebuilds it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, t in [*gm.named_parameters(recurse=False), *gm.named_buffers(recurse=False)]:
        setattr(root, name, t)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
            setattr(root, node.target, getattr(gm, node.target))
    if out_spec is not None and out_spec.is_leaf() and len(flat) == 1:
        graph.output(flat[0])
    elif out_spec is None or _is_flat_tuple(out_spec, len(flat)):
        graph.output(tuple(flat) if isinstance(out, (tuple, list)) else out)
    else:
        setattr(root, OUT_SPEC_ATTR, out_spec)
        spec = graph.get_attr(OUT_SPEC_ATTR)
        graph.output(graph.call_function(pytree.tree_unflatten, (flat, spec)))
    graph.lint()
    return fx.GraphModule(root, graph, type(gm).__name__)


def _is_flat_tuple(spec: pytree.TreeSpec, n: int) -> bool:
    return spec.type is tuple and spec.num_children == n and all(c.is_leaf() for c in spec.children_specs)

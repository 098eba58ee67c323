"""A backward in two passes: input gradients now, weight gradients later (``B`` and ``W``).

[Note: split backward]
``backward_input`` computes the gradients of a stage's inputs (``torch.autograd.grad``, keeping the
graph) and, on the way, records the gradients arriving at the autograd nodes where the weights'
subgraphs meet the inputs' (torch.distributed.pipelining's ``get_param_groups``, the mechanism of its
own zero-bubble schedules). The returned function, run later, backpropagates those recorded
gradients into the weights only (``stage_backward_weight``): the part of the backward that both
need runs once, so ``B`` and ``W`` together cost one backward. That mechanism misses the outputs
that no input reaches (on a stage DAG, those computed from model inputs only; every output of a source
stage): from those the later function runs an ordinary backward into the weights (``inputs=``),
through nodes no input gradient went through. Gradients are accumulated
into ``.grad`` as ``torch.autograd.backward`` does, so a step's gradients are the unsplit ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.graph import Node
from torch.distributed.pipelining._backward import (
    _get_grad_fn_or_grad_acc,
    construct_reverse_graph,
    get_param_groups,
    reverse_closure,
    stage_backward_weight,
)

__all__ = ["backward_input"]


def backward_input(
    roots: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> Callable[[], None]:
    """Add the gradients of ``roots`` (weighted by ``grads``) to ``inputs[i].grad`` now; return the
    function that adds them to the ``params``' ``.grad``. See [Note: split backward]."""
    inputs = [x for x in inputs if x.requires_grad]
    params = [p for p in params if p.requires_grad]
    pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
    if not pairs or (not params and not inputs):
        return _nothing
    input_nodes = [_node(x) for x in inputs]
    reverse = construct_reverse_graph([_node(r) for r, _ in pairs])
    closure, _ = reverse_closure(input_nodes, set(), reverse)  # every node an input's gradient needs
    dependent = [(r, g) for r, g in pairs if _node(r) in closure]
    independent = [(r, g) for r, g in pairs if _node(r) not in closure]
    weight_nodes = [_node(p) for p in params]
    groups = get_param_groups(input_nodes, weight_nodes, reverse) if dependent else []
    for group in groups:
        group["intermediates"] = list(group["intermediates"])  # one order for the hooks and for W
    handles = [
        node.register_prehook(_recorder(group, i))
        for group in groups
        for i, node in enumerate(group["intermediates"])
    ]
    try:
        if dependent:
            roots_in, grads_in = zip(*dependent)
            dinputs = torch.autograd.grad(roots_in, inputs, grads_in, retain_graph=True, allow_unused=True)
            for x, g in zip(inputs, dinputs):
                if g is not None:
                    x.grad = g if x.grad is None else x.grad + g
    finally:
        for handle in handles:
            handle.remove()
    unreached = [p for group in groups if "grads" not in group for p in group["params"]]
    groups = [group for group in groups if "grads" in group]
    rest = [p for p, node in zip(params, weight_nodes) if node in set(unreached)]

    def weights() -> None:
        if independent:  # outputs no input reaches: see [Note: split backward]
            r, g = zip(*independent)
            torch.autograd.backward(r, g, inputs=params, retain_graph=bool(groups or rest))
        if rest:
            r, g = zip(*dependent)
            torch.autograd.backward(r, g, inputs=rest, retain_graph=bool(groups))
        if groups:
            stage_backward_weight(iter(params), groups)

    return weights


def _recorder(group: dict, i: int) -> Callable[..., None]:
    def hook(grad_inputs: tuple[torch.Tensor | None, ...]) -> None:
        group.setdefault("grads", [None] * len(group["intermediates"]))[i] = grad_inputs

    return hook


def _node(t: torch.Tensor) -> Node:
    """The autograd node of ``t``: its ``grad_fn``, or a leaf's gradient accumulator."""
    node = _get_grad_fn_or_grad_acc(t)
    assert node is not None, "a tensor that requires grad has an autograd node"
    return node


def _nothing() -> None:
    return None

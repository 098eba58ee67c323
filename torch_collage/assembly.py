"""Assembly: run a placed graph as a sequence of compiled partitions.

Each partition was cut out of the graph as a submodule (``subgraph.extract``) and compiled by its
backend; the assembled callable feeds each one the values it needs, in execution order, and returns
what the original graph returns. Executing a placement is deliberately this thin loop: the placement
itself is data (``search.Placement``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from torch_collage.freeze import fetch_attr, items_getter
from torch_collage.subgraph import Subgraph

__all__ = ["AssembledGraph", "Step"]


@dataclass(frozen=True)
class Step:
    """One partition: its compiled callable and where its inputs come from and outputs go."""

    backend: str
    fn: Callable[..., Any]
    subgraph: Subgraph


class AssembledGraph:
    """Calls ``steps`` in order over a list of value slots; returns like ``gm`` does.

    [Note: assembled call path]
    Every call of a compiled model runs this loop, so everything that does not depend on the call's
    inputs is worked out once: each node's slot, the constants' values, each step's input and output
    slots. A call copies the slot template, drops in the arguments, and runs the steps. (A dict from
    nodes to values rebuilt per call, with 80 frozen constants in it, cost more than OpenVINO's own
    call overhead on small models.)
    """

    def __init__(self, gm: fx.GraphModule, steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)
        slot: dict[fx.Node, int] = {}
        template: list[Any] = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                slot[node] = len(template)
                template.append(None)
        self._num_args = len(template)
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                slot[node] = len(template)
                template.append(fetch_attr(gm, str(node.target)))
        program = []
        consumed = {n for step in self.steps for n in step.subgraph.inputs}
        for step in self.steps:
            ins = tuple(slot[n] for n in step.subgraph.inputs)
            for node in step.subgraph.outputs:
                slot[node] = len(template)
                template.append(None)
            restride = () if step.backend == "eager" else _eager_strides(step.subgraph.outputs, consumed)
            program.append((step.fn, ins, tuple(slot[n] for n in step.subgraph.outputs), restride))
        self._template, self._program, self._slot = template, tuple(program), slot
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self._output = output
        flat = isinstance(output, (tuple, list)) and all(isinstance(o, fx.Node) for o in output)
        self._flat_output: tuple[int, ...] | None = tuple(slot[o] for o in output) if flat else None
        self._output_is_tuple = isinstance(output, tuple)
        self._direct = self._direct_call()

    def _direct_call(self) -> tuple[Callable[..., Any], Callable[[Sequence[Any]], Sequence[Any]]] | None:
        """For one step that takes the graph's inputs as they come and makes every output: its
        callable and a getter of the graph's outputs from the step's results. Else None."""
        if len(self._program) != 1 or self._flat_output is None:
            return None
        fn, ins, outs, restride = self._program[0]
        if restride or ins != tuple(range(self._num_args)) or not set(self._flat_output) <= set(outs):
            return None
        return fn, items_getter([outs.index(i) for i in self._flat_output])

    def __call__(self, *args: Any) -> Any:
        if len(args) != self._num_args:
            raise TypeError(f"expected {self._num_args} inputs, got {len(args)}")
        if self._direct is not None:  # a whole graph on one backend: no slots to fill
            fn, pick = self._direct
            result = fn(*args)
            if not isinstance(result, (tuple, list)):
                result = (result,)
            got = pick(result)
            return tuple(got) if self._output_is_tuple else list(got)
        values = self._template.copy()
        values[: self._num_args] = args
        for fn, ins, outs, restride in self._program:
            result = fn(*[values[i] for i in ins])
            if not isinstance(result, (tuple, list)):
                result = (result,)
            for i, value in zip(outs, result):
                values[i] = value
            for k, stride in restride:  # [Note: strides at partition boundaries]
                value = values[outs[k]]
                if value.stride() != stride and _layout_differs(value, stride):
                    values[outs[k]] = torch.empty_strided(
                        value.shape, stride, dtype=value.dtype, device=value.device
                    ).copy_(value)
        if self._flat_output is not None:
            got = [values[i] for i in self._flat_output]
            return tuple(got) if self._output_is_tuple else got
        return fx.node.map_arg(self._output, lambda n: values[self._slot[n]])

    def __repr__(self) -> str:
        return "AssembledGraph(" + " -> ".join(s.backend for s in self.steps) + ")"


def _layout_differs(value: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether ``value``'s strides differ from ``stride`` in a dimension of size > 1."""
    return any(n > 1 and a != b for n, a, b in zip(value.shape, value.stride(), stride))


# [Note: strides at partition boundaries]
# An ATen graph relies on the strides eager gives its values: ``transpose`` then ``view`` is valid
# only on the layout eager produced, and Inductor asserts its inputs' strides. A runtime partition
# (ONNX Runtime, OpenVINO) returns contiguous outputs, so in a mixed placement a later partition
# got a layout the graph was not traced for: Llama's decode graph with OpenVINO beside eager failed
# in ``view`` ("view size is not compatible with input tensor's size and stride"). So each output
# of a non-eager partition that a later partition reads is given eager's strides (from the graph's
# traced values) when it comes back with others: a copy, only where the layouts differ, checked by
# a tuple comparison per value and call. Sizes that are symbolic leave strides unknown; those
# values are passed on as they come.
def _eager_strides(
    outputs: Sequence[fx.Node], consumed: set[fx.Node]
) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(position in ``outputs``, eager's strides) of each output read by a later partition whose
    traced value has concrete strides and more than one element."""
    found = []
    for k, node in enumerate(outputs):
        val = node.meta.get("val")
        if node not in consumed or not isinstance(val, torch.Tensor):
            continue
        stride = val.stride()
        concrete = all(isinstance(x, int) for x in (*stride, *val.shape))
        expanded = any(st == 0 and n > 1 for st, n in zip(stride, val.shape))
        if concrete and not expanded and val.numel() > 1:
            found.append((k, tuple(int(x) for x in stride)))
    return tuple(found)

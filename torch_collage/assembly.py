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

from torch import fx

from torch_collage.subgraph import Subgraph

__all__ = ["AssembledGraph", "Step"]


@dataclass(frozen=True)
class Step:
    """One partition: its compiled callable and where its inputs come from and outputs go."""

    backend: str
    fn: Callable[..., Any]
    subgraph: Subgraph


class AssembledGraph:
    """Calls ``steps`` in order over an environment of node values; returns like ``gm`` does."""

    def __init__(self, gm: fx.GraphModule, steps: Sequence[Step]) -> None:
        self._placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._constants = {n: _fetch(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self._output = output.args[0]
        self.steps = tuple(steps)

    def __call__(self, *args: Any) -> Any:
        if len(args) != len(self._placeholders):
            raise TypeError(f"expected {len(self._placeholders)} inputs, got {len(args)}")
        env: dict[fx.Node, Any] = dict(self._constants)
        env.update(zip(self._placeholders, args))
        for step in self.steps:
            outs = step.fn(*[env[n] for n in step.subgraph.inputs])
            if not isinstance(outs, (tuple, list)):
                outs = (outs,)
            env.update(zip(step.subgraph.outputs, outs))
        return fx.node.map_arg(self._output, env.__getitem__)

    def __repr__(self) -> str:
        return "AssembledGraph(" + " -> ".join(s.backend for s in self.steps) + ")"


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

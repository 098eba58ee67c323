"""The benchmarks' sequential baseline: a chain plan executed by ``torch.distributed.pipelining.Schedule1F1B``.

[Note: chain baseline]
The model is split by a chain :class:`Plan` (``stage_graph="chain"``) into the same stage modules that
GraphPipe runs; each is adapted to ``torch.distributed.pipelining``'s convention (a stage takes the
tensors its predecessor returned and returns a flat tuple of tensors; the last returns the model
output). torch.distributed.pipelining gives the model inputs to the first stage only, so the inputs
that later stages read travel along the chain with the activations (what a traced sequential split
does; GraphPipe gives every rank the whole batch instead). ``Schedule1F1B``'s default
``scale_grads=True`` divides the whole ``.grad`` by the number of micro-batches after each step,
which also shrinks gradients accumulated by earlier steps (two steps without ``zero_grad`` give
``g1 / M + g2``; observed with torch 2.13), so the baseline scales the loss instead (``loss_fn / M``
with ``scale_grads=False``), as GraphPipe does. It also allocates a stage's gradient receive buffer
with the strides of the gradient its successor computed, which gloo rejects when that gradient is a
non-contiguous view (the gradient of a ``torch.cat`` input is); the adapter makes the gradients of
received tensors contiguous, and the tensors it sends (a stage may end in a transpose, as an mmt
split did once its profiled costs moved the boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils import _pytree as pytree

from torch_graphpipe.graph_capture import capture
from torch_graphpipe.microbatch import split_batch
from torch_graphpipe.planner import Plan
from torch_graphpipe.routing import StageRoute, route
from torch_graphpipe.shape_oracle import ShapeOracle, Specs, TensorSpec
from torch_graphpipe.stage_module import build_stage_module

__all__ = ["ChainBaseline"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (see [Note: chain baseline])."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _PipeliningStage(torch.nn.Module):
    """A stage module in ``torch.distributed.pipelining``'s calling convention; see [Note: chain baseline]."""

    def __init__(
        self, stage: torch.nn.Module, route: StageRoute, carry_in: tuple[int, ...], carry_out: tuple[int, ...],
        num_inputs: int, last: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stage, self.route, self.last = stage, route, last
        self.carry_in, self.carry_out, self.num_inputs = carry_in, carry_out, num_inputs
        self.specs: Specs | None = None  # shapes of the values, set before each step

    def forward(self, *received: torch.Tensor) -> Any:
        assert self.specs is not None, "set specs before a step"
        if self.route.stage == 0:
            inputs: list[Any] = list(received)
            rest: Sequence[torch.Tensor] = ()
        else:
            received = tuple(_ContiguousGrad.apply(x) if x.requires_grad else x for x in received)
            inputs = [None] * self.num_inputs
            for k, x in zip(self.carry_in, received):
                inputs[k] = x
            rest = received[len(self.carry_in) :]
        it = iter(rest)
        values = []
        for v in self.route.in_values:
            spec = self.specs.values[v]
            values.append(spec.build([next(it) for _ in spec.tensors]))
        sent, output = self.stage(*inputs, *values)
        if self.last:
            return output
        by_name = dict(zip(self.route.out_values, sent))
        leaves = [x for v in self.route.send[0][1] for x in pytree.tree_leaves(by_name[v])]
        sends = (*(inputs[k] for k in self.carry_out), *(x for x in leaves if isinstance(x, torch.Tensor)))
        return tuple(x.contiguous() for x in sends)  # gloo sends only contiguous tensors


def _input_reads(gm: fx.GraphModule, stages: Sequence[StageRoute]) -> list[set[int]]:
    """Per stage, the positions of the model inputs its operators read."""
    position = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    nodes = {n.name: n for n in gm.graph.nodes}
    reads: list[set[int]] = []
    for r in stages:
        used = {a.name for v in r.node_names for a in nodes[v].all_input_nodes if a.op == "placeholder"}
        reads.append({position[u] for u in used})
    return reads


def _example_args(stage: _PipeliningStage, micro: Sequence[Any], specs: Specs) -> tuple[Any, Any]:
    """Example input and output tensors of a stage, so that the pipeline runs in static mode.

    In dynamic mode torch.distributed.pipelining runs each stage once on uninitialised tensors to
    infer shapes, which breaks stages that read integer inputs (embedding indices).
    """
    route = stage.route

    def values(names: Sequence[str]) -> list[torch.Tensor]:
        return [_zeros(t) for v in names for t in specs.values[v].tensors]

    if route.stage == 0:
        inputs: list[torch.Tensor] = [x for x in micro if isinstance(x, torch.Tensor)]
    else:
        inputs = [micro[k] for k in stage.carry_in] + values(route.in_values)
    if stage.last:
        outputs = [_zeros(t) for t in specs.output.tensors]
    else:
        outputs = [micro[k] for k in stage.carry_out] + values(route.send[0][1])
    return tuple(inputs), tuple(outputs)


def _zeros(spec: TensorSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype).requires_grad_(spec.requires_grad)


class ChainBaseline:
    """``Schedule1F1B`` over the stages of a chain plan, one stage per rank (for benchmarks and tests)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        example_inputs: Sequence[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        plan: Plan,
        process_group: dist.ProcessGroup | None = None,
        stage_wrapper: Callable[[torch.nn.Module, int], torch.nn.Module] | None = None,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        if plan.stage_graph != "chain":
            raise ValueError(f"ChainBaseline needs a chain plan, got stage_graph={plan.stage_graph!r}")
        group = process_group if process_group is not None else dist.group.WORLD
        self.rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world != plan.num_stages:
            raise ValueError(f"the plan has {plan.num_stages} stages but the process group has {world} ranks")
        captured = capture(module)
        routing = route(plan, captured.graph)
        self.num_microbatches = plan.num_microbatches
        self._oracle = ShapeOracle(captured.graph_module)
        stage: torch.nn.Module = build_stage_module(captured.graph_module, routing.stages[self.rank])
        if stage_wrapper is not None:
            stage = stage_wrapper(stage, self.rank)
        reads = _input_reads(captured.graph_module, routing.stages)
        carry = [tuple(sorted(set().union(*reads[i:]))) for i in range(1, world)] + [()]  # after stage i
        num_inputs = sum(1 for n in captured.graph_module.graph.nodes if n.op == "placeholder")
        self.module = _PipeliningStage(
            stage, routing.stages[self.rank], carry[self.rank - 1] if self.rank else (), carry[self.rank],
            num_inputs, self.rank == world - 1,
        )  # fmt: skip
        self.is_last = self.rank == world - 1
        micro = split_batch(tuple(example_inputs), plan.num_microbatches, "example_inputs")[0]
        self.module.specs = self._oracle.specs(micro)
        input_args, output_args = _example_args(self.module, micro, self.module.specs)
        pipe_stage = PipelineStage(
            self.module, self.rank, world, torch.device("cpu"), input_args=input_args, output_args=output_args,
            group=group,
        )  # fmt: skip
        m = plan.num_microbatches
        self.schedule = Schedule1F1B(
            pipe_stage, m, loss_fn=lambda out, y: loss_fn(out, y) / m, scale_grads=False
        )

    def parameters(self) -> Any:
        return self.module.parameters()

    def step(self, *inputs: Any, target: Any = None) -> float | None:
        """One training step; returns the mean micro-batch loss on the last stage, else ``None``."""
        micro = split_batch(tuple(inputs), self.num_microbatches, "inputs")
        self.module.specs = self._oracle.specs(micro[0])
        losses: list[torch.Tensor] = []
        args = inputs if self.rank == 0 else ()
        if self.is_last:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            return float(sum(loss.detach() for loss in losses))
        self.schedule.step(*args, return_outputs=False)
        return None

    @property
    def stage_module(self) -> fx.GraphModule | torch.nn.Module:
        return self.module.stage

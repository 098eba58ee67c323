"""The benchmarks' sequential baselines: a chain plan executed by one of ``torch.distributed.pipelining``'s schedules.

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

Schedules with several stages per rank run a chain plan of ``virtual stages per rank x ranks`` stages
(``TORCH_SCHEDULES``): the looped ones (``ScheduleInterleaved1F1B``, ``ScheduleLoopedBFS``,
``ScheduleInterleavedZeroBubble``) place stage ``s`` on rank ``s % ranks``, the V ones
(``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``) go down the ranks and back up, so the first and
the last stage share rank 0. The zero-bubble schedules split each backward into an input-gradient
(``I``) and a weight-gradient (``W``) action and detach the stage's outputs in place in between, so
the adapter never returns a view. torch 2.13's ``W`` computes the gradients of the weights it found
during ``I``: those on a path that meets a path from a stage input. A weight whose path reaches the
outputs without meeting one (a branch reading a model input that travels along the chain, an
embedding) silently got no gradient (``towers.2.0.weight`` of a three-tower model under
``ScheduleInterleavedZeroBubble``). For these schedules the adapter adds ``0 * r.sum()`` to every
output, ``r`` the first received tensor that requires grad, so every weight's path meets an input's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
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

__all__ = ["TORCH_SCHEDULES", "ChainBaseline", "stage_ranks"]


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
        self.anchor = False  # tie every output to a received tensor (zero-bubble schedules)

    def forward(self, *received: torch.Tensor) -> Any:
        assert self.specs is not None, "set specs before a step"
        anchor = next((x for x in received if x.requires_grad), None) if self.anchor else None
        out = self._forward(*received)
        if anchor is None:
            return out
        zero = anchor.sum() * 0  # see [Note: chain baseline]: weights the input-gradient pass would miss
        return pytree.tree_map(lambda x: _tie(x, zero), out)

    def _forward(self, *received: torch.Tensor) -> Any:
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
        return tuple(_own(x) for x in sends)


def _time_actions(stage: Any, index: int, around: Callable[[int, str], AbstractContextManager[Any]]) -> None:
    """Run ``stage``'s compute methods (as torch's schedules call them) inside ``around(index, kind)``."""
    forward, backward, weight = (
        stage.forward_one_chunk,
        stage.backward_one_chunk,
        stage.backward_weight_one_chunk,
    )

    def forward_one_chunk(*args: Any, **kwargs: Any) -> Any:
        with around(index, "F"):
            return forward(*args, **kwargs)

    def backward_one_chunk(*args: Any, full_backward: bool = True, **kwargs: Any) -> Any:
        with around(index, "B" if full_backward else "I"):
            return backward(*args, full_backward=full_backward, **kwargs)

    def backward_weight_one_chunk(*args: Any, **kwargs: Any) -> Any:
        with around(index, "W"):
            return weight(*args, **kwargs)

    stage.forward_one_chunk = forward_one_chunk
    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def _tie(x: Any, zero: torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point():
        return x + zero.to(x.dtype)
    return x


def _own(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that is not a view: gloo sends only contiguous tensors, and the zero-bubble
    schedules detach a stage's outputs in place after the input-gradient backward."""
    return x.clone(memory_format=torch.contiguous_format) if x._is_view() else x.contiguous()


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


# torch 2.13's chain schedules: (class name, virtual stages per rank, stage-to-rank style)
TORCH_SCHEDULES: dict[str, tuple[int, str]] = {
    "ScheduleGPipe": (1, "loop"),
    "Schedule1F1B": (1, "loop"),
    "ScheduleInterleaved1F1B": (2, "loop"),
    "ScheduleLoopedBFS": (2, "loop"),
    "ScheduleInterleavedZeroBubble": (2, "loop"),
    "ScheduleZBVZeroBubble": (2, "v"),
    "ScheduleDualPipeV": (2, "v"),
}

SPLIT_BACKWARD = ("ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble", "ScheduleDualPipeV")  # I and W


def stage_ranks(num_stages: int, world: int, style: str) -> dict[int, int]:
    """Rank of every stage: ``loop`` puts stage ``s`` on rank ``s % world``; ``v`` goes down the ranks
    and back up (two stages per rank: ``r`` and ``2 * world - 1 - r``), as torch's V schedules do."""
    if num_stages % world:
        raise ValueError(f"{num_stages} stages do not divide over {world} ranks")
    if style == "loop":
        return {s: s % world for s in range(num_stages)}
    return {s: s % world if (s // world) % 2 == 0 else world - 1 - s % world for s in range(num_stages)}


class ChainBaseline:
    """One of torch's chain schedules (``TORCH_SCHEDULES``) over the stages of a chain plan with
    ``virtual stages per rank x world`` stages (for benchmarks and tests); see [Note: chain baseline].

    ``around_action(stage_index, kind)``, when given, returns the context manager each of a stage's
    compute actions runs in (``F``; ``B`` a whole backward; ``I`` and ``W`` its two parts): the
    benchmark's emulated device time (see [Note: emulated device time] in graphpipe_workloads.py)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        example_inputs: Sequence[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        plan: Plan,
        schedule: str = "Schedule1F1B",
        process_group: dist.ProcessGroup | None = None,
        around_action: Callable[[int, str], AbstractContextManager[Any]] | None = None,
    ) -> None:
        import torch.distributed.pipelining as pipelining

        if schedule not in TORCH_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(TORCH_SCHEDULES)}")
        if plan.stage_graph != "chain":
            raise ValueError(f"ChainBaseline needs a chain plan, got stage_graph={plan.stage_graph!r}")
        group = process_group if process_group is not None else dist.group.WORLD
        self.rank, world = dist.get_rank(group), dist.get_world_size(group)
        per_rank, style = TORCH_SCHEDULES[schedule]
        n = plan.num_stages
        if n != per_rank * world:
            raise ValueError(
                f"{schedule} runs {per_rank} stage(s) per rank: the plan needs {per_rank * world} stages, has {n}"
            )
        micro = split_batch(tuple(example_inputs), plan.num_microbatches, "example_inputs")[0]
        captured = capture(module, example_inputs=micro)
        routing = route(plan, captured.graph)
        self.num_microbatches = m = plan.num_microbatches
        self._oracle = ShapeOracle(captured.graph_module)
        reads = _input_reads(captured.graph_module, routing.stages)
        carry = [tuple(sorted(set().union(*reads[i:]))) for i in range(1, n)] + [()]  # after stage i
        num_inputs = sum(1 for node in captured.graph_module.graph.nodes if node.op == "placeholder")
        ranks = stage_ranks(n, world, style)
        self.local = [s for s in range(n) if ranks[s] == self.rank]
        self.is_first, self.is_last = 0 in self.local, n - 1 in self.local
        specs = self._oracle.specs(micro)
        self.modules: list[_PipeliningStage] = []
        stages = []
        for s in self.local:
            stage: torch.nn.Module = build_stage_module(captured.graph_module, routing.stages[s])
            adapter = _PipeliningStage(
                stage, routing.stages[s], carry[s - 1] if s else (), carry[s], num_inputs, s == n - 1
            )
            adapter.specs = specs
            adapter.anchor = schedule in SPLIT_BACKWARD
            input_args, output_args = _example_args(adapter, micro, specs)
            self.modules.append(adapter)
            pipe_stage = pipelining.PipelineStage(
                adapter,
                s,
                n,
                torch.device("cpu"),
                input_args=input_args,
                output_args=output_args,
                group=group,
            )
            if around_action is not None:
                _time_actions(pipe_stage, s, around_action)
            stages.append(pipe_stage)
        cls = getattr(pipelining, schedule)
        target = stages[0] if per_rank == 1 else stages
        self.schedule = cls(target, m, loss_fn=lambda out, y: loss_fn(out, y) / m, scale_grads=False)

    def parameters(self) -> Any:
        return (p for mod in self.modules for p in mod.parameters())

    def step(self, *inputs: Any, target: Any = None) -> float | None:
        """One training step; returns the mean micro-batch loss on the rank of the last stage, else ``None``."""
        micro = split_batch(tuple(inputs), self.num_microbatches, "inputs")
        specs = self._oracle.specs(micro[0])
        for mod in self.modules:
            mod.specs = specs
        losses: list[torch.Tensor] = []
        args = inputs if self.is_first else ()
        if self.is_last:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            return float(sum(loss.detach() for loss in losses))
        self.schedule.step(*args, return_outputs=False)
        return None

    @property
    def stage_modules(self) -> list[torch.nn.Module]:
        """This rank's stage modules (inside the adapters), in stage order."""
        return [mod.stage for mod in self.modules]

    def compute_order(self) -> dict[int, list[tuple[int, str, int]]]:
        """Per rank, the schedule's compute actions ``(stage, "F" | "B" | "I" | "W", micro-batch)``."""
        order = self.schedule.pipeline_order or {}
        out: dict[int, list[tuple[int, str, int]]] = {}
        for rank, actions in order.items():
            out[rank] = [
                (a.stage_index, a.computation_type.value, a.microbatch_index)
                for a in actions
                if a is not None and a.computation_type.value in ("F", "B", "I", "W")
            ]
        return out

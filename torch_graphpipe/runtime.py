"""The thin runtime: one stage executes its program of :class:`Action` for one step.

[Note: runtime semantics]
Forward ``F j`` runs the stage module on micro-batch ``j``'s model inputs and the values received for
it; on the loss stage it also computes ``loss_fn(output_j, target_j)``. ``RECV_B`` from several
successors of the same value are summed; backward ``B j`` then calls ``torch.autograd.backward``
once on every sent value that received a gradient, plus ``loss_j / num_microbatches`` on the loss
stage: the loss is scaled once and gradients are never rescaled, so the parameters' ``.grad``
accumulate the gradient of the batch loss ``mean_j loss_j`` (on top of what they held, like
``loss.backward()``). The gradients of the received activations then go back to their senders
(zeros for an activation that did not influence anything). The sends and receives between two
computations are posted together (see [Note: one message per edge] for the transport).

A split stage (see [Note: late inputs]) runs its two parts (``StageParts``): ``F j`` runs the early
part on the values received so far and keeps its boundary values, detached into fresh leaves; ``FL j``
runs the late part on them and on every received value, and computes the loss. ``BL j`` runs the
backward of the late part (the roots above), which leaves gradients on the boundary leaves and on the
received values, and sends the late predecessor its gradients; ``B j`` backpropagates the boundary
gradients through the early part and sends the other predecessors theirs.

On a stage whose program has ``W`` actions (a zero-bubble schedule, see [Note: zero-bubble DAG
schedule]) every backward above computes the gradients of the received values (and boundary leaves)
only and keeps what the weight gradients need; ``W j`` computes those, for both parts of a split stage
(see [Note: split backward]).

``around_action``, when set, is called with every compute action and returns the context manager it
runs in: a profiler range per action (``torch.profiler.record_function(str(a))``), or a benchmark's
emulated device time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torch_graphpipe.action import Action
from torch_graphpipe.memory import HeldActivations
from torch_graphpipe.routing import StageRoute
from torch_graphpipe.schedule import Schedule
from torch_graphpipe.shape_oracle import Specs, TensorSpec
from torch_graphpipe.split_backward import backward_input
from torch_graphpipe.stage_module import StageParts
from torch_graphpipe.wire import P2P, pack, packed_size, unpack

__all__ = ["StageRuntime"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass
class _Step:
    """Per micro-batch state of one step (entries dropped once the backward is done)."""

    inputs: Sequence[Sequence[Any]]  # model inputs per micro-batch
    targets: Sequence[Any] | None  # targets per micro-batch (loss stage, training only)
    specs: Specs
    received: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sent: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    grads: dict[int, dict[tuple[str, int], torch.Tensor]] = dataclasses.field(default_factory=dict)
    grad_msgs: dict[int, dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)
    losses: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: list[Any] = dataclasses.field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    boundary: dict[int, tuple[list[Any], list[Any]]] = dataclasses.field(default_factory=dict)  # split stages
    weights: dict[int, list[Callable[[], None]]] = dataclasses.field(default_factory=dict)  # pending W work


class StageRuntime:
    """Executes one stage's schedule; see [Note: runtime semantics]."""

    def __init__(self, route: StageRoute, schedule: Schedule, p2p: P2P, loss_fn: LossFn | None) -> None:
        self.route, self.p2p, self.loss_fn = route, p2p, loss_fn
        self.program = schedule.programs[route.stage]
        self.late = schedule.late_pred(route.stage)  # the late predecessor of a split stage
        self.num_microbatches = schedule.num_microbatches
        self.split_backward = any(a.kind == "W" for a in self.program)  # see [Note: split backward]
        self.events: list[tuple[str, int, float, float]] | None = None  # (kind, mb, start, end) when set
        self.executed: list[Action] | None = None  # when set, every action as it is carried out
        self.memory: HeldActivations | None = None  # when set, measures held activations (training)
        self.around_action: Callable[[Action], AbstractContextManager[Any]] | None = None  # see the Note
        self._peers = dict(route.recv) | dict(route.send)

    def train(
        self,
        module: torch.nn.Module | StageParts,
        inputs: Sequence[Sequence[Any]],
        targets: Any,
        specs: Specs,
    ) -> Any:
        """One training step; returns the mean micro-batch loss on the loss stage, else ``None``.

        ``module`` is the stage module, or its two parts on a stage split at a late input."""
        step = _Step(inputs=inputs, targets=targets, specs=specs)
        if self.memory is None:
            self._run(self.program, module, step, training=True)
        else:  # see [Note: measured memory]
            parts = [module.early, module.late] if isinstance(module, StageParts) else [module]
            self.memory.exclude([inputs, targets, [list(m.parameters()) + list(m.buffers()) for m in parts]])
            with self.memory.tracking():
                self._run(self.program, module, step, training=True)
        return None if step.loss_sum is None else step.loss_sum / self.num_microbatches

    @torch.no_grad()
    def infer(
        self, module: torch.nn.Module | StageParts, inputs: Sequence[Sequence[Any]], specs: Specs
    ) -> list[Any]:
        """Forward of every micro-batch; the loss stage returns the outputs, others ``[]``."""
        step = _Step(inputs=inputs, targets=None, specs=specs)
        program = [a for a in self.program if a.phase == "F"]
        self._run(program, module, step, training=False)
        return step.outputs

    def _run(
        self, program: Sequence[Action], module: torch.nn.Module | StageParts, step: _Step, training: bool
    ) -> None:
        if isinstance(module, StageParts) != (self.late is not None):
            raise ValueError(
                f"stage {self.route.stage}: the schedule and the stage module disagree on the split"
            )
        i = 0
        while i < len(program):
            a = program[i]
            if not a.is_compute:
                j = i
                while j < len(program) and not program[j].is_compute:
                    j += 1
                self._communicate(program[i:j], step, training)
                if self.executed is not None:
                    self.executed.extend(program[i:j])
                i = j
                continue
            start = time.perf_counter()
            if self.around_action is None:
                self._compute(a, module, step, training)
            else:
                with self.around_action(a):
                    self._compute(a, module, step, training)
            if self.events is not None:
                self.events.append((a.kind, a.microbatch, start, time.perf_counter()))
            if self.memory is not None and training:
                self.memory.sample([step.received, step.sent, step.boundary])
            if self.executed is not None:
                self.executed.append(a)
            i += 1
        self.p2p.flush()

    def _compute(self, a: Action, module: torch.nn.Module | StageParts, step: _Step, training: bool) -> None:
        if isinstance(module, StageParts) and a.kind == "F":
            self._forward_early(module, a.microbatch, step, training)
        elif a.kind in ("F", "FL"):
            late = module.late if isinstance(module, StageParts) else module
            self._forward(late, a.microbatch, step, training)
        elif a.kind == "W":
            for weights in step.weights.pop(a.microbatch, []):
                weights()
        elif a.kind == "BL":
            assert self.late is not None and isinstance(module, StageParts)
            self._backward(module.late, a.microbatch, step)
            self._grad_messages(a.microbatch, step, [self.late], keep=True)
        elif isinstance(module, StageParts):
            self._backward_early(module.early, a.microbatch, step)
        else:
            self._backward(module, a.microbatch, step)
            self._grad_messages(a.microbatch, step, [p for p, _ in self.route.recv])

    # -- messages -----------------------------------------------------------------------------

    def _tensor_specs(self, values: Sequence[str], specs: Specs, grads_only: bool) -> list[TensorSpec]:
        out: list[TensorSpec] = []
        for v in values:
            out.extend(t for t in specs.values[v].tensors if t.requires_grad or not grads_only)
        return out

    def _communicate(self, actions: Sequence[Action], step: _Step, training: bool) -> None:
        """The sends and receives between two computations, posted together."""
        sends = [(_peer(a), self._send_buffer(a, step), str(a)) for a in actions if a.is_send]
        recvs = [a for a in actions if a.is_recv]
        layouts = [self._tensor_specs(self._peers[_peer(a)], step.specs, a.kind == "RECV_B") for a in recvs]
        requests = [(_peer(a), packed_size(t), str(a)) for a, t in zip(recvs, layouts)]
        for a, tspecs, buf in zip(recvs, layouts, self.p2p.exchange(sends, requests)):
            tensors = unpack(buf, tspecs)
            if a.kind == "RECV_B":
                self._add_grads(a, tensors, step)
            else:
                self._store_received(a, tensors, step, training)

    def _send_buffer(self, a: Action, step: _Step) -> torch.Tensor:
        if a.kind == "SEND_B":
            return step.grad_msgs[a.microbatch].pop(_peer(a))
        values = self._peers[_peer(a)]
        tensors = [t for v in values for t in _tensor_leaves(step.sent[a.microbatch][v])]
        tspecs = self._tensor_specs(values, step.specs, grads_only=False)
        return pack(tensors, tspecs, self.p2p.device)

    def _store_received(self, a: Action, tensors: list[torch.Tensor], step: _Step, training: bool) -> None:
        it = iter(tensors)
        received = step.received.setdefault(a.microbatch, {})
        for v in self._peers[_peer(a)]:
            spec = step.specs.values[v]
            leaves = [next(it).requires_grad_(training and t.requires_grad) for t in spec.tensors]
            received[v] = spec.build(leaves)

    def _add_grads(self, a: Action, tensors: list[torch.Tensor], step: _Step) -> None:
        it = iter(tensors)
        grads = step.grads.setdefault(a.microbatch, {})
        for v in self._peers[_peer(a)]:
            for k, t in enumerate(step.specs.values[v].tensors):
                if t.requires_grad:
                    g = next(it)
                    grads[(v, k)] = g if (v, k) not in grads else grads[(v, k)] + g

    # -- compute ------------------------------------------------------------------------------

    def _forward_early(self, parts: StageParts, mb: int, step: _Step, training: bool) -> None:
        received = step.received.get(mb, {})
        values = parts.early(*step.inputs[mb], *(received[v] for v in parts.early_in))
        leaves = [
            pytree.tree_map(lambda x: _fresh_leaf(x, training) if isinstance(x, torch.Tensor) else x, v)
            for v in values
        ]
        step.boundary[mb] = (list(values), leaves)

    def _forward(self, module: torch.nn.Module, mb: int, step: _Step, training: bool) -> None:
        received = step.received.get(mb, {})
        kept = step.boundary.get(mb) if training else step.boundary.pop(mb, None)
        boundary = kept[1] if kept is not None else []
        args = (*step.inputs[mb], *boundary, *(received[v] for v in self.route.in_values))
        sent, output = module(*args)
        step.sent[mb] = dict(zip(self.route.out_values, sent))
        if not self.route.holds_output:
            return
        if not training:
            step.outputs.append(output)
            return
        if self.loss_fn is None or step.targets is None:
            raise ValueError(f"stage {self.route.stage} computes the loss: step() needs target= on this rank")
        loss = self.loss_fn(output, step.targets[mb])
        step.losses[mb] = loss
        step.loss_sum = loss.detach() if step.loss_sum is None else step.loss_sum + loss.detach()

    def _backward(self, module: torch.nn.Module, mb: int, step: _Step) -> None:
        """Backward from the sent values that received gradients and from the scaled loss."""
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        received_grads = step.grads.pop(mb, {})
        for v, value in step.sent.pop(mb, {}).items():
            for k, leaf in enumerate(_tensor_leaves(value)):
                g = received_grads.get((v, k))
                if g is not None and leaf.requires_grad:
                    roots.append(leaf)
                    grads.append(g)
        loss = step.losses.pop(mb, None)
        if loss is not None and loss.requires_grad:
            roots.append(loss / self.num_microbatches)
            grads.append(torch.ones_like(loss))
        kept = step.boundary.get(mb)
        inputs = [
            *_tensor_leaves(list(step.received.get(mb, {}).values())),
            *_tensor_leaves(kept[1] if kept else []),
        ]
        self._run_backward(module, mb, step, roots, grads, inputs)

    def _run_backward(
        self,
        module: torch.nn.Module,
        mb: int,
        step: _Step,
        roots: list[torch.Tensor],
        grads: list[torch.Tensor],
        inputs: list[torch.Tensor],
    ) -> None:
        """The whole backward, or on a zero-bubble stage its input gradients now and its weight
        gradients at ``W`` (see [Note: split backward])."""
        if self.split_backward:
            weights = backward_input(roots, grads, inputs, list(module.parameters()))
            step.weights.setdefault(mb, []).append(weights)
        elif roots:
            torch.autograd.backward(roots, grads)

    def _backward_early(self, module: torch.nn.Module, mb: int, step: _Step) -> None:
        outs, leaves = step.boundary.pop(mb)
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for out, leaf in zip(outs, leaves):
            for o, x in zip(_tensor_leaves(out), _tensor_leaves(leaf)):
                if o.requires_grad and x.grad is not None:
                    roots.append(o)
                    grads.append(x.grad)
        received = step.received.get(mb, {})
        inputs = _tensor_leaves([received[v] for v in self.route.in_values if v in received])
        self._run_backward(module, mb, step, roots, grads, inputs)
        self._grad_messages(mb, step, [p for p, _ in self.route.recv if p != self.late])

    def _grad_messages(self, mb: int, step: _Step, peers: Sequence[int], keep: bool = False) -> None:
        """Pack the gradients of the values received from ``peers``; ``keep`` the received values
        (the early part's backward still adds to the gradients of the others)."""
        received = step.received.get(mb, {}) if keep else step.received.pop(mb, {})
        msgs = step.grad_msgs.setdefault(mb, {})
        for peer, values in self.route.recv:
            if peer not in peers:
                continue
            tensors = []
            for v in values:
                leaves = _tensor_leaves(received[v])
                for leaf, t in zip(leaves, step.specs.values[v].tensors):
                    if t.requires_grad:
                        tensors.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
            tspecs = self._tensor_specs(values, step.specs, grads_only=True)
            msgs[peer] = pack(tensors, tspecs, self.p2p.device)


def _peer(a: Action) -> int:
    assert a.peer is not None, f"{a} has no peer"
    return a.peer


def _fresh_leaf(x: torch.Tensor, training: bool) -> torch.Tensor:
    leaf = x.detach()
    return leaf.requires_grad_() if training and x.requires_grad else leaf


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]

"""``GraphPipe``: a DDP-style wrapper that trains a model as a DAG of pipeline stages, one per rank."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.modules.module import _IncompatibleKeys

from torch_graphpipe.agreement import CallSignature, agree_on_call, agree_on_verdict, describe_leaves
from torch_graphpipe.build import PartitionArg, PlanOptions, setup_pipeline
from torch_graphpipe.data_parallel import (
    average_gradients,
    broadcast_state,
    check_layout,
    gather_batch,
    make_groups,
)
from torch_graphpipe.graph_capture import CaptureMethod
from torch_graphpipe.memory import default_memory_budget
from torch_graphpipe.microbatch import join_outputs, split_batch
from torch_graphpipe.planner import Plan, ScheduleKind
from torch_graphpipe.profile import CostTable
from torch_graphpipe.runtime import StageRuntime
from torch_graphpipe.shape_oracle import TensorSpec, ValueSpec
from torch_graphpipe.stage_module import StageParts, split_stage_module
from torch_graphpipe.train_mode import mode_dependent_ops
from torch_graphpipe.wire import P2P, pack, packed_size, unpack

__all__ = ["GraphPipe"]

log = logging.getLogger(__name__)


class GraphPipe(torch.nn.Module):
    """Graph pipeline-parallel training: this rank's stage of ``module``, run by a DAG 1F1B schedule.

    Call it on every rank of an initialised process group (gloo on CPU, NCCL on GPU) whose size is
    the number of stages times ``data_parallel`` (replicas of every stage, see [Note: data parallel
    stages]; rank ``r`` runs stage ``r // data_parallel``). ``example_inputs`` is one batch (split
    into ``data_parallel`` shards of ``num_microbatches`` micro-batches along dim 0) used to trace,
    profile and plan; ``loss_fn(output, target)`` returns the mean loss of a micro-batch.
    ``partition`` is ``"auto"`` (the planner), a list of module-name lists, one per stage (see
    [Note: explicit partition]), or a :class:`Plan`. ``capture_method`` is how the model's graph is
    captured: ``"auto"`` traces with ``torch.fx`` and falls back to ``torch.export`` (non-strict) when
    tracing fails, as it does on Hugging Face models (see [Note: export capture]). ``schedule_kind`` is
    ``"1f1b"`` (DAG 1F1B) or ``"zero_bubble"`` (backwards split into input and weight gradients, the
    weight gradients placed in the bubbles; see [Note: zero-bubble DAG schedule]). ``self.module``
    holds this stage's operators and parameters only; ``parameters()`` are this rank's, for any
    optimizer.

    ``num_microbatches="auto"`` (with ``partition="auto"``, or a :class:`Plan`, whose count is used)
    lets the planner choose the micro-batch count and size with the partition (see [Note:
    memory-aware micro-batching]); ``self.num_microbatches`` is the count chosen. It plans for
    ``memory_budget_bytes`` per stage, by default what the stages' devices have (see [Note: default
    memory budget] in torch_graphpipe/memory.py), and raises ``ValueError`` naming the smallest stage
    (or operator) that does not fit, its bytes and the budget's origin when nothing fits. With an int
    count, ``memory_budget_bytes`` bounds the partition only when given.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        example_inputs: Sequence[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        num_microbatches: int | Literal["auto"],
        process_group: dist.ProcessGroup | None = None,
        partition: PartitionArg = "auto",
        stage_graph: Literal["dag", "chain"] = "dag",
        leaf_modules: Sequence[type] = (),
        costs: CostTable | None = None,
        memory_budget_bytes: float | None = None,
        device: torch.device | str | None = None,
        data_parallel: int = 1,
        capture_method: CaptureMethod = "auto",
        schedule_kind: ScheduleKind = "1f1b",
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GraphPipe needs an initialised torch.distributed process group (e.g. torchrun)"
            )
        auto = isinstance(num_microbatches, str) and num_microbatches == "auto"
        if not auto and (
            isinstance(num_microbatches, bool)
            or not isinstance(num_microbatches, int)
            or num_microbatches < 1
        ):
            raise ValueError(f"num_microbatches must be an int >= 1 or 'auto', got {num_microbatches!r}")
        if not isinstance(example_inputs, (tuple, list)):
            raise TypeError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
        group = process_group if process_group is not None else dist.group.WORLD
        assert group is not None
        check_layout(group, data_parallel)
        _check_batch(tuple(example_inputs), data_parallel, 1 if auto else int(num_microbatches))
        self.rank = dist.get_rank(group)  # in the process group
        self._all = group  # every rank (all replicas): they agree before each call acts
        self._groups = make_groups(group, data_parallel)
        self._group: dist.ProcessGroup = self._groups.pipe  # this replica's pipeline: group rank = stage
        self.stage, self.replica = self._groups.stage, self._groups.replica
        self.data_parallel = self._groups.data_parallel
        self.device = torch.device(device) if device is not None else _default_device(group)
        budget_source = "memory_budget_bytes"
        if auto and memory_budget_bytes is None and not isinstance(partition, Plan):
            memory_budget_bytes, how = default_memory_budget(group, self.device)
            budget_source = f"the default memory budget ({how}; pass memory_budget_bytes= to set one)"
            log.info("rank %d: memory budget per stage %d bytes: %s", self.rank, memory_budget_bytes, how)
        options = PlanOptions(
            stage_graph=stage_graph,
            leaf_modules=tuple(leaf_modules),
            costs=costs,
            memory_budget_bytes=memory_budget_bytes,
            capture_method=capture_method,
            schedule_kind=schedule_kind,
        )
        shard = split_batch(tuple(example_inputs), self.data_parallel, "example_inputs")[0]
        try:
            setup = setup_pipeline(module, shard, num_microbatches, partition, self._group, options, group)
        except ValueError as exc:
            if auto and "fits memory_budget_bytes" in str(exc):  # see [Note: default memory budget]
                raise ValueError(f"num_microbatches='auto': {exc} (the budget is {budget_source})") from exc
            raise
        self.num_microbatches = setup.plan.num_microbatches
        self._plan, self._oracle = setup.plan, setup.oracle
        # an exported graph keeps the mode it was captured in (see [Note: export capture])
        self._fixed_mode = module.training if setup.capture_method == "export" else None
        self._unowned, self._state_keys = setup.unowned, setup.state_keys
        self.route = setup.routing.stages[self.stage]
        self.loss_stage = setup.routing.loss_stage
        self.module = setup.stage.to(self.device)
        self.parts: StageParts | None = None  # a split stage's two parts (see [Note: late inputs])
        broadcast_state(self.module, self._groups)
        self._split_parts()
        self.runtime = StageRuntime(self.route, self._plan.schedule, P2P(self._group, self.device), loss_fn)
        self.train(module.training)
        dist.barrier(group=group)  # every rank has built its stage (and NCCL's first call is collective)
        log.info(
            "rank %d runs stage %d (replica %d of %d): %d operators",
            self.rank, self.stage, self.replica, self.data_parallel, len(self.route.node_names),
        )  # fmt: skip

    @property
    def plan(self) -> Plan:
        """The executed plan: stages, stage edges, schedule (``print(gp.plan)``, ``gp.plan.simulate()``)."""
        return self._plan

    def train(self, mode: bool = True) -> GraphPipe:
        super().train(mode)
        if hasattr(self, "_oracle"):
            self._oracle.train(mode)
        fixed = getattr(self, "_fixed_mode", None)
        if fixed is not None and mode != fixed and isinstance(self.module, torch.fx.GraphModule):
            ops = mode_dependent_ops(self.module)
            if ops:
                log.warning(
                    "rank %d: stage %d was captured with torch.export in %s mode; its operators %s keep "
                    "that mode's behaviour after %s() (capture the model in the mode you run it in)",
                    self.rank, self.stage, "train" if fixed else "eval", ops[:3], "train" if mode else "eval",
                )  # fmt: skip
        return self

    def step(self, *inputs: Any, target: Any = None) -> float:
        """Forward and backward of the batch ``inputs`` through the pipeline; returns the batch loss.

        Every rank passes the same full batch ``inputs``; ``target`` is needed on the loss stage
        (``self.loss_stage``) only. Parameter gradients accumulate into ``.grad`` as with
        ``loss.backward()`` of the batch's mean micro-batch loss; call the optimizer afterwards.
        The returned loss (a float) is the same on every rank. Every rank must pass batches of the
        same shapes and dtypes (and the loss stage's replicas targets of the same shapes): otherwise,
        or when a rank's batch is wrong, every rank raises the same ``ValueError`` before any data
        moves (see [Note: ranks agree first]).
        """
        micro, targets = self._agree("step", inputs, target)
        specs = self._oracle.specs(micro[0])
        loss = self.runtime.train(self._executable(), micro, targets, specs)
        average_gradients(self.module.parameters(), self._groups)
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if loss is not None:
            value.fill_(float(loss))
        dist.broadcast(value, group=self._group, group_src=self.loss_stage)
        if self._groups.replicas is not None:  # the mean of the replicas' (equal-sized) shard losses
            dist.all_reduce(value, group=self._groups.replicas)
            value /= self.data_parallel
        return float(value.item())

    def forward(self, *inputs: Any) -> Any:
        """Inference: the model output for the batch ``inputs``, on every rank (no autograd)."""
        micro, _ = self._agree("forward", inputs, None)
        specs = self._oracle.specs(micro[0])
        outputs = self.runtime.infer(self._executable(), micro, specs)
        joined = join_outputs(outputs) if outputs else None
        return gather_batch(self._broadcast_output(joined, specs.output), self._groups)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The FULL model's state (CPU tensors, the plain module's keys), gathered on every rank."""
        if args or kwargs:
            raise TypeError("GraphPipe.state_dict() takes no arguments (it returns the full model's state)")
        local = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        local.update({k: v.detach().cpu() for k, v in self._unowned.items()})
        gathered: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(gathered, local, group=self._group)
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return collections.OrderedDict((k, merged[k]) for k in self._state_keys if k in merged)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load this stage's part of a FULL model state dict (e.g. the plain module's), on every rank.

        All ranks load or none does: each rank checks its part (with ``strict``, its missing keys and
        the keys no stage has; always, tensors of the wrong shape), the ranks agree on the verdict,
        and on a problem every rank raises the same ``RuntimeError`` naming the keys and the ranks
        (see [Note: ranks agree first]). Returns this rank's missing keys and the unexpected keys."""
        own = {**self.module.state_dict(), **self._unowned}
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._state_keys]
        problem = _load_problem(own, state_dict, missing if strict else [], unexpected if strict else [])
        problems = agree_on_verdict(problem, self._label, "GraphPipe.load_state_dict", self._all, self.device)
        if problems:
            raise RuntimeError(
                f"error loading a GraphPipe state dict, nothing loaded on any rank: {'; '.join(problems)}"
            )
        part = {k: state_dict[k] for k in self.module.state_dict() if k in state_dict}
        self.module.load_state_dict(part, strict=False, assign=assign)
        if assign:
            self._split_parts()  # the parts must share the newly assigned tensors
        with torch.no_grad():
            for k, t in self._unowned.items():
                if k in state_dict:
                    t.copy_(state_dict[k])
        return _IncompatibleKeys(missing, unexpected)

    def _split_parts(self) -> None:
        stage = self._plan.stages[self.stage]
        if stage.late_pred is not None:
            assert isinstance(self.module, torch.fx.GraphModule)
            self.parts = split_stage_module(self.module, self.route, stage.late_node_names, stage.late_pred)

    def _executable(self) -> torch.nn.Module | StageParts:
        return self.parts if self.parts is not None else self.module

    def _agree(self, call: str, inputs: Sequence[Any], target: Any) -> tuple[list[tuple[Any, ...]], Any]:
        """This rank's micro-batches (and on the loss stage, for ``step``, its targets) once every
        rank agrees on the call; see [Note: ranks agree first]."""
        micro: list[tuple[Any, ...]] = []
        targets, error = None, None
        try:
            micro = self._split(inputs)
            targets = self._targets(target) if call == "step" else None
        except ValueError as exc:
            error = str(exc)
        loss_rank = call == "step" and self.stage == self.loss_stage and target is not None
        signature = CallSignature(
            call=call,
            inputs=describe_leaves(tuple(inputs), "inputs"),
            target=describe_leaves(target, "target") if loss_rank else None,
            num_microbatches=self.num_microbatches,
            training=self.training,
        )
        agree_on_call(signature, error, self._label, self._all, self.device)
        return micro, targets

    def _split(self, inputs: Sequence[Any]) -> list[tuple[Any, ...]]:
        _check_batch(tuple(inputs), self.data_parallel, self.num_microbatches, "inputs")
        shard = split_batch(tuple(inputs), self.data_parallel, "inputs")[self.replica]
        micro = split_batch(shard, self.num_microbatches, "inputs")
        return [_to(m, self.device) for m in micro]

    def _targets(self, target: Any) -> list[Any] | None:
        """This replica's micro-batch targets on the loss stage, ``None`` elsewhere."""
        if self.stage != self.loss_stage:
            return None
        if target is None:
            raise ValueError(
                f"rank {self.rank} (stage {self.stage}) computes the loss: pass target= to step() on this rank"
            )
        _check_batch(target, self.data_parallel, self.num_microbatches, "target")
        shard = split_batch(target, self.data_parallel, "target")[self.replica]
        return [_to(t, self.device) for t in split_batch(shard, self.num_microbatches, "target")]

    @property
    def _label(self) -> str:
        """This rank in messages."""
        replica = f", replica {self.replica}" if self.data_parallel > 1 else ""
        return f"rank {self.rank} (stage {self.stage}{replica})"

    def _broadcast_output(self, joined: Any, spec: ValueSpec) -> Any:
        m = self.num_microbatches
        full = [
            TensorSpec((t.shape[0] * m, *t.shape[1:]) if t.shape else t.shape, t.dtype, False)
            for t in spec.tensors
        ]
        if joined is not None:
            leaves = [x for x in torch.utils._pytree.tree_leaves(joined) if isinstance(x, torch.Tensor)]
            buf = pack(leaves, full, self.device)
        else:
            buf = torch.empty(packed_size(full), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.broadcast(buf, group=self._group, group_src=self.loss_stage)
        return joined if joined is not None else spec.build([t.clone() for t in unpack(buf, full)])

    def __repr__(self) -> str:
        replica = f", replica={self.replica}/{self.data_parallel}" if self.data_parallel > 1 else ""
        return (
            f"GraphPipe(rank={self.rank}, stage={self.stage}{replica}, stages={self._plan.num_stages}, "
            f"module={self.module!r})"
        )


def _check_batch(value: Any, data_parallel: int, num_microbatches: int, what: str = "example_inputs") -> None:
    """With replicas, a batch must split into replica shards of micro-batches (checked before any
    message); without, ``split_batch`` says what is wrong when it splits the batch."""
    if data_parallel == 1:
        return
    parts = data_parallel * num_microbatches
    for x in torch.utils._pytree.tree_leaves(value):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] % parts:
            raise ValueError(
                f"{what} has batch size {x.shape[0]}, which does not split into data_parallel="
                f"{data_parallel} replica shards of num_microbatches={num_microbatches} micro-batches each"
            )


def _load_problem(
    own: Mapping[str, Any], state_dict: Mapping[str, Any], missing: list[str], unexpected: list[str]
) -> str | None:
    """What keeps this rank from loading its part of ``state_dict`` (``missing`` and ``unexpected``:
    the keys that count under ``strict``), or ``None``."""
    parts = [f"missing {missing}"] if missing else []
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    for k, mine in own.items():
        theirs = state_dict.get(k)
        if isinstance(theirs, torch.Tensor) and isinstance(mine, torch.Tensor) and theirs.shape != mine.shape:
            parts.append(
                f"size mismatch for {k}: {list(theirs.shape)} in the state dict, {list(mine.shape)} here"
            )
    return ", ".join(parts) or None


def _to(value: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def _default_device(group: dist.ProcessGroup) -> torch.device:
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

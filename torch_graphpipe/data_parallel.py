"""Data parallelism inside a stage: ``GraphPipe(..., data_parallel=d)``.

[Note: data parallel stages]
With ``d`` replicas per stage the process group has ``num_stages * d`` ranks, laid out stage-major:
group rank ``r`` runs stage ``r // d`` as replica ``r % d`` (a stage's replicas are neighbours, as
in Megatron's layout, so on GPUs their all-reduce stays inside a node). Replica ``j`` of every stage
forms one pipeline (its own process group, group rank = stage), which trains the ``j``-th of ``d``
equal contiguous shards of the batch in ``num_microbatches`` micro-batches; the replicas of a stage
form its data-parallel group. After the pipeline's backward every stage averages its parameters'
gradients over its replicas (one all-reduce of one flat buffer), so ``.grad`` holds the gradient of
the batch's mean loss as in one process, and optimizers stay in step on every replica. The returned
loss is the mean of the replicas' losses (the batch's mean micro-batch loss); inference gathers the
replicas' outputs along dim 0. At construction every stage's parameters and buffers are broadcast
from replica 0 (as DDP does), so replicas start equal even from differently seeded modules; buffers
(e.g. BatchNorm statistics) are not synchronised afterwards. Every stage has the same number of
replicas; the planner does not choose per-stage replica counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = [
    "ReplicaGroups",
    "average_gradients",
    "broadcast_state",
    "check_layout",
    "gather_batch",
    "make_groups",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplicaGroups:
    """Where this rank sits; see [Note: data parallel stages]."""

    pipe: dist.ProcessGroup  # this replica's pipeline: group rank = stage
    replicas: dist.ProcessGroup | None  # this stage's replicas (None without data parallelism)
    stage: int  # the stage this rank runs
    replica: int  # which replica of it
    data_parallel: int  # replicas per stage
    num_stages: int  # stages per pipeline


def check_layout(group: dist.ProcessGroup, data_parallel: Any) -> None:
    """``ValueError`` unless ``group`` splits into ``data_parallel`` replicas of every stage."""
    if isinstance(data_parallel, bool) or not isinstance(data_parallel, int) or data_parallel < 1:
        raise ValueError(f"data_parallel must be an int >= 1, got {data_parallel!r}")
    world = dist.get_world_size(group)
    if world % data_parallel:
        raise ValueError(
            f"the process group has {world} ranks, which do not split into data_parallel={data_parallel} "
            "replicas of every stage (need num_stages * data_parallel ranks)"
        )


def make_groups(group: dist.ProcessGroup, data_parallel: int) -> ReplicaGroups:
    """Split ``group`` into pipelines and per-stage replica groups (collective: every rank calls it)."""
    check_layout(group, data_parallel)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    d = data_parallel
    stages = world // d
    if d == 1:
        return ReplicaGroups(
            pipe=group, replicas=None, stage=rank, replica=0, data_parallel=1, num_stages=world
        )
    glob = [dist.get_global_rank(group, r) for r in range(world)]
    pipe = replicas = None
    for j in range(d):  # every rank creates every group, in the same order
        g = dist.new_group([glob[s * d + j] for s in range(stages)])
        if j == rank % d:
            pipe = g
    for s in range(stages):
        g = dist.new_group([glob[s * d + j] for j in range(d)])
        if s == rank // d:
            replicas = g
    assert pipe is not None and replicas is not None
    return ReplicaGroups(
        pipe=pipe, replicas=replicas, stage=rank // d, replica=rank % d, data_parallel=d, num_stages=stages
    )


def average_gradients(params: Iterable[torch.nn.Parameter], groups: ReplicaGroups) -> None:
    """Average ``.grad`` over the stage's replicas in place (one all-reduce of a flat buffer)."""
    if groups.replicas is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=groups.replicas)
    flat /= groups.data_parallel
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: torch.nn.Module, groups: ReplicaGroups) -> None:
    """Copy replica 0's parameters and buffers of this stage to the other replicas."""
    if groups.replicas is None:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, group=groups.replicas, group_src=0)


def gather_batch(value: Any, groups: ReplicaGroups) -> Any:
    """The replicas' ``value`` (a pytree) concatenated along dim 0 of every tensor with one."""
    if groups.replicas is None:
        return value
    leaves, spec = pytree.tree_flatten(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            parts = [torch.empty_like(leaf) for _ in range(groups.data_parallel)]
            dist.all_gather(parts, leaf.contiguous(), group=groups.replicas)
            out.append(torch.cat(parts, dim=0))
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, spec)

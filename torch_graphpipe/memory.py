"""Measuring the activation bytes a stage holds during a real step, and the device memory to plan for.

[Note: measured memory]
On a CPU, torch has no allocator statistics to read a peak from, and a process's resident size moves
with the allocator's caching, so the runtime measures what the planner predicts (see [Note: held
activations] in torch_graphpipe/stage_cost.py): the bytes held between two actions for the micro-batches
in flight. :class:`HeldActivations` counts, by storage (a storage counted once however many tensors
view it), every tensor autograd saves for backward while it lives (``saved_tensors_hooks``: packed when
saved, released when autograd frees it) and the values the runtime keeps per micro-batch (received,
sent, split-stage boundaries), and takes the peak after every compute action. The loss values (scalars)
and what the loss function saves beyond the model output are not counted. Weights and the
model inputs and targets (held for the whole step) are left out; so are the gradients in flight and,
on a zero-bubble stage, the gradients its ``W`` is waiting to use. The planner's predicted peak per
stage is ``param_copies x parameter bytes + peak in-flight x held bytes per micro-batch``; the
activation term is what this measures.
"""

from __future__ import annotations

import os
import socket
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["HeldActivations", "default_memory_budget", "device_memory_bytes"]


class _Saved:
    """A tensor autograd saved, and the storage it was counted under."""

    __slots__ = ("__weakref__", "key", "tensor")

    def __init__(self, tensor: torch.Tensor, key: int) -> None:
        self.tensor, self.key = tensor, key


class HeldActivations:
    """Peak bytes a stage holds between actions; see [Note: measured memory]."""

    def __init__(self, excluded: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_key(t) for t in excluded}  # weights, model inputs, targets
        self.saved: dict[int, list[int]] = {}  # storage -> [live saved tensors, bytes]
        self.peak_bytes = 0

    def exclude(self, values: Any) -> None:
        self.excluded.update(_key(t) for t in _tensors(values))

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Count what autograd saves inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def sample(self, kept: Any) -> int:
        """Held bytes now (saved tensors alive plus the storages of ``kept``); updates the peak."""
        storages = {k: nbytes for k, (live, nbytes) in self.saved.items() if live > 0}
        for t in _tensors(kept):
            key = _key(t)
            if key not in self.excluded:
                storages.setdefault(key, t.untyped_storage().nbytes())
        total = sum(storages.values())
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if key in self.excluded:
            return t
        entry = self.saved.setdefault(key, [0, t.untyped_storage().nbytes()])
        entry[0] += 1
        saved = _Saved(t, key)
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        self.saved[key][0] -= 1


def device_memory_bytes(device: torch.device | str, processes: int = 1) -> int:
    """Memory of ``device`` in bytes, shared by ``processes`` stage processes: a GPU's total memory, or
    on a CPU the memory available to this process now; see [Note: default memory budget]."""
    device = torch.device(device)
    if device.type == "cuda":
        total = int(torch.cuda.get_device_properties(device).total_memory)
    else:
        total = _available_cpu_bytes()
    return total // max(1, processes)


def default_memory_budget(group: dist.ProcessGroup, device: torch.device) -> tuple[int, str]:
    """The per-stage memory budget when none is given, and how it was found, the same on every rank of
    ``group`` (a collective); see [Note: default memory budget].

    [Note: default memory budget]
    ``GraphPipe(num_microbatches="auto")`` without ``memory_budget_bytes`` plans for what the stages'
    devices have. A GPU stage gets its device's total memory (the same on every run, so the plan does
    not move with what else is allocated); a CPU stage gets the memory available to the process when
    the pipeline is built (``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup's
    ``memory.max`` less its ``memory.current``; the physical memory where neither can be read). Ranks
    on one host that share a device (every CPU rank of the host, or GPU ranks given the same GPU)
    share its memory equally. The budget is the smallest over all ranks, since the planner takes one
    budget for every stage. On a CPU the available memory moves between runs; it only changes the plan
    where it binds, and then ``memory_budget_bytes=`` fixes it."""
    share_key = (socket.gethostname(), str(device))
    mine = (share_key, _available_cpu_bytes() if device.type != "cuda" else device_memory_bytes(device))
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    sharing = Counter(key for key, _ in every)
    budget, (host, dev), total, n = min(
        (total // sharing[key], key, total, sharing[key]) for key, total in every
    )
    how = f"{dev} memory on {host}: {total / 1e9:.3g} GB" + (f" shared by {n} ranks" if n > 1 else "")
    return budget, how


def _available_cpu_bytes() -> int:
    """Memory this process may still use: ``MemAvailable``, capped by the cgroup v2 limit."""
    total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        total = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if limit != "max":
            total = min(total, int(limit) - current)
    except (OSError, ValueError):
        pass
    return max(0, total)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]

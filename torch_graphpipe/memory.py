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
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["HeldActivations", "device_memory_bytes"]


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
    """Memory of ``device`` in bytes: a GPU's total memory, or on a CPU the machine's memory shared by
    ``processes`` stage processes."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // max(1, processes)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]

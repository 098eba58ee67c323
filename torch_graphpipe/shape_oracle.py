"""Shapes of every value for a micro-batch, known on every rank without communication.

[Note: shape oracle]
A receiver must allocate its buffer before the message arrives, so every rank needs the shape, dtype
and ``requires_grad`` of every value that crosses a stage edge. Each rank keeps a copy of the traced
model whose parameters and buffers are fake tensors (``FakeTensorMode``: shapes, dtypes and devices,
no storage, so the other stages' weights are not held) and runs it on fake copies of the micro-batch
inputs; the result is cached per input signature. Fake rather than ``meta`` tensors: an exported
graph names devices (``aten.to(device=cpu)``, ``arange(device=cpu)``), which meta tensors refuse. A value is a pytree (a tensor, or a tuple of tensors and Python scalars); its tensor
leaves travel, its other leaves (sizes, flags) are taken from the oracle, which assumes that they do
not depend on the data.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

__all__ = ["ShapeOracle", "Specs", "TensorSpec", "ValueSpec"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to allocate one tensor."""

    shape: tuple[int, ...]  # sizes
    dtype: torch.dtype  # element type
    requires_grad: bool  # a gradient travels back for it during training

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype, t.requires_grad)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ValueSpec:
    """One value: its pytree structure and leaves (``TensorSpec`` for tensors, else the constant)."""

    treespec: pytree.TreeSpec  # structure of the value
    leaves: tuple[Any, ...]  # TensorSpec per tensor leaf, the value itself for other leaves

    @classmethod
    def of(cls, value: Any) -> ValueSpec:
        leaves, treespec = pytree.tree_flatten(value)
        return cls(treespec, tuple(TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves))

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(x for x in self.leaves if isinstance(x, TensorSpec))

    def build(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The value with the given tensors (in leaf order) and the recorded constants."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorSpec) else x for x in self.leaves]
        return pytree.tree_unflatten(leaves, self.treespec)


@dataclasses.dataclass(frozen=True)
class Specs:
    """Specs of every operator's value and of the model output, for one micro-batch signature."""

    values: dict[str, ValueSpec]  # operator name -> its value
    output: ValueSpec  # the model output


class ShapeOracle:
    """Fake-tensor twin of the traced model; see [Note: shape oracle]."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self._mode = FakeTensorMode(allow_non_fake_inputs=True)  # constants of the graph stay real
        memo: dict[int, Any] = {}
        for t in [*gm.parameters(), *gm.buffers()]:
            fake = self._mode.from_tensor(t.detach())
            memo[id(t)] = (
                torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
            )
        self._meta = copy.deepcopy(gm, memo)
        self._cache: dict[Any, Specs] = {}

    def train(self, mode: bool) -> None:
        self._meta.train(mode)

    def specs(self, inputs: Sequence[Any]) -> Specs:
        """Specs for one micro-batch with these inputs (only their shapes and dtypes are used)."""
        key = (self._meta.training, _signature(inputs))
        if key not in self._cache:
            self._cache[key] = self._run(inputs)
        return self._cache[key]

    def _run(self, inputs: Sequence[Any]) -> Specs:
        fake = self._mode.from_tensor
        fake_inputs = pytree.tree_map(
            lambda x: fake(x.detach()) if isinstance(x, torch.Tensor) else x, tuple(inputs)
        )
        interp = fx.Interpreter(self._meta, garbage_collect_values=False)
        try:
            with torch.enable_grad(), self._mode:
                output = interp.run(*fake_inputs)
        except Exception as exc:  # any op may lack a fake (meta) kernel
            raise ValueError(
                f"cannot infer the shapes of the model's values with fake tensors: {exc}"
            ) from exc
        values = {
            n.name: ValueSpec.of(v) for n, v in interp.env.items() if n.op not in ("placeholder", "output")
        }
        return Specs(values=values, output=ValueSpec.of(output))


def _signature(inputs: Sequence[Any]) -> Any:
    leaves, treespec = pytree.tree_flatten(tuple(inputs))
    parts = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
    return (str(treespec), parts)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""`ZooModel`: one model of the zoo — a name, a builder per size, example inputs and targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from torch_zoo.weights import calibrate_batchnorm, init_weights

__all__ = ["InputFactory", "Size", "TargetFactory", "Task", "ZooModel", "check_size"]

Size = Literal["tiny", "full"]
Task = Literal["inference", "training"]

# (size, batch, generator) -> the model's positional inputs, freshly drawn from `generator`.
InputFactory = Callable[[Size, int, torch.Generator], tuple[torch.Tensor, ...]]
# (size, batch, generator) -> the target that `loss_fn(output, target)` expects.
TargetFactory = Callable[[Size, int, torch.Generator], torch.Tensor]

_TINY_BATCH = 2  # default batch of tiny inputs: small, but > 1 so batch mix-ups show
# Random inputs that set BatchNorm statistics in `build`: enough values per channel where the
# feature maps are small (tiny nets reach 1x1), few where a forward is expensive.
_CALIBRATION_BATCH: dict[Size, int] = {"tiny": 8, "full": 2}
_CALIBRATION_SEED_OFFSET = 10_000  # keeps calibration inputs apart from `example_inputs(seed=...)`


def check_size(size: object) -> Size:
    """Return `size` if it is a valid `Size`, else raise `ValueError` naming it."""
    if size not in get_args(Size):
        raise ValueError(f"invalid size {size!r}; valid sizes: {', '.join(get_args(Size))}")
    return size  # type: ignore[return-value]


def _check_batch(batch: object) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"invalid batch {batch!r}; expected a positive int")
    return batch


@dataclass(frozen=True, kw_only=True)
class ZooModel:
    """A zoo model: plain PyTorch code, random weights, a `"tiny"` (tests) and a `"full"` size.

    `build` returns the module in eval mode with weights drawn deterministically from `seed`;
    `example_inputs` draws fresh float32 (or int64 index) inputs; training models also have
    `example_target` and `loss_fn(output, target) -> scalar`.
    """

    name: str  # registry key, e.g. "resnet18"
    description: str  # one line
    task: Task  # "training" for the multi-branch GraphPipe models; every model can run inference
    default_batch: int  # the "larger batch" used in benchmarks at full size
    builder: Callable[[Size], nn.Module]  # size -> module (weights from the global RNG)
    make_inputs: InputFactory  # (size, batch, generator) -> fresh inputs
    make_target: TargetFactory | None = None  # required for training models
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # required for training

    def __post_init__(self) -> None:
        if self.task not in get_args(Task):
            raise ValueError(f"invalid task {self.task!r} for zoo model {self.name!r}")
        _check_batch(self.default_batch)
        if self.task == "training" and (self.make_target is None or self.loss_fn is None):
            raise ValueError(f"training zoo model {self.name!r} needs a target factory and a loss_fn")

    def build(self, size: Size = "tiny", *, seed: int = 0) -> nn.Module:
        """Build the model at `size` in eval mode; the same `seed` gives the same weights.

        Weights are He-normal and BatchNorm statistics come from one random batch
        (see [Note: zoo weights]); the global RNG is left as it was.
        """
        size = check_size(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.builder(size)
            init_weights(model)
        calibration_seed = seed + _CALIBRATION_SEED_OFFSET
        calibration = self.make_inputs(size, _CALIBRATION_BATCH[size], _generator(calibration_seed))
        calibrate_batchnorm(model, calibration)
        return model.eval()

    def example_inputs(
        self, size: Size = "tiny", batch: int | None = None, *, seed: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Fresh random inputs; `batch` defaults to 2 at tiny size and `default_batch` at full."""
        size, batch = self._resolve(size, batch)
        return self.make_inputs(size, batch, _generator(seed))

    def example_target(self, size: Size = "tiny", batch: int | None = None, *, seed: int = 0) -> torch.Tensor:
        """A random target for `loss_fn`; raises `ValueError` for models without a loss."""
        size, batch = self._resolve(size, batch)
        if self.make_target is None:
            raise ValueError(f"zoo model {self.name!r} has no loss, so no example target")
        return self.make_target(size, batch, _generator(seed + 1))

    def _resolve(self, size: object, batch: object) -> tuple[Size, int]:
        size = check_size(size)
        if batch is None:
            batch = _TINY_BATCH if size == "tiny" else self.default_batch
        return size, _check_batch(batch)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

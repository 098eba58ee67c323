"""Capability specs of the built-in CPU backends, wrapping the whole-module runners in ``backends/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from torch_collage.backends import get_backend
from torch_collage.backends.base import Backend
from torch_collage.spec import BackendSpec, CompileFn

__all__ = ["builtin_specs"]

# Ops no exported-graph runtime should be handed: randomness differs from eager's by construction.
_RANDOM_OPS = ("rand", "randn", "bernoulli", "native_dropout", "randint", "philox", "seed")


def _eager_compile(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
    del example_inputs
    return gm


def _runner_compile(backend: Backend) -> CompileFn:
    def compile_fn(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        return backend.compile(gm, tuple(example_inputs))

    return compile_fn


def _deterministic(node: fx.Node) -> bool:
    name = str(node.target)
    return not any(tag in name for tag in _RANDOM_OPS)


def _spec(name: str) -> BackendSpec:
    backend = get_backend(name)
    return BackendSpec(
        name=name,
        compile=_runner_compile(backend),
        supports=_deterministic,
        fusion="region",
        available=backend.available,
        version=backend.version,
    )


def builtin_specs() -> list[BackendSpec]:
    """eager (every node, so a cover always exists), inductor, onnxruntime, openvino."""
    eager = BackendSpec(
        name="eager",
        compile=_eager_compile,
        supports=lambda node: True,
        fusion="region",
        version=lambda: f"torch {torch.__version__}",
        mutating_ok=True,
    )
    return [eager, *(_spec(name) for name in ("inductor", "onnxruntime", "openvino"))]

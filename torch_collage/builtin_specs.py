"""Capability specs of the built-in backends, wrapping the whole-module runners in ``backends/``: the
CPU ones, and the optional NVIDIA GPU ones (listed always, placed only where available)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx

from torch_collage.backends import get_backend
from torch_collage.backends.base import Backend
from torch_collage.backends.cutlass import CUTLASS_PATTERNS, cutlass_claims
from torch_collage.backends.onnxruntime_cuda import ort_cuda_claims
from torch_collage.backends.tensorrt import tensorrt_claims
from torch_collage.backends.triton import triton_claims
from torch_collage.spec import BackendSpec, CompileFn, Fusion, NodePredicate

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


def _save_runner(fn: Callable[..., Any], directory: Path) -> bool:
    """A runner's own ``save(directory)``, where it has one (see [Note: compiled artifacts])."""
    save = getattr(fn, "save", None)
    return bool(save(directory)) if callable(save) else False


def _deterministic(node: fx.Node) -> bool:
    name = str(node.target)
    return not any(tag in name for tag in _RANDOM_OPS)


def _spec(name: str) -> BackendSpec:
    backend = get_backend(name)
    compile_graph = getattr(backend, "compile_graph", None)  # ATen graphs without the module path
    return BackendSpec(
        name=name,
        compile=compile_graph if compile_graph is not None else _runner_compile(backend),
        supports=_deterministic,
        fusion="region",
        available=backend.available,
        version=getattr(backend, "graph_version", backend.version),  # compile_graph may differ
        save=_save_runner if hasattr(backend, "load") else None,
        load=getattr(backend, "load", None),
    )


def _gpu_spec(
    name: str,
    claims: NodePredicate,
    fusion: Fusion = "region",
    patterns: tuple[tuple[str, ...], ...] = (),
    max_depth: int | None = None,
) -> BackendSpec:
    backend = get_backend(name)
    return BackendSpec(
        name=name,
        compile=_runner_compile(backend),
        supports=claims,
        fusion=fusion,
        max_depth=max_depth,
        patterns=patterns,
        available=backend.available,
        version=backend.version,
    )


def gpu_specs() -> list[BackendSpec]:
    """The NVIDIA GPU backends: what each claims is documented on its predicate.

    - ``tensorrt``: deterministic ops on CUDA tensors, not float64; convex regions.
    - ``cutlass``: mm/addmm/bmm/2-D convolution with an epilogue of adds and one last activation
      (relu/gelu/sigmoid/tanh), float32/float16/bfloat16; elementwise-epilogue fusion, up to 4 ops.
    - ``triton``: deterministic ops on CUDA tensors (Inductor, Triton codegen), torch_cp's decode
      attention where its Triton kernel fits; convex regions.
    - ``onnxruntime_cuda``: deterministic ops on CUDA tensors, float32/float16/integer/bool; regions.
    """
    return [
        _gpu_spec("tensorrt", tensorrt_claims),
        _gpu_spec("cutlass", cutlass_claims, "elementwise_epilogue", CUTLASS_PATTERNS, max_depth=4),
        _gpu_spec("triton", triton_claims),
        _gpu_spec("onnxruntime_cuda", ort_cuda_claims),
    ]


def builtin_specs() -> list[BackendSpec]:
    """eager (every node, so a cover always exists), inductor, onnxruntime, openvino, then the GPU
    backends (tensorrt, cutlass, triton, onnxruntime_cuda), which are unavailable without CUDA."""
    eager = BackendSpec(
        name="eager",
        compile=_eager_compile,
        supports=lambda node: True,
        fusion="region",
        version=lambda: f"torch {torch.__version__}",
        mutating_ok=True,
    )
    return [eager, *(_spec(name) for name in ("inductor", "onnxruntime", "openvino")), *gpu_specs()]

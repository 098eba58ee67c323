"""The built-in backends by name: the CPU ones, and the optional GPU ones (``pip install
torch-collage[gpu]``; unavailable without their packages or a CUDA device). The registry, with
capability specs and entry points, is built on this lookup (see ``torch_collage.builtin_specs``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from torch_collage.backends.base import Backend
from torch_collage.backends.cutlass import CutlassBackend
from torch_collage.backends.eager import EagerBackend
from torch_collage.backends.inductor import InductorBackend
from torch_collage.backends.onnxruntime import OnnxRuntimeBackend
from torch_collage.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
from torch_collage.backends.openvino import OpenVinoBackend
from torch_collage.backends.tensorrt import TensorRTBackend
from torch_collage.backends.triton import TritonBackend

__all__ = ["BUILTIN_BACKENDS", "GPU_BACKENDS", "get_backend"]

BUILTIN_BACKENDS: Mapping[str, Callable[..., Backend]] = MappingProxyType(
    {
        "eager": EagerBackend,
        "inductor": InductorBackend,
        "inductor_freezing": functools.partial(InductorBackend, freezing=True),
        "onnxruntime": OnnxRuntimeBackend,
        "openvino": OpenVinoBackend,
    }
)

# NVIDIA GPU backends: optional, placed only where available (written against the documented APIs,
# unverified on a GPU so far).
GPU_BACKENDS: Mapping[str, Callable[..., Backend]] = MappingProxyType(
    {
        "tensorrt": TensorRTBackend,
        "cutlass": CutlassBackend,
        "triton": TritonBackend,
        "onnxruntime_cuda": OnnxRuntimeCudaBackend,
    }
)


def get_backend(name: str, **options: Any) -> Backend:
    """A fresh backend ``name`` configured with ``options`` (its dataclass fields), e.g.
    ``get_backend("onnxruntime", allow_spinning=True)``; CPU and GPU backends alike. Unknown names or
    options raise ``ValueError``."""
    factories = {**BUILTIN_BACKENDS, **GPU_BACKENDS}
    try:
        factory = factories[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid names: {', '.join(factories)}") from None
    cls = factory.func if isinstance(factory, functools.partial) else factory
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backend {name!r}; valid options: {sorted(valid)}")
    return factory(**options)

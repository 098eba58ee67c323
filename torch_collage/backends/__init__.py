"""Backends: runtimes that compile and run a module (later, one partition of it) on this machine."""

from torch_collage.backends.base import Backend, BackendCompileError
from torch_collage.backends.builtin import BUILTIN_BACKENDS, get_backend
from torch_collage.backends.eager import EagerBackend
from torch_collage.backends.inductor import InductorBackend
from torch_collage.backends.onnxruntime import OnnxRuntimeBackend
from torch_collage.backends.openvino import OpenVinoBackend

__all__ = [
    "BUILTIN_BACKENDS",
    "Backend",
    "BackendCompileError",
    "EagerBackend",
    "InductorBackend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "get_backend",
]

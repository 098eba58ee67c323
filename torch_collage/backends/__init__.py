"""Backends: what each can run (its ``BackendSpec``) and the runtimes that compile and run a module
(or one partition of it) on this machine; the one registry that collects them.

CPU: ``eager``, ``inductor``, ``onnxruntime``, ``openvino``. NVIDIA GPU, optional (``pip install
torch-collage[gpu]``): ``tensorrt``, ``cutlass``, ``triton``, ``onnxruntime_cuda``. Each module here
imports only ``base`` (and FX helpers), never the placement pipeline above it. The runners and the
registry are re-exported lazily: importing ``torch_collage.backends.base`` loads no backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torch_collage.backends.base import Backend, BackendCompileError, BackendInfo, BackendSpec, OpRule

if TYPE_CHECKING:
    from torch_collage.backends.cutlass import CutlassBackend
    from torch_collage.backends.eager import EagerBackend
    from torch_collage.backends.inductor import InductorBackend
    from torch_collage.backends.onnxruntime import OnnxRuntimeBackend
    from torch_collage.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
    from torch_collage.backends.openvino import OpenVinoBackend
    from torch_collage.backends.registry import (
        CPU_BACKENDS,
        GPU_BACKENDS,
        get_backend,
        get_spec,
        list_backends,
        register_backend,
        registered_backend,
        unregister_backend,
    )
    from torch_collage.backends.tensorrt import TensorRTBackend
    from torch_collage.backends.triton import TritonBackend

_LAZY = {
    "CutlassBackend": "cutlass",
    "EagerBackend": "eager",
    "InductorBackend": "inductor",
    "OnnxRuntimeBackend": "onnxruntime",
    "OnnxRuntimeCudaBackend": "onnxruntime_cuda",
    "OpenVinoBackend": "openvino",
    "TensorRTBackend": "tensorrt",
    "TritonBackend": "triton",
    **dict.fromkeys(
        (
            "CPU_BACKENDS",
            "GPU_BACKENDS",
            "get_backend",
            "get_spec",
            "list_backends",
            "register_backend",
            "registered_backend",
            "unregister_backend",
        ),
        "registry",
    ),
}

__all__ = [
    "CPU_BACKENDS",
    "GPU_BACKENDS",
    "Backend",
    "BackendCompileError",
    "BackendInfo",
    "BackendSpec",
    "CutlassBackend",
    "EagerBackend",
    "InductorBackend",
    "OnnxRuntimeBackend",
    "OnnxRuntimeCudaBackend",
    "OpRule",
    "OpenVinoBackend",
    "TensorRTBackend",
    "TritonBackend",
    "get_backend",
    "get_spec",
    "list_backends",
    "register_backend",
    "registered_backend",
    "unregister_backend",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

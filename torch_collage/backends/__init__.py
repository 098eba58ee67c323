"""Backends: runtimes that compile and run a module (or one partition of it) on this machine.

CPU: ``eager``, ``inductor`` (and ``inductor_freezing``), ``onnxruntime``, ``openvino``. NVIDIA GPU,
optional (``pip install torch-collage[gpu]``): ``tensorrt``, ``cutlass``, ``triton``,
``onnxruntime_cuda``.
"""

from torch_collage.backends.base import Backend, BackendCompileError
from torch_collage.backends.builtin import BUILTIN_BACKENDS, GPU_BACKENDS, get_backend
from torch_collage.backends.cutlass import CutlassBackend
from torch_collage.backends.eager import EagerBackend
from torch_collage.backends.inductor import InductorBackend
from torch_collage.backends.onnxruntime import OnnxRuntimeBackend
from torch_collage.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
from torch_collage.backends.openvino import OpenVinoBackend
from torch_collage.backends.tensorrt import TensorRTBackend
from torch_collage.backends.triton import TritonBackend

__all__ = [
    "BUILTIN_BACKENDS",
    "GPU_BACKENDS",
    "Backend",
    "BackendCompileError",
    "CutlassBackend",
    "EagerBackend",
    "InductorBackend",
    "OnnxRuntimeBackend",
    "OnnxRuntimeCudaBackend",
    "OpenVinoBackend",
    "TensorRTBackend",
    "TritonBackend",
    "get_backend",
]

"""ONNX Runtime on an NVIDIA GPU: the CPU backend's export (``torch.export`` -> ``torch.onnx.export``),
run by the TensorRT execution provider where ONNX Runtime lists it, else the CUDA provider, with
I/O bound to device memory: inputs are bound from the torch CUDA tensors' ``data_ptr()`` and outputs
are torch CUDA tensors allocated before the run and bound as well, so no tensor crosses to the host.

Needs the ``onnxruntime-gpu`` package (``pip install torch-collage[gpu]``), which replaces the CPU
``onnxruntime`` package (both install the ``onnxruntime`` module). Unverified on a GPU so far.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from torch_collage.backends._export import ExportedGraph, export_graph
from torch_collage.backends._gpu import (
    GPU_EXTRA_HINT,
    check_cuda_inputs,
    cuda_reason,
    dist_version,
    missing_package_reason,
    on_cuda,
    outputs_have_dtypes,
)
from torch_collage.backends.base import BackendCompileError, deterministic, runner_spec
from torch_collage.backends.onnxruntime import OP_PATTERNS, numpy_dtype, session_options, to_onnx

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["SPEC", "OnnxRuntimeCudaBackend", "ort_cuda_claims"]

logger = logging.getLogger(__name__)

_NAME = "onnxruntime_cuda"
_REQUIRED = ("onnxruntime", "onnx", "onnxscript")
# dtypes bound through IOBinding (numpy has no bfloat16, so bfloat16 tensors cannot be described to it)
_DTYPES = frozenset(
    {torch.float32, torch.float16, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool}
)


def ort_cuda_claims(node: fx.Node) -> bool:
    """Capability of ``onnxruntime_cuda``: any deterministic op (convex regions, whole graphs) on CUDA
    tensors whose outputs are float32/float16/integer/bool; not float64 or bfloat16 (the CUDA provider
    lacks kernels for many ops in them, and numpy cannot describe bfloat16 buffers to IOBinding)."""
    return deterministic(node) and on_cuda(node) and outputs_have_dtypes(node, _DTYPES)


@dataclass(frozen=True, kw_only=True)
class OnnxRuntimeCudaBackend:
    """ONNX Runtime's TensorRT (when listed and ``use_tensorrt``) or CUDA execution provider, whole
    graph, static shapes, inference only.

    The compiled callable accepts CUDA tensors of the example inputs' shapes and dtypes (else
    ``ValueError``), returns fresh CUDA tensors each call, records no autograd graph, and is not
    thread-safe (it reuses one IOBinding). It runs on the torch CUDA stream that was current at
    compile time (passed to the providers as their compute stream).
    """

    use_tensorrt: bool = True  # put TensorrtExecutionProvider first where ONNX Runtime lists it
    # False: fp32 only (TensorRT provider's fp16 off, CUDA provider's TF32 off); True allows both
    allow_low_precision: bool = False
    num_threads: int | None = None  # intra-op threads for CPU fallback nodes; None: torch.get_num_threads()

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        missing = missing_package_reason(_REQUIRED)
        if missing:
            return False, missing
        if dist_version("onnxruntime-gpu") == "unknown":
            return False, f"onnxruntime-gpu is not installed, only the CPU onnxruntime ({GPU_EXTRA_HINT})"
        reason = cuda_reason()
        return (False, reason) if reason else (True, "")

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        providers = "+".join(self._providers_names())
        return (
            f"onnxruntime-gpu {dist_version('onnxruntime-gpu')} [{providers}] (torch {torch.__version__}, "
            f"onnxscript {dist_version('onnxscript')}, low_precision={self.allow_low_precision})"
        )

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> _OrtCudaRunner:
        start = time.perf_counter()
        device = check_cuda_inputs(_NAME, example_inputs)
        graph = export_graph(_NAME, module, example_inputs, device="cuda")
        try:
            session = self._session(to_onnx(graph, _NAME), device)
            runner = _OrtCudaRunner(session, graph, device)
            runner(*example_inputs)  # warm-up: provider kernels (and TensorRT engines) are built here
        except BackendCompileError:
            raise
        except Exception as exc:
            raise BackendCompileError.from_exception(_NAME, exc, OP_PATTERNS) from exc
        logger.debug("%s: compiled %s in %.2f s", _NAME, type(module).__name__, time.perf_counter() - start)
        return runner

    def _providers_names(self) -> list[str]:
        import onnxruntime as ort

        listed = ort.get_available_providers()
        names = []
        if self.use_tensorrt and "TensorrtExecutionProvider" in listed:
            names.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" not in listed:
            raise BackendCompileError(
                _NAME, f"ONNX Runtime lists no CUDAExecutionProvider (it lists {listed})"
            )
        return [*names, "CUDAExecutionProvider"]

    def _providers(self, device: torch.device) -> list[tuple[str, dict[str, str]]]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = str(torch.cuda.current_stream(device).cuda_stream)
        out: list[tuple[str, dict[str, str]]] = []
        for name in self._providers_names():
            opts = {"device_id": str(index), "user_compute_stream": stream}
            if name == "TensorrtExecutionProvider":
                opts["trt_fp16_enable"] = "1" if self.allow_low_precision else "0"
            else:
                opts["use_tf32"] = "1" if self.allow_low_precision else "0"
            out.append((name, opts))
        return out

    def _session(self, model: bytes, device: torch.device) -> ort.InferenceSession:
        import onnxruntime as ort

        opts = session_options(self.num_threads or torch.get_num_threads(), allow_spinning=False)
        return ort.InferenceSession(model, sess_options=opts, providers=self._providers(device))


class _OrtCudaRunner:
    """Runs one session through a reused IOBinding on device memory; inputs matched by name because
    the exporter may drop inputs the graph does not use."""

    def __init__(self, session: ort.InferenceSession, graph: ExportedGraph, device: torch.device) -> None:
        self._session = session
        self._graph = graph
        self._device = device
        self._device_id = device.index if device.index is not None else torch.cuda.current_device()
        sig = graph.signature
        names = [i.name for i in session.get_inputs()]
        self._inputs = list(zip(names, graph.match_inputs([[n] for n in names]), strict=True))
        self._input_np_dtypes = {pos: _np_dtype(sig.dtypes[pos]) for _, pos in self._inputs}
        self._output_names = [o.name for o in session.get_outputs()]
        if len(self._output_names) != graph.num_outputs:
            raise BackendCompileError(
                _NAME, f"the ONNX model has {len(self._output_names)} outputs, the module {graph.num_outputs}"
            )
        self._outputs = [(shape, dtype, _np_dtype(dtype)) for shape, dtype in graph.output_meta()]
        self._binding = session.io_binding()

    def __call__(self, *args: torch.Tensor) -> Any:
        tensors = self._graph.signature.prepare(args)  # checks shapes, dtypes, device; contiguous
        binding, dev = self._binding, self._device_id
        for name, pos in self._inputs:
            t = tensors[pos]
            binding.bind_input(name, "cuda", dev, self._input_np_dtypes[pos], tuple(t.shape), t.data_ptr())
        outs = []
        for name, (shape, dtype, np_dtype) in zip(self._output_names, self._outputs, strict=True):
            out = torch.empty(shape, dtype=dtype, device=self._device)
            binding.bind_output(name, "cuda", dev, np_dtype, tuple(shape), out.data_ptr())
            outs.append(out)
        self._session.run_with_iobinding(binding)
        return self._graph.unflatten(outs)

    def __repr__(self) -> str:
        return f"<onnxruntime_cuda runner: {len(self._inputs)} inputs, {len(self._output_names)} outputs>"


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _DTYPES:
        raise BackendCompileError(_NAME, f"dtype {dtype} cannot be bound to ONNX Runtime device memory")
    return numpy_dtype(dtype)


SPEC = runner_spec(_NAME, OnnxRuntimeCudaBackend, supports=ort_cuda_claims)

"""TensorRT through torch-tensorrt's dynamo path: ``torch.export`` -> ``torch_tensorrt.dynamo.compile``.

Each candidate is exported (``torch.export``, shared with the ONNX Runtime and OpenVINO backends) and
built into TensorRT engines with full compilation required (a node TensorRT cannot convert fails the
build rather than silently running in torch) and build failures passed through, so a failed build
becomes a ``BackendCompileError`` and the candidate gets infinite cost. Precision: fp32 with TF32
off by default; ``allow_low_precision`` adds fp16 kernels and TF32 (the cost model still rejects a
candidate whose outputs then differ from eager beyond tolerance).

Built engines are saved on disk with ``torch_tensorrt.save`` (the exported-program format) under
``<cache_dir>/tensorrt/``, keyed like the cost cache: backend versions, precision, the module's code
and weights, the inputs' shapes/dtypes/strides, and the GPU model; ``torch.export.load`` brings them
back, so a warm compile builds no engine.

Needs ``torch-tensorrt`` built for the installed torch (``pip install torch-collage[gpu]``) and a
CUDA device. Unverified on a GPU so far.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torch_collage.backends._export import export_graph
from torch_collage.backends._gpu import (
    cache_path,
    check_cuda_inputs,
    cuda_reason,
    device_description,
    dist_version,
    missing_package_reason,
    module_digest,
    on_cuda,
    outputs_have_dtypes,
)
from torch_collage.backends.base import BackendCompileError, deterministic, runner_spec

__all__ = ["SPEC", "TensorRTBackend", "tensorrt_claims"]

logger = logging.getLogger(__name__)

_NAME = "tensorrt"
# TensorRT has no float64 (torch-tensorrt would truncate it: a precision nobody asked for)
_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool})
_OP_PATTERNS = (
    re.compile(r"Conversion of function (?:torch\._ops\.)?([\w.]+) not currently supported"),
    re.compile(r"Unsupported operators?:?\s*(?:torch\.ops\.)?(\w+\.\w+\.\w+)"),
    re.compile(r"(aten\.\w+\.\w+)"),
)


def tensorrt_claims(node: fx.Node) -> bool:
    """Capability of ``tensorrt``: deterministic ops on CUDA tensors whose outputs are
    float32/float16/bfloat16/int32/int64/bool, in convex regions (whether TensorRT has a converter
    for an op is only known when building: an op without one fails that candidate's build)."""
    return deterministic(node) and on_cuda(node) and outputs_have_dtypes(node, _DTYPES)


@dataclass(frozen=True, kw_only=True)
class TensorRTBackend:
    """TensorRT engines built by torch-tensorrt for static shapes, inference only.

    The callable takes CUDA tensors of the example inputs' shapes and dtypes (else ``ValueError``)
    and returns what the module returns.
    """

    allow_low_precision: bool = False  # False: fp32 engines, TF32 off; True: fp16 kernels and TF32 too
    cache_dir: str | None = None  # engine cache root; None: the cost cache's directory
    optimization_level: int | None = None  # TensorRT builder optimisation level (0-5); None: its default

    def __post_init__(self) -> None:
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be in 0..5 or None, got {self.optimization_level}")

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        reason = missing_package_reason(("torch_tensorrt",), "torch_tensorrt") or cuda_reason()
        return (False, reason) if reason else (True, "")

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        trt = dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt_cu13")
        precision = "fp32+fp16" if self.allow_low_precision else "fp32"
        return (
            f"torch-tensorrt {dist_version('torch-tensorrt', 'torch_tensorrt')} (tensorrt {trt}, "
            f"torch {torch.__version__}, {precision}, opt {self.optimization_level})"
        )

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        start = time.perf_counter()
        device = check_cuda_inputs(_NAME, example_inputs)
        path = self._engine_path(module, example_inputs, device)
        runner = _load(path, example_inputs)
        if runner is None:
            runner = self._build(module, example_inputs, device, path)
        try:
            runner(*example_inputs)  # warm-up: engine deserialisation and context creation happen here
        except Exception as exc:
            raise BackendCompileError.from_exception(_NAME, exc, _OP_PATTERNS) from exc
        logger.debug("%s: compiled %s in %.2f s", _NAME, type(module).__name__, time.perf_counter() - start)
        return runner

    def _engine_path(
        self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...], device: torch.device
    ) -> Path:
        from torch_collage.subgraph import digest, tensor_signature

        key = digest(
            "engine",
            _NAME,
            self.version(),
            module_digest(module),
            tensor_signature(example_inputs),
            device_description(device.index or 0),
        )
        return cache_path(self.cache_dir, _NAME, key, ".ep")

    def _build(
        self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...], device: torch.device, path: Path
    ) -> _TrtRunner:
        import torch_tensorrt

        graph = export_graph(_NAME, module, example_inputs, device="cuda")
        precisions = {torch.float32, torch.float16} if self.allow_low_precision else {torch.float32}
        settings: dict[str, Any] = {
            "arg_inputs": list(example_inputs),
            "device": device,
            "enabled_precisions": precisions,
            "disable_tf32": not self.allow_low_precision,
            "require_full_compilation": True,  # no silent fallback to torch inside a candidate
            "pass_through_build_failures": True,  # a failed build raises instead of running in torch
            "min_block_size": 1,
            "truncate_double": False,
        }
        if self.optimization_level is not None:
            settings["optimization_level"] = self.optimization_level
        try:
            trt_gm = torch_tensorrt.dynamo.compile(graph.program, **settings)
        except Exception as exc:
            raise BackendCompileError.from_exception(_NAME, exc, _OP_PATTERNS) from exc
        runner = _TrtRunner(trt_gm, graph.output_map, graph.out_spec, graph.signature.shapes)
        _save(path, trt_gm, runner, example_inputs)
        return runner


class _TrtRunner:
    """Calls a torch-tensorrt module with contiguous CUDA inputs; folds its distinct outputs back into
    what the original module returned."""

    def __init__(
        self,
        module: Callable[..., Any],
        output_map: tuple[int, ...],
        out_spec: pytree.TreeSpec,
        shapes: tuple[torch.Size, ...],
    ) -> None:
        self._module = module
        self._output_map = output_map
        self._out_spec = out_spec
        self._shapes = shapes

    def __call__(self, *args: torch.Tensor) -> Any:
        if len(args) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} input tensors, got {len(args)}")
        for i, (arg, shape) in enumerate(zip(args, self._shapes, strict=True)):
            if arg.shape != shape:
                raise ValueError(f"input {i}: compiled for shape {tuple(shape)}, got {tuple(arg.shape)}")
        with torch.no_grad():
            flat = pytree.tree_leaves(self._module(*(a.contiguous() for a in args)))
        return pytree.tree_unflatten([flat[i] for i in self._output_map], self._out_spec)

    def __repr__(self) -> str:
        return f"<tensorrt runner: {len(self._shapes)} inputs>"


def _save(path: Path, trt_gm: Any, runner: _TrtRunner, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Write the engine (torch_tensorrt.save, exported-program format) and how outputs fold back;
    written under temporary names and renamed, so a reader never sees half a file."""
    import torch_tensorrt

    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        try:
            torch_tensorrt.save(
                trt_gm, str(tmp), output_format="exported_program", arg_inputs=list(example_inputs)
            )
        except TypeError:  # torch-tensorrt before 2.5 names the example inputs `inputs`
            torch_tensorrt.save(
                trt_gm, str(tmp), output_format="exported_program", inputs=list(example_inputs)
            )
        meta = {"output_map": list(runner._output_map), "out_spec": pytree.treespec_dumps(runner._out_spec)}
        path.with_suffix(".json").write_text(json.dumps(meta))
        tmp.replace(path)
    except Exception as exc:  # a cache that cannot be written costs a rebuild next time, nothing more
        logger.warning("torch_collage: tensorrt engine not cached at %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def _load(path: Path, example_inputs: tuple[torch.Tensor, ...]) -> _TrtRunner | None:
    """The cached engine at ``path``, or None (absent, or unreadable: then it is rebuilt)."""
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        return None
    try:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT engine class torch.export.load needs)

        module = torch.export.load(str(path)).module()
        meta = json.loads(meta_path.read_text())
        out_spec = pytree.treespec_loads(meta["out_spec"])
        return _TrtRunner(module, tuple(meta["output_map"]), out_spec, tuple(t.shape for t in example_inputs))
    except Exception as exc:
        logger.warning("torch_collage: cached tensorrt engine %s unreadable (%s); rebuilding", path, exc)
        return None


SPEC = runner_spec(_NAME, TensorRTBackend, supports=tensorrt_claims)

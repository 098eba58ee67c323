"""What the GPU backends (``tensorrt``, ``cutlass``, ``triton``, ``onnxruntime_cuda``) share: availability
checks that name what is missing, CUDA input checks, node predicates for capability specs, and the
key of on-disk compile caches (built like the cost cache's keys)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from torch_collage.backends.base import BackendCompileError, default_cache_dir, node_tensor_meta

__all__ = [
    "GPU_EXTRA_HINT",
    "cache_path",
    "check_cuda_inputs",
    "cuda_reason",
    "device_description",
    "dist_version",
    "input_tensor_meta",
    "missing_package_reason",
    "module_digest",
    "on_cuda",
    "outputs_have_dtypes",
]

GPU_EXTRA_HINT = "pip install torch-collage[gpu]"


def missing_package_reason(modules: Sequence[str], what: str | None = None) -> str:
    """Empty when every module in ``modules`` can be imported, else e.g. ``"torch_tensorrt is not installed
    (pip install torch-collage[gpu])"``. Only looks the modules up (``find_spec``); imports nothing.
    Looked up once per process: placement asks on every compile."""
    missing = [m for m in modules if not _importable(m)]
    if not missing:
        return ""
    name = what or ", ".join(missing)
    verb = "is" if what or len(missing) == 1 else "are"
    return f"{name} {verb} not installed ({GPU_EXTRA_HINT})"


@functools.cache
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_reason() -> str:
    """Empty when torch sees a CUDA device, else why not (a CPU-only torch build, or no device)."""
    if torch.version.cuda is None:
        return f"no CUDA device (this torch, {torch.__version__}, is built without CUDA)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


@functools.cache
def dist_version(*names: str) -> str:
    """The installed version of the first distribution among ``names`` (spellings differ), or "unknown".
    Looked up once per process (reading distribution metadata scans site-packages)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


@functools.cache
def device_description(index: int = 0) -> str:
    """``"NVIDIA H200 sm_90"``: the device name and compute capability (part of compile cache keys)."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def check_cuda_inputs(backend: str, example_inputs: Sequence[object]) -> torch.device:
    """The one CUDA device all tensors of ``example_inputs`` are on; ``BackendCompileError`` otherwise."""
    devices = set()
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise BackendCompileError(backend, f"runs on CUDA only; example_inputs[{i}] is on {t.device}")
        devices.add(t.device)
    if len(devices) > 1:
        raise BackendCompileError(backend, f"inputs are on several devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cuda", torch.cuda.current_device())


# --- node predicates for capability specs ---------------------------------------------------------


def input_tensor_meta(node: fx.Node) -> list[torch.Tensor]:
    """The (fake) tensors flowing into ``node``, from its input nodes' ``meta["val"]``."""
    return [t for arg in node.all_input_nodes for t in node_tensor_meta(arg)]


def on_cuda(node: fx.Node) -> bool:
    """``node`` produces tensors, and every tensor it reads or produces lives on a CUDA device."""
    outs = node_tensor_meta(node)
    return bool(outs) and all(t.device.type == "cuda" for t in (*outs, *input_tensor_meta(node)))


def outputs_have_dtypes(node: fx.Node, dtypes: Iterable[torch.dtype]) -> bool:
    allowed = frozenset(dtypes)
    return all(t.dtype in allowed for t in node_tensor_meta(node))


# --- keys of on-disk compile caches ----------------------------------------------------------------


def module_digest(module: nn.Module) -> str:
    """A hash of what ``module`` computes: its code (``GraphModule``) or repr, and the bytes of every
    parameter and buffer (compiled engines embed the weights, so the weights are part of the key)."""
    h = hashlib.sha256()
    h.update((module.code if isinstance(module, fx.GraphModule) else repr(module)).encode())
    state = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in state:
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.stride()}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | None, backend: str, key: str, suffix: str) -> Path:
    """``<cache_dir>/<backend>/<key><suffix>``; ``cache_dir`` defaults to the cost cache's directory."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / backend
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{key}{suffix}"

"""Small probes that tools/gpu_check.py runs as its own steps, each in a fresh process.

    python tools/gpu_probe.py machine --json OUT.json   # versions, the GPU, nvcc, cores
    python tools/gpu_probe.py verify  --json OUT.json   # built extensions, backends, optional packages
    python tools/gpu_probe.py cutlass                   # CUTLASS's Python interface imports (and meets CUDA)
    python tools/gpu_probe.py nccl                      # torch_cp.attention over a 1-rank NCCL group

Each prints what it found, one fact a line, and exits non-zero only when something that must work
(on this machine) does not. Nothing here is faked: a probe that cannot run says why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Optional distributions and what their absence turns off (skipped, with a line saying so).
OPTIONAL = {
    "triton": "the triton backend and the Triton decode kernel",
    "nvidia-cutlass": "the cutlass collage backend (carry it: make gpu-wheels)",
    "torch-tensorrt": "the tensorrt collage backend (too large to carry)",
    "tensorrt": "the tensorrt collage backend (too large to carry)",
    "onnxruntime-gpu": "the onnxruntime_cuda collage backend (too large to carry)",
    "onnxruntime": "the onnxruntime collage backends",
    "onnx": "the ONNX-based backends",
    "onnxscript": "torch.onnx.export's dynamo exporter",
    "openvino": "the openvino backend (CPU only)",
    "transformers": "the gpt2/bert zoo models and torch_cp.hf",
    "matplotlib": "the benchmarks' PNG plots",
    "pytest-timeout": "per-test time limits in the test step",
    "cuda-bindings": "CUTLASS's driver calls",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not found"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)}: no answer in 30 s"
    return (done.stdout + done.stderr).strip()


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "setuptools": _version("setuptools"),
        "pip": _version("pip"),
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:] or [""],
    }
    info["nvcc"] = info["nvcc"][0]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "device_count": torch.cuda.device_count(),
        }
    for key, value in info.items():
        print(f"{key}: {value}")
    return info


def _try(label: str, fn: Any, facts: dict[str, Any]) -> Any:
    try:
        value = fn()
    except Exception as err:
        facts[label] = f"error: {type(err).__name__}: {err}"
        print(f"{label}: error: {type(err).__name__}: {err}")
        return None
    facts[label] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    print(f"{label}: {facts[label]}")
    return value


def verify() -> tuple[dict[str, Any], list[str]]:
    """What was built and what is usable; returns the facts and the must-work failures."""
    import torch

    facts: dict[str, Any] = {}
    failures: list[str] = []
    cuda = torch.cuda.is_available()
    _try("torch_cp._C", lambda: importlib.import_module("torch_cp._C").__file__, facts)
    if facts["torch_cp._C"].startswith("error"):
        failures.append("torch_cp._C does not import")
    if cuda:
        _try("torch_cp._cuda", lambda: importlib.import_module("torch_cp._cuda").__file__, facts)
        if facts["torch_cp._cuda"].startswith("error"):
            failures.append("torch_cp._cuda does not import (CUDA kernels not built)")
    else:
        facts["torch_cp._cuda"] = "skipped: no CUDA"
        print("torch_cp._cuda: skipped: no CUDA")
    from torch_cp import _ops

    facts["HAS_CUDA_KERNELS"] = _ops.HAS_CUDA_KERNELS
    print(f"HAS_CUDA_KERNELS: {_ops.HAS_CUDA_KERNELS}")

    def triton_reason() -> str:
        import torch_cp.triton as ops

        device = "cuda" if cuda else "cpu"
        q = torch.zeros(1, 8, 1, 128, device=device)
        return ops.unsupported_reason(q, torch.zeros(1, 2, 4, 128, device=device)) or "usable"

    _try("torch_cp.triton", triton_reason, facts)
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    facts["collage entry point"] = next((ep.value for ep in eps if ep.name == "collage"), "absent")
    print(f"collage entry point: {facts['collage entry point']}")
    if facts["collage entry point"] == "absent":
        failures.append("the torch_dynamo_backends entry point 'collage' is not installed")

    from torch_collage.backends import GPU_BACKENDS, get_backend

    backends = {}
    for name in GPU_BACKENDS:
        try:
            ok, reason = get_backend(name).available()
        except Exception as err:
            ok, reason = False, f"available() raised {type(err).__name__}: {err}"
        backends[name] = "available" if ok else f"unavailable: {reason}"
        print(f"backend {name}: {backends[name]}")
    facts["gpu_backends"] = backends
    optional = {}
    for dist, role in OPTIONAL.items():
        version = _version(dist)
        optional[dist] = version or f"absent: skipped ({role})"
        print(f"package {dist}: {optional[dist]}")
    facts["optional"] = optional
    facts["cuda.cuda importable"] = importlib.util.find_spec("cuda") is not None and _has_cuda_cuda()
    print(f"cuda.cuda importable: {facts['cuda.cuda importable']}")
    return facts, failures


def _has_cuda_cuda() -> bool:
    try:
        importlib.import_module("cuda.cuda")
    except ImportError:
        return False
    return True


def cutlass() -> int:
    if importlib.util.find_spec("cutlass_library") is None:
        print("nvidia-cutlass: absent: skipped (carry it: make gpu-wheels)")
        return 0
    import torch

    try:
        cl = importlib.import_module("cutlass_cppgen")
    except ImportError:
        cl = importlib.import_module("cutlass")
    print(f"{cl.__name__} {getattr(cl, '__version__', '?')} imported from {cl.__file__}")
    import cuda

    print(f"cuda package: version {getattr(cuda, '__version__', 'none')}, path {list(cuda.__path__)}")
    if not torch.cuda.is_available():
        print("CUTLASS CUDA context: skipped: no CUDA")
        return 0
    cl.initialize_cuda_context()
    print(f"CUTLASS CUDA context: device {cl.device_id()}, nvcc {cl.nvcc_version()}")
    return 0


def nccl() -> int:
    """torch_cp.attention over a 1-rank NCCL group (one GPU holds one rank: NCCL refuses two ranks on
    one device), against the float64 reference, for both merges."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("nccl: skipped: no CUDA")
        return 0
    import torch_cp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    worst = 0.0
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(2, 32, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(2, 8, 8192, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(2, 8, 8192, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        ref, _ = torch_cp.attention_reference(q, k, v)
        for merge in ("all_gather", "all_reduce"):
            out = torch_cp.attention(q, k, v, enable_gqa=True, group=dist.group.WORLD, merge=merge)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            print(f"nccl 1 rank, merge {merge}: |out - ref| / |ref| = {err:.2e}")
    finally:
        dist.destroy_process_group()
    if not worst < 1e-3:
        print(f"nccl: relative error {worst:.2e} is not under 1e-3")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("machine", "verify", "cutlass", "nccl"))
    p.add_argument("--json", type=Path, default=None, help="write the facts here (machine, verify)")
    args = p.parse_args(argv)
    if args.what == "machine":
        facts, failures = machine(), []
    elif args.what == "verify":
        facts, failures = verify()
    else:
        return {"cutlass": cutlass, "nccl": nccl}[args.what]()
    if args.json is not None:
        args.json.write_text(json.dumps(facts, indent=1, default=str))
    for line in failures:
        print(f"FAILED: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

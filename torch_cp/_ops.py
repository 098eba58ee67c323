"""Loads the compiled kernels and registers fake implementations for torch.compile.

The operator schemas are defined in csrc/torch_cp.cpp (`torch.ops.torch_cp.*`); importing
`torch_cp._C` registers them with their CPU kernels, `torch_cp._cuda` (built only where torch has
CUDA) adds the CUDA kernels.
"""

from __future__ import annotations

import importlib
import logging

import torch

__all__ = ["HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "extension_error"]

log = logging.getLogger(__name__)


def _load(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except ImportError as err:
        return False, f"{module} could not be imported ({err})"
    return True, ""


HAS_CPU_KERNELS, _cpu_error = _load("torch_cp._C")
HAS_CUDA_KERNELS, _ = _load("torch_cp._cuda") if HAS_CPU_KERNELS else (False, "")

if not HAS_CPU_KERNELS:
    log.warning(
        "torch_cp C++ kernels are not built (%s); falling back to the pure-PyTorch reference. "
        "Build them with `pip install --no-build-isolation -e .`",
        _cpu_error,
    )


def extension_error() -> str:
    """Why the C++ extension is unavailable, or "" when it is loaded."""
    return _cpu_error


if HAS_CPU_KERNELS:
    # Resolving the op object once also lists it under `torch.ops.torch_cp`.
    merge_states_op = torch.ops.torch_cp.merge_states
    decode_attention_op = torch.ops.torch_cp.decode_attention

    @torch.library.register_fake("torch_cp::merge_states")
    def _merge_states_fake(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out.new_empty(out.shape[1:]), lse.new_empty(lse.shape[1:])

    @torch.library.register_fake("torch_cp::decode_attention")
    def _decode_attention_fake(
        q, k, v, kv_lens, kv_pos, q_pos, scale, softcap, is_causal, window, num_splits, attn_mask=None
    ):
        return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)

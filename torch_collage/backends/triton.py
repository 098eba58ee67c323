"""TorchInductor with Triton code generation on CUDA, plus the project's own Triton kernels.

Inductor fuses the regions it is given into Triton kernels (matmuls and convolutions go to cuBLAS /
cuDNN, or to Triton templates with ``max_autotune``). Where a region holds torch_cp's decode attention
(``torch.ops.torch_cp.decode_attention``, the C++/CUDA op), this backend swaps in torch_cp's Triton
kernel, ``torch.ops.torch_cp.triton_decode_attention`` (same schema, see torch_cp/triton/ops.py),
which Inductor then calls as an opaque kernel. The capability spec claims a decode-attention node
only where that kernel can take it (float32/float16/bfloat16, head dim <= 256, query heads a
multiple of key heads). ``torch_cp::merge_states`` is not claimed: its Triton twin runs the same
merge, and the merge is a tiny part of decode.

Needs ``triton`` and a CUDA device. Unverified on a GPU so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from torch_collage.backends._gpu import (
    check_cuda_inputs,
    cuda_reason,
    dist_version,
    missing_package_reason,
    on_cuda,
)
from torch_collage.backends.base import (
    BackendCompileError,
    deterministic,
    node_tensor_meta,
    op_name,
    runner_spec,
)
from torch_collage.backends.inductor import inductor_compile

__all__ = ["DECODE_ATTENTION_OP", "SPEC", "TritonBackend", "triton_claims"]

_NAME = "triton"
DECODE_ATTENTION_OP = "torch_cp.decode_attention"  # op_name() of torch.ops.torch_cp.decode_attention
_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DECODE_MAX_HEAD_DIM = 256  # torch_cp.triton.launch.MAX_HEAD_DIM (not imported here: it imports triton)


def triton_claims(node: fx.Node) -> bool:
    """Capability of ``triton``: any deterministic ATen op on CUDA tensors (Inductor lowers what it
    knows and calls the rest as ATen kernels), in convex regions; decode attention where torch_cp's
    Triton kernel can take it."""
    if not deterministic(node) or not on_cuda(node):
        return False
    if op_name(node) == DECODE_ATTENTION_OP:
        return decode_attention_supported(node)
    return True


def decode_attention_supported(node: fx.Node) -> bool:
    """Whether torch_cp's Triton decode kernel can run ``node`` (a ``torch_cp.decode_attention`` call):
    q ``[B, Hq, Sq, D]`` and k ``[B, Hkv, L, D]`` from the arguments' fake values."""
    q_arg, k_arg = node.args[0], node.args[1]
    if not isinstance(q_arg, fx.Node) or not isinstance(k_arg, fx.Node):
        return False
    qs, ks = node_tensor_meta(q_arg), node_tensor_meta(k_arg)
    if len(qs) != 1 or len(ks) != 1 or qs[0].dim() != 4 or ks[0].dim() != 4:
        return False
    q, k = qs[0], ks[0]
    return (
        q.dtype in _DECODE_DTYPES
        and 0 < q.shape[-1] <= _DECODE_MAX_HEAD_DIM
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
    )


@dataclass(frozen=True, kw_only=True)
class TritonBackend:
    """``torch.compile(..., backend="inductor")`` on CUDA inputs (Triton kernels), compiled in ``compile``.

    The callable takes CUDA tensors of the example inputs' shapes (a new shape recompiles). TF32 is
    whatever ``torch.backends.cuda.matmul.allow_tf32`` says (off by default), so fp32 stays fp32.
    """

    max_autotune: bool = False  # Inductor's max_autotune: time Triton GEMM/conv templates against ATen's

    @property
    def name(self) -> str:
        return _NAME

    def available(self) -> tuple[bool, str]:
        reason = missing_package_reason(("triton",)) or cuda_reason()
        return (False, reason) if reason else (True, "")

    def version(self) -> str:
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        return (
            f"torch {torch.__version__} inductor, triton {dist_version('triton', 'pytorch-triton')}"
            f"{', max_autotune' if self.max_autotune else ''}"
        )

    def compile(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any]:
        check_cuda_inputs(_NAME, example_inputs)
        module = use_project_kernels(module)
        options: dict[str, str | int | bool | Callable[..., Any]] = {"max_autotune": self.max_autotune}
        return inductor_compile(_NAME, module, example_inputs, options=options)


def use_project_kernels(module: nn.Module) -> nn.Module:
    """``module`` with every ``torch_cp.decode_attention`` call replaced by torch_cp's Triton kernel (a
    copy of the graph; ``module`` itself is left alone). Non-graph modules are returned as they are."""
    if not isinstance(module, fx.GraphModule):
        return module
    targets = [n for n in module.graph.nodes if n.op == "call_function" and op_name(n) == DECODE_ATTENTION_OP]
    if not targets:
        return module
    try:
        import torch_cp.triton.ops  # noqa: F401  (registers torch.ops.torch_cp.triton_decode_attention)
    except ImportError as exc:
        raise BackendCompileError(
            _NAME, f"torch_cp's Triton kernels could not be imported: {exc}", op=DECODE_ATTENTION_OP
        ) from exc
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kernel = torch.ops.torch_cp.triton_decode_attention.default
    for node in module.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and op_name(node) == DECODE_ATTENTION_OP:
            env[node].target = kernel
    return fx.GraphModule(module, graph)


SPEC = runner_spec(_NAME, TritonBackend, supports=triton_claims)

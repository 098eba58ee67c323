"""Judging a low-precision placement against a float32 reference instead of against eager alone.

[Note: low-precision placements against a float32 reference]
A bfloat16 graph placed on several backends rounds at other places than eager does: each backend
keeps its fused intermediates in float32, and the differences add up over the layers. An 8-layer
bfloat16 Llama decode step placed on Inductor, torch_cp and eager was off eager's logits by 1.8% of their
largest value, over the assembled check's bound, so collage ran eager at 17 ms instead of the mix at
8.4 ms, although eager is no closer to the exact result than the mix. So where a placement's
low-precision output fails the check against eager, both are compared with the graph computed in
float32 (every bfloat16/float16 value and dtype argument raised to float32), as PyTorch's dynamo
benchmarks judge accuracy against a higher-precision run: the placement passes when its error from
that reference is at most ``MULTIPLIER`` times eager's own error plus the check's bound. A wrong op
still fails: its error is at the scale of the output, far beyond eager's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["LOW_PRECISION", "MULTIPLIER", "float32_outputs", "is_low_precision", "within_reference"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
MULTIPLIER = 2.0  # the placement's error may be this many times eager's, from the float32 reference


def is_low_precision(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION


def _raise(value: Any) -> Any:
    if is_low_precision(value):
        return value.float()
    if isinstance(value, torch.dtype) and value in LOW_PRECISION:
        return torch.float32
    if isinstance(value, (list, tuple)):
        return type(value)(_raise(v) for v in value)
    return value


class _Float32(fx.Interpreter):
    """Runs a graph with every low-precision tensor, constant and dtype argument raised to float32."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return _raise(super().run_node(n))
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        target: Any = n.target
        return _raise(target(*_raise(args), **{k: _raise(v) for k, v in kwargs.items()}))


def float32_outputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Any] | None:
    """``gm``'s outputs computed in float32 on copies of ``inputs``; None when the graph does not run
    so (an op without a float32 kernel, a dtype the graph checks)."""
    clones = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    try:
        with torch.no_grad():
            out = _Float32(gm).run(*clones)
    except Exception:  # no reference: the caller keeps its verdict
        return None
    return list(out) if isinstance(out, (list, tuple)) else [out]


def within_reference(
    got: Sequence[Any], want: Sequence[Any], ref: Sequence[Any], rtol: float, atol: float
) -> str:
    """Empty when every low-precision output of ``got`` is at most ``MULTIPLIER`` times as far from
    ``ref`` (float32) as eager's ``want`` is, plus ``atol + rtol * max|ref|``; else why not. Other
    outputs are not judged here."""
    for i, (g, w, r) in enumerate(zip(got, want, ref)):
        if not (is_low_precision(w) and isinstance(g, torch.Tensor)):
            continue
        if not isinstance(r, torch.Tensor) or r.shape != w.shape:
            return f"output {i}: no float32 reference"
        g64, w64, r64 = g.double(), w.double(), r.double()
        finite = torch.isfinite(r64) & torch.isfinite(w64)
        if not torch.equal(torch.isfinite(g64), torch.isfinite(w64)) or not finite.any():
            return f"output {i}: NaN or infinity where eager has none (or the reverse)"
        mine = (g64[finite] - r64[finite]).abs().max().item()
        eager = (w64[finite] - r64[finite]).abs().max().item()
        bound = MULTIPLIER * eager + atol + rtol * r64[finite].abs().max().item()
        if mine > bound:
            return (
                f"output {i} is {mine:.3g} from the float32 reference, eager {eager:.3g} "
                f"(allowed {MULTIPLIER:g}x eager's + tolerance: {bound:.3g})"
            )
    return ""

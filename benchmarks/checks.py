"""Checking a backend's outputs against eager's: same structure, same shapes, values within tolerance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "Comparison", "compare_outputs", "flatten_tensors"]

DEFAULT_RTOL = 1e-3  # float outputs match when |out - ref| <= atol + rtol * |ref|, elementwise
DEFAULT_ATOL = 1e-4


def flatten_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) tensor / tuple / list / dict output, in a stable order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for key in sorted(output, key=str) for t in flatten_tensors(output[key])]
    if isinstance(output, tuple | list):
        return [t for item in output for t in flatten_tensors(item)]
    if output is None:
        return []
    raise TypeError(f"cannot compare an output of type {type(output).__name__}")


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing one output against the reference."""

    ok: bool  # structure, shapes, dtypes and values all match within tolerance
    max_abs_err: float | None  # over all float elements; None when the structures differ
    message: str | None = None  # why it does not match, for the results table


def _structure_mismatch(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> str | None:
    if len(refs) != len(outs):
        return f"{len(outs)} output tensors, expected {len(refs)}"
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        if r.shape != o.shape:
            return f"output {i}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        if r.dtype != o.dtype:
            return f"output {i}: dtype {o.dtype}, expected {r.dtype}"
    return None


def _value_error(ref: torch.Tensor, out: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    if not ref.is_floating_point():  # integer and bool outputs must match exactly
        rtol, atol = 0.0, 0.0
    ref64, out64 = ref.detach().to(torch.float64), out.detach().to(ref.device, torch.float64)
    if ref64.numel() == 0:
        return 0.0, True
    close = torch.isclose(out64, ref64, rtol=rtol, atol=atol, equal_nan=True)
    same = (out64 == ref64) | (out64.isnan() & ref64.isnan())  # also equal infinities and NaN pairs
    diff = (out64 - ref64).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"))
    return float(diff.max()), bool(close.all())


def compare_outputs(
    reference: Any, output: Any, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> Comparison:
    """Compare ``output`` with ``reference`` (eager's); integer tensors must match exactly."""
    refs, outs = flatten_tensors(reference), flatten_tensors(output)
    problem = _structure_mismatch(refs, outs)
    if problem is not None:
        return Comparison(ok=False, max_abs_err=None, message=problem)
    worst, bad = 0.0, []
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        err, ok = _value_error(r, o, rtol, atol)
        worst = max(worst, err)
        if not ok:
            bad.append(i)
    if not bad:
        return Comparison(ok=True, max_abs_err=worst)
    message = f"outputs {bad} differ beyond rtol={rtol:g}, atol={atol:g} (max abs err {worst:.3g})"
    return Comparison(ok=False, max_abs_err=worst, message=message)

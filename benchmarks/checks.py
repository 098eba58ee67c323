"""Checking a backend's outputs against eager's: same structure, same shapes, values within tolerance."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ERROR_FACTOR",
    "Comparison",
    "compare_outputs",
    "compare_to_float64",
    "flatten_tensors",
    "float64_reference",
]

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


# [Note: checking against float64]
# Deep float32 networks (ResNeXt-50's 16 blocks) differ from eager by 5e-4 whatever the backend,
# because every runtime sums in its own order. So each output is compared with the model run in
# float64, and a backend passes when its error is at most ERROR_FACTOR times eager's own float32
# error (plus a floor of atol * max|reference| for outputs eager gets exactly right).
ERROR_FACTOR = 8.0


def float64_reference(module: torch.nn.Module, inputs: tuple) -> Any:
    """The module's output in float64 on the same inputs (float inputs promoted, integer ones kept)."""
    module64 = copy.deepcopy(module).double()
    args = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        return module64(*args)


def compare_to_float64(
    reference64: Any, eager: Any, output: Any, *, factor: float = ERROR_FACTOR, atol: float = 1e-6
) -> Comparison:
    """Compare ``output`` with eager's within ``factor`` times eager's own error against ``reference64``.

    See [Note: checking against float64]. ``max_abs_err`` is the largest difference from eager, as in
    :func:`compare_outputs`; integer outputs must equal eager's exactly.
    """
    refs, eagers, outs = flatten_tensors(reference64), flatten_tensors(eager), flatten_tensors(output)
    problem = _structure_mismatch(eagers, outs)
    if problem is not None:
        return Comparison(ok=False, max_abs_err=None, message=problem)
    worst, bad = 0.0, []
    for i, (r, e, o) in enumerate(zip(refs, eagers, outs, strict=True)):
        worst = max(worst, _value_error(e, o, 0.0, 0.0)[0])
        if not e.is_floating_point():
            if not torch.equal(e, o):
                bad.append(f"output {i} (integer) differs from eager")
            continue
        r64 = r.detach().to(torch.float64)
        eager_err = float((e.detach().double() - r64).abs().max()) if r64.numel() else 0.0
        err = float((o.detach().double() - r64).abs().max()) if r64.numel() else 0.0
        limit = factor * eager_err + atol * float(r64.abs().max() if r64.numel() else 0.0)
        if not err <= limit:  # also catches NaN
            bad.append(f"output {i}: error vs float64 {err:.2g} > {factor:g}x eager's {eager_err:.2g}")
    return Comparison(ok=not bad, max_abs_err=worst, message="; ".join(bad) or None)

"""Pure-PyTorch references: the oracles the kernels are tested against."""

from __future__ import annotations

import torch

__all__ = ["merge_states_reference"]


def merge_states_reference(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of N partial attention states, computed in float64 (or float32 with float32 inputs).

    See [Note: merge of partial states] in csrc/cpu/merge_states.cpp.

    Args:
        out: ``[N, *rows, D]`` partial outputs, each normalised over its own keys.
        lse: ``[N, *rows]`` natural-log log-sum-exp of each part's scores; ``-inf`` for an empty part.

    Returns:
        ``(out [*rows, D]`` in ``out.dtype``, ``lse [*rows]``)``; lse is float64 when either input is
        float64 (the oracle's precision), float32 otherwise.
    """
    compute = torch.float64 if out.dtype == torch.float64 or lse.dtype == torch.float64 else torch.float32
    o, lse_c = out.to(compute), lse.to(compute)
    merged_lse = torch.logsumexp(lse_c, dim=0)
    finite = torch.isfinite(merged_lse)
    weight = torch.where(finite, torch.exp(lse_c - merged_lse), torch.zeros_like(lse_c))
    merged = (weight.unsqueeze(-1) * o).sum(dim=0)
    return merged.to(out.dtype), merged_lse

"""Merging partial attention states across the ranks of a process group.

Two strategies (see [Note: merge of partial states] in csrc/cpu/merge.h):

* ``"all_gather"`` (default): every rank gathers the packed ``(out ‖ lse)`` of all ranks and merges
  them locally: one collective, ``P·(D+1)`` floats per query row received.
* ``"all_reduce"``: an all-reduce(max) of the lse, then an all-reduce(sum) of ``exp(lse - max)·out``
  and ``exp(lse - max)``: two collectives of ``1`` and ``D+1`` floats per row (as Tree Attention does).

Both give the same result on every rank. gloo has no list ``all_to_all``, so neither uses one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from torch_cp._checks import describe_signature
from torch_cp.merge import merge_states

__all__ = ["MergeMethod", "check_ranks_agree", "gather_positions", "merge_across_ranks"]

MergeMethod = Literal["all_gather", "all_reduce"]


def _all_gather_merge(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    stacked = torch.stack(parts)
    return merge_states(stacked[..., :-1], stacked[..., -1])


def _all_reduce_merge(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """See [Note: merge of partial states]: NaN rows travel in the sum (a MAX may drop a NaN)."""
    nan_row = lse.isnan() | (lse == float("inf"))
    empty = lse == float("-inf")
    global_max = lse.masked_fill(nan_row, float("-inf"))
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    finite = torch.isfinite(global_max)
    weight = torch.exp(lse - global_max.where(finite, 0.0)).masked_fill(empty, 0.0)
    weight = weight.masked_fill(nan_row, float("nan"))
    # an empty part's out is never used, whatever it holds
    weighted = torch.where(empty.unsqueeze(-1), 0.0, out * weight.unsqueeze(-1))
    packed = torch.cat([weighted, weight.unsqueeze(-1)], dim=-1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total = packed[..., -1]
    none = total == 0  # every rank empty: 0 and -inf, never NaN
    merged = packed[..., :-1] / total.masked_fill(none, 1.0).unsqueeze(-1)
    merged_lse = torch.where(none, float("-inf"), global_max.where(finite, 0.0) + torch.log(total))
    return merged.masked_fill(none.unsqueeze(-1), 0.0), merged_lse


def merge_across_ranks(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup, method: MergeMethod = "all_gather"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of this rank's partial state with those of the other ranks of ``group``.

    Args:
        out: ``[B, H, Sq, D]`` float32 partial output over this rank's keys.
        lse: ``[B, H, Sq]`` float32 natural-log log-sum-exp; ``-inf`` where this rank has no visible key.
        group: the process group the KV cache is sharded over.
        method: ``"all_gather"`` or ``"all_reduce"`` (see the module docstring).

    Returns:
        ``(out [B, H, Sq, D], lse [B, H, Sq])`` float32, identical on every rank.
    """
    if method == "all_gather":
        return _all_gather_merge(out, lse, group)
    if method == "all_reduce":
        return _all_reduce_merge(out, lse, group)
    raise ValueError(f"merge: expected 'all_gather' or 'all_reduce', got {method!r}")


def gather_positions(
    kv_lens: torch.Tensor, kv_len: int, q_len: int, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global key positions of contiguous shards laid out in rank order, and the first query position.

    Rank ``r`` holds keys ``[offset_r, offset_r + kv_lens)`` with ``offset_r`` the sum of the valid
    lengths of the ranks before it; the queries are the last ``q_len`` positions of the whole sequence.

    Returns:
        ``kv_pos [B, kv_len]`` int64 and ``q_pos [B]`` int64.
    """
    lens = kv_lens.to(torch.int64).contiguous()
    all_lens = [torch.empty_like(lens) for _ in range(dist.get_world_size(group))]
    dist.all_gather(all_lens, lens, group=group)
    stacked = torch.stack(all_lens)  # [P, B]
    rank = dist.get_rank(group)
    offset = stacked[:rank].sum(dim=0)
    kv_pos = offset[:, None] + torch.arange(kv_len, device=lens.device)[None, :]
    return kv_pos, stacked.sum(dim=0) - q_len


def _signature_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ranks_agree(signature: list[int], group: dist.ProcessGroup) -> None:
    """Raises ValueError on every rank when the ranks of ``group`` sent different ``signature``s.

    [Note: ranks agree on the call]
    A rank whose shapes or options differ from its peers' would post collectives of other sizes or
    another count: gloo then fills a receive buffer halfway, aborts the process, or waits until the
    group's timeout. So before any data moves, every call all-gathers a small fixed-size int64
    signature of what must agree (shapes, dtype, options; see ``torch_cp._checks.call_signature``),
    and every rank raises the same error naming the ranks and what differs. A rank whose own
    arguments were refused sends an all-zero signature, so its peers raise instead of waiting. The
    all-gather is one per call, not cached: a rank cannot know that its peers' calls did not change.
    """
    mine = torch.tensor(signature, dtype=torch.int64, device=_signature_device(group))
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    problem = describe_signature([row.tolist() for row in rows], dist.get_rank(group))
    if problem:
        raise ValueError(f"attention: {problem}")

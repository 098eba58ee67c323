"""Point-to-point messages between stages over ``torch.distributed``.

[Note: one message per edge]
All tensors a stage sends to one peer for one micro-batch (activations forward, gradients backward)
are packed into one ``uint8`` buffer, each tensor's bytes starting at a 16-byte boundary, and go as
one message. The receiver knows every shape from the shape oracle, allocates the buffer, and takes
views of it. Sends are ``isend`` and never wait (their buffers are kept until ``flush``); receives
wait, in the schedule's order; the consecutive sends and receives between two computations are
posted as one batch. Messages between a pair of ranks in one direction are matched in order, which
the schedule keeps (micro-batches in ascending order on every edge).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from torch_graphpipe.shape_oracle import TensorSpec

__all__ = ["P2P", "PeerError", "pack", "packed_size", "unpack"]

log = logging.getLogger(__name__)

_ALIGN = 16


class PeerError(RuntimeError):
    """A message to or from another stage failed (peer died, timed out, or the group broke)."""


def _offsets(specs: Sequence[TensorSpec]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        total += -(-spec.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def packed_size(specs: Sequence[TensorSpec]) -> int:
    """Bytes of the buffer that carries tensors of these specs."""
    return _offsets(specs)[1]


def pack(tensors: Sequence[torch.Tensor], specs: Sequence[TensorSpec], device: torch.device) -> torch.Tensor:
    """One ``uint8`` buffer holding ``tensors`` (which must match ``specs``)."""
    offsets, total = _offsets(specs)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for t, spec, off in zip(tensors, specs, offsets):
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise ValueError(
                f"value of shape {tuple(t.shape)} {t.dtype} does not match the expected {spec.shape} {spec.dtype}"
            )
        buf[off : off + spec.nbytes].view(spec.dtype).copy_(t.detach().reshape(-1))
    return buf


def unpack(buf: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Views of ``buf`` with the given specs (leaves without autograd history)."""
    offsets, _ = _offsets(specs)
    return [buf[off : off + s.nbytes].view(s.dtype).view(s.shape) for s, off in zip(specs, offsets)]


class P2P:
    """Sends and receives between the stages (group ranks) of one process group."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self._pending: list[tuple[dist.Work, torch.Tensor, str, int]] = []  # (work, buffer, doing, peer)

    def exchange(
        self, sends: Sequence[tuple[int, torch.Tensor, str]], recvs: Sequence[tuple[int, int, str]]
    ) -> list[torch.Tensor]:
        """Post ``sends`` ``(peer, buffer, what)`` and receives ``(peer, nbytes, what)`` together; wait for
        the receives and return their buffers. Send buffers are kept until :meth:`flush`.

        The messages go as one ``batch_isend_irecv``: one NCCL group, so that a send and a receive
        between the same two ranks, posted in opposite orders by the two sides, cannot block each other.
        """
        ops: list[dist.P2POp] = []
        labels: list[tuple[str, int, torch.Tensor | None]] = []
        for peer, buf, what in sends:
            if buf.numel():
                ops.append(dist.P2POp(dist.isend, buf, group=self.group, group_peer=peer))
                labels.append((f"sending {what} to", peer, buf))
        bufs = [torch.empty(n, dtype=torch.uint8, device=self.device) for _, n, _ in recvs]
        for (peer, _, what), buf in zip(recvs, bufs):
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, group=self.group, group_peer=peer))
                labels.append((f"receiving {what} from", peer, None))
        if ops:
            self._post(ops, labels)
        return bufs

    def _post(self, ops: list[dist.P2POp], labels: list[tuple[str, int, torch.Tensor | None]]) -> None:
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise self._error(labels[0][0], labels[0][1], exc) from exc
        if len(works) != len(ops):  # coalesced (NCCL): one work for the whole batch
            for work in works:
                self._wait(work, " and ".join(doing for doing, _, _ in labels), labels[0][1])
            return
        for work, (doing, peer, buf) in zip(works, labels):
            if buf is not None:
                self._pending.append((work, buf, doing, peer))
        for work, (doing, peer, buf) in zip(works, labels):
            if buf is None:
                self._wait(work, doing, peer)

    def flush(self) -> None:
        """Wait until every started send has completed."""
        pending, self._pending = self._pending, []
        for work, _, doing, peer in pending:
            self._wait(work, doing, peer)

    def _wait(self, work: dist.Work, doing: str, peer: int) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise self._error(doing, peer, exc) from exc

    def _error(self, doing: str, peer: int, exc: Exception) -> PeerError:
        peer_global = dist.get_global_rank(self.group, peer)
        return PeerError(
            f"stage {self.rank} failed {doing} stage {peer} (global rank {peer_global}): "
            f"{type(exc).__name__}: {exc}. Is rank {peer_global} alive?"
        )

"""Ranks agree before they act: one small collective, then every rank goes on or every rank raises.

[Note: ranks agree first]
A call that every rank makes must not go ahead on some ranks and fail on others. Ranks that passed
batches of different shapes to ``GraphPipe.step`` left one rank computing from a half-filled receive
buffer and another killed by SIGABRT inside gloo; a strict ``load_state_dict`` that failed on the
rank owning a missing key left the other ranks loaded, the model half old and half new. So each rank
first checks what it can alone, then the ranks compare a few int64s: a digest of the call's
signature and a flag for a failed local check. Group rank 0 receives every rank's numbers, decides,
and sends every rank the verdict; only when the ranks differ do they gather the details
(``all_gather_object``) and raise the same error, naming every rank at fault, on every rank. The
exchange goes as point-to-point messages rather than one all-reduce so that a rank that died or
hangs is named (``PeerError``, as for the pipeline's own messages): rank 0 sees which rank did not
answer, and tells the others. It runs on every call, not only when a rank's own shapes change: a
rank that skipped it while another entered it would leave both waiting until the group's timeout.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from torch_graphpipe.wire import PeerError

__all__ = ["CallSignature", "agree_on_call", "agree_on_verdict", "describe_leaves"]

_NONE = -1  # the target digest of a rank without a target (digests are >= 0)
_AGREED, _DISAGREED, _ABSENT = 0, 1, 2  # verdicts; _ABSENT + r: group rank r did not answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallSignature:
    """What every rank's call must share; see [Note: ranks agree first]."""

    call: str  # the method called ("step", "forward")
    inputs: tuple[str, ...]  # per input leaf, its path and dtype[shape] (or value)
    target: tuple[str, ...] | None  # per target leaf on a rank that computes the loss, else None
    num_microbatches: int  # micro-batches per replica
    training: bool  # the module's mode (it decides the shapes of the values sent)

    def digest(self) -> int:
        return _digest((self.call, self.inputs, self.num_microbatches, self.training))

    def target_digest(self) -> int:
        return _NONE if self.target is None else _digest(self.target)


def describe_leaves(value: Any, name: str) -> tuple[str, ...]:
    """``("inputs[0]: torch.float32[8, 16]", ...)``: each leaf's path, and dtype and shape (tensors)
    or value (other leaves, e.g. sizes and flags that the shape oracle takes as constants)."""
    leaves, _ = pytree.tree_flatten_with_path(value)
    out = []
    for path, leaf in leaves:
        what = f"{leaf.dtype}{list(leaf.shape)}" if isinstance(leaf, torch.Tensor) else _short(repr(leaf))
        out.append(f"{name}{pytree.keystr(path)}: {what}")
    return tuple(out)


def agree_on_call(
    signature: CallSignature, error: str | None, label: str, group: dist.ProcessGroup, device: torch.device
) -> None:
    """Return on every rank, or raise the same ``ValueError`` on every rank when the ranks' signatures
    differ (the target's among the ranks that have one) or a rank's own ``error`` is set. ``label``
    names this rank in the message (e.g. ``"rank 1 (stage 1)"``)."""
    numbers = [signature.digest(), signature.target_digest(), int(error is not None)]
    vec = torch.tensor(numbers, dtype=torch.int64, device=device)
    if _exchange(vec, _calls_agree, group, f"GraphPipe.{signature.call}"):
        return
    gathered = _gather((label, signature, error), group, device)
    raise ValueError(
        f"GraphPipe.{signature.call}: the ranks' calls disagree, nothing was sent: {_disagreement(gathered)}"
    )


def agree_on_verdict(
    problem: str | None, label: str, call: str, group: dist.ProcessGroup, device: torch.device
) -> list[str]:
    """Every rank's ``"label: problem"``, the same list on every rank; ``[]`` when no rank has one."""
    vec = torch.tensor([problem is not None], dtype=torch.int64, device=device)
    if _exchange(vec, lambda rows: not bool(rows.any()), group, call):
        return []
    return [f"{who}: {p}" for who, p in _gather((label, problem), group, device) if p is not None]


def _calls_agree(rows: torch.Tensor) -> bool:
    digests, targets, failed = (list(column) for column in zip(*rows.tolist()))
    given = {t for t in targets if t != _NONE}
    return len(set(digests)) == 1 and len(given) <= 1 and not any(failed)


def _exchange(
    vec: torch.Tensor, agree: Callable[[torch.Tensor], bool], group: dist.ProcessGroup, call: str
) -> bool:
    """Rank 0 gathers every rank's ``vec`` (one row each), applies ``agree`` and tells every rank."""
    code = _decide(vec, agree, group, call) if dist.get_rank(group) == 0 else _ask(vec, group, call)
    if code >= _ABSENT:
        raise _absent(group, code - _ABSENT, call, "did not answer rank 0")
    return code == _AGREED


def _decide(
    vec: torch.Tensor, agree: Callable[[torch.Tensor], bool], group: dist.ProcessGroup, call: str
) -> int:
    rows = [vec] + [torch.empty_like(vec) for _ in range(1, dist.get_world_size(group))]
    absent = _receive_rows(rows, group)
    code = _AGREED if agree(torch.stack(rows)) else _DISAGREED
    if absent is not None:
        code = _ABSENT + absent[0]
    answer = torch.tensor([code], dtype=torch.int64, device=vec.device)
    told = [r for r in range(1, len(rows)) if absent is None or r != absent[0]]
    sends = [(r, dist.isend(answer, group=group, group_dst=r)) for r in told]
    for r, work in sends:
        _talk(_posted(work), group, r, call)
    if absent is not None:
        raise _absent(group, absent[0], call, f"did not answer: {type(absent[1]).__name__}: {absent[1]}")
    return code


def _receive_rows(rows: list[torch.Tensor], group: dist.ProcessGroup) -> tuple[int, Exception] | None:
    """Fill ``rows[1:]`` from ranks 1.. (rank 0's row is its own); the first rank that failed, if any."""
    works = [(r, dist.irecv(rows[r], group=group, group_src=r)) for r in range(1, len(rows))]
    absent: tuple[int, Exception] | None = None
    for r, work in works:
        try:
            _wait(work)
        except RuntimeError as exc:
            absent = absent or (r, exc)
    return absent


def _ask(vec: torch.Tensor, group: dist.ProcessGroup, call: str) -> int:
    answer = torch.empty(1, dtype=torch.int64, device=vec.device)
    _talk(lambda: dist.isend(vec, group=group, group_dst=0), group, 0, call)
    _talk(lambda: dist.irecv(answer, group=group, group_src=0), group, 0, call)
    return int(answer.item())


def _talk(post: Callable[[], dist.Work | None], group: dist.ProcessGroup, peer: int, call: str) -> None:
    try:
        _wait(post())
    except RuntimeError as exc:
        raise _absent(group, peer, call, f"did not answer: {type(exc).__name__}: {exc}") from exc


def _posted(work: dist.Work | None) -> Callable[[], dist.Work | None]:
    """A request already posted, for :func:`_talk`."""
    return lambda: work


def _wait(work: dist.Work | None) -> None:
    if work is not None:
        work.wait()


def _absent(group: dist.ProcessGroup, peer: int, call: str, what: str) -> PeerError:
    glob = dist.get_global_rank(group, peer)
    return PeerError(
        f"{call}: rank {peer} of the process group (global rank {glob}) {what}, before any data moved. "
        f"Is rank {glob} alive?"
    )


def _gather(obj: Any, group: dist.ProcessGroup, device: torch.device) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    if device.type == "cuda":  # all_gather_object moves the pickles through the current device
        torch.cuda.set_device(device)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _disagreement(gathered: Sequence[tuple[str, CallSignature, str | None]]) -> str:
    """Each rank's own error, then each rank whose call differs from the most common one."""
    lines = [f"{who}: {error}" for who, _, error in gathered if error is not None]
    ref_who, ref = _most_common([(who, dataclasses.replace(sig, target=None)) for who, sig, _ in gathered])
    for who, sig, _ in gathered:
        lines += [f"{who} {mine} where {ref_who} {theirs}" for mine, theirs in _differences(sig, ref)]
    targets = [(who, sig.target) for who, sig, _ in gathered if sig.target is not None]
    if targets:
        ref_who, ref_target = _most_common(targets)
        for who, target in targets:
            mine, theirs = _first_difference(target, ref_target)
            if mine is not None:
                lines.append(f"{who} passed {mine} where {ref_who} passed {theirs}")
    return "; ".join(lines)


def _most_common(items: Sequence[tuple[str, Any]]) -> tuple[str, Any]:
    """The first rank holding the value most ranks hold (the odd ones out are then named)."""
    counts = Counter(value for _, value in items)
    return max(items, key=lambda item: counts[item[1]])  # max keeps the first of equals


def _differences(sig: CallSignature, ref: CallSignature) -> list[tuple[str, str]]:
    out = []
    if sig.call != ref.call:
        out.append((f"called {sig.call}()", f"called {ref.call}()"))
    mine, theirs = _first_difference(sig.inputs, ref.inputs)
    if mine is not None:
        out.append((f"passed {mine}", f"passed {theirs}"))
    if sig.num_microbatches != ref.num_microbatches:
        out.append((f"has num_microbatches={sig.num_microbatches}", f"has {ref.num_microbatches}"))
    if sig.training != ref.training:
        out.append((_mode(sig.training), _mode(ref.training)))
    return out


def _first_difference(mine: Sequence[str], theirs: Sequence[str]) -> tuple[str | None, str | None]:
    for a, b in zip_longest(mine, theirs, fillvalue="nothing more"):
        if a != b:
            return a, b
    return None, None


def _mode(training: bool) -> str:
    return "is in training mode" if training else "is in eval mode"


def _digest(value: Any) -> int:
    """A 62-bit digest that is the same in every process (``hash`` of a str is not)."""
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 2


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

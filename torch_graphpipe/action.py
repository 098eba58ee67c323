"""One step of a stage's schedule, with a string form that round-trips.

``"3F2"``: stage 3 runs the forward of micro-batch 2; ``"3B2"`` its backward. A stage split at a late
input (see [Note: late inputs] in torch_graphpipe/schedule.py) runs its forward in two parts, ``"3F2"``
then ``"3FL2"`` (the part that reads the late input), and its backward in the reverse order,
``"3BL2"`` then ``"3B2"``. A zero-bubble schedule (see [Note: zero-bubble DAG schedule] in
torch_graphpipe/zero_bubble.py) splits a backward: ``"3B2"`` computes the input gradients only and
``"3W2"`` the weight gradients, later.
``"3SEND_F2>5"``: stage 3 sends the activations of micro-batch 2 to stage 5;
``"5RECV_F2<3"``: stage 5 receives them from stage 3. ``SEND_B`` / ``RECV_B`` carry gradients back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, cast

__all__ = ["Action", "ActionKind"]

ActionKind = Literal["F", "B", "FL", "BL", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
_COMPUTE = ("F", "B", "FL", "BL", "W")
_FORWARD = ("F", "FL", "SEND_F", "RECV_F")
_PATTERN = re.compile(r"^(\d+)(FL|BL|F|B|W|SEND_F|RECV_F|SEND_B|RECV_B)(\d+)(?:([<>])(\d+))?$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Action:
    """What ``stage`` does to ``microbatch``; sends and receives name the ``peer`` stage."""

    stage: int  # stage that performs the action
    kind: ActionKind  # F / B / W compute (FL / BL: late part; W: weight gradients), or a send / receive of activations (F) or gradients (B)
    microbatch: int  # micro-batch index, from 0
    peer: int | None = None  # the other stage of a send or receive; None for compute

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got {self.stage}, {self.microbatch}")
        if self.kind not in (*_COMPUTE, "SEND_F", "RECV_F", "SEND_B", "RECV_B"):
            raise ValueError(f"unknown action kind {self.kind!r}")
        if (self.kind in _COMPUTE) != (self.peer is None):
            raise ValueError(f"{self.kind} action needs {'no' if self.kind in _COMPUTE else 'a'} peer")
        if self.peer is not None and (self.peer < 0 or self.peer == self.stage):
            raise ValueError(f"bad peer {self.peer} for stage {self.stage}")

    @property
    def is_compute(self) -> bool:
        return self.kind in _COMPUTE

    @property
    def is_send(self) -> bool:
        return self.kind.startswith("SEND")

    @property
    def is_recv(self) -> bool:
        return self.kind.startswith("RECV")

    @property
    def phase(self) -> Literal["F", "B"]:
        """ "F" for forward traffic and compute, "B" for backward."""
        return "F" if self.kind in _FORWARD else "B"

    def __str__(self) -> str:
        base = f"{self.stage}{self.kind}{self.microbatch}"
        if self.peer is None:
            return base
        return f"{base}{'>' if self.is_send else '<'}{self.peer}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str``: ``Action.parse(str(a)) == a``."""
        match = _PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"cannot parse action {text!r} (expected e.g. '3F2', '3SEND_F2>5')")
        stage, kind, mb, arrow, peer = match.groups()
        if arrow is not None and arrow != (">" if kind.startswith("SEND") else "<"):
            raise ValueError(f"action {text!r}: sends use '>' and receives '<'")
        return cls(
            stage=int(stage),
            kind=cast(ActionKind, kind),
            microbatch=int(mb),
            peer=None if peer is None else int(peer),
        )

"""Choose and verify: the searched placement against the close single backends, end to end, side by
side; then the winner checked against eager on the recorded values.

[Note: end-to-end check]
Partition costs are measured alone; assembled, runtimes interfere (ONNX Runtime and OpenVINO thread
pools hand cores over, tensors are converted at boundaries). So the searched placement is assembled
and measured end to end beside every whole-graph single backend whose own cost was within
``CLOSE_FACTOR`` of the best one ([Note: paired end-to-end rounds] in endtoend.py); the fastest is
chosen, a single backend on a tie or when a mixed placement wins by less than ``MIXED_MARGIN``.
Timing the singles again matters as much as checking a mixed placement: each had one cost
measurement, taken minutes apart on a shared machine, and one such measurement picked ONNX Runtime
for dlrm at 3.6 ms where OpenVINO runs it in 2.5 ms. The factor is wide because such outliers are
large (OpenVINO's whole resnext50 once measured 361 ms in the search and 240 ms side by side). The
whole graphs were compiled while measuring and are reused, and the end-to-end times are cached, so
a warm compile measures nothing.

[Note: a mixed placement must win clearly]
A mixed placement is kept only if it measures at least ``MIXED_MARGIN`` faster end to end than the
fastest single backend timed beside it. Its time varies more than a single backend's: each boundary
hands the cores from one runtime's thread pool to another's, and how long the previous pool's
threads keep spinning depends on what else the machine does (a placement that won the search by a
few percent on candle_uno ran 1.11-1.32x OpenVINO's whole graph in later runs). A win of a few
percent is not worth that risk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from torch_collage.assembly import AssembledGraph
from torch_collage.cost import copy_strided, outputs_match
from torch_collage.endtoend import EndToEnd, assemble
from torch_collage.graph import DataflowGraph
from torch_collage.search import Partition, Placement

__all__ = ["CLOSE_FACTOR", "MIXED_MARGIN", "Choice", "choose", "single", "verify"]

logger = logging.getLogger(__name__)

# Whole-graph backends measured within this factor of the best one are timed again, side by side,
# before one is chosen; see [Note: end-to-end check].
CLOSE_FACTOR = 1.5
MIXED_MARGIN = 0.05  # [Note: a mixed placement must win clearly]


@dataclass(frozen=True)
class Choice:
    """What runs: the assembled graph, its end-to-end ms, ``"mixed"`` or the single backend chosen, and
    each contender's end-to-end ms (empty when the searched placement had no contender)."""

    assembled: AssembledGraph
    measured_ms: float
    chosen: str
    compared: dict[str, float] = field(default_factory=dict)


def single(graph: DataflowGraph, backend: str, ms: float) -> Placement:
    """The whole graph on ``backend``."""
    return Placement((Partition(graph.full, backend, ms),), ms)


def choose(e2e: EndToEnd, placement: Placement, singles: dict[str, float]) -> Choice:
    """The fastest end to end of the searched ``placement`` and the single backends (whole-graph ms
    in ``singles``) within ``CLOSE_FACTOR`` of the best; see [Note: end-to-end check]."""
    graph = e2e.graph
    whole = len(placement.partitions) == 1 and placement.partitions[0].mask == graph.full
    searched = placement.partitions[0].backend if whole else "mixed"
    contenders = [*_close_singles(graph, singles, searched), (searched, placement)]  # a tie: a single
    if len(contenders) == 1:
        lazy = e2e.lazy(placement)
        return Choice(lazy(), e2e.times([placement])[0], searched)
    times = e2e.times([p for _, p in contenders], rounds=3)
    compared = {name: ms for (name, _), ms in zip(contenders, times)}
    logger.debug("torch_collage: end to end: %s", ", ".join(f"{n} {ms:.3f} ms" for n, ms in compared.items()))
    k = min(range(len(times)), key=lambda i: times[i])
    if contenders[k][0] == "mixed":
        k = _unless_clear_win(contenders, times, k)
    elif contenders[k][0] != searched:
        logger.info(
            "torch_collage: %s placement %.3f ms end to end, %s %.3f ms; using %s",
            searched, times[-1], contenders[k][0], times[k], contenders[k][0],
        )  # fmt: skip
    return Choice(e2e.lazy(contenders[k][1])(), times[k], contenders[k][0], compared)


def _close_singles(
    graph: DataflowGraph, singles: dict[str, float], searched: str
) -> list[tuple[str, Placement]]:
    finite = {b: ms for b, ms in singles.items() if math.isfinite(ms)}
    if not finite:
        return []
    best = min(finite.values())
    ranked = sorted(finite.items(), key=lambda kv: kv[1])
    return [(b, single(graph, b, ms)) for b, ms in ranked if b != searched and ms <= best * CLOSE_FACTOR]


def _unless_clear_win(contenders: Sequence[tuple[str, Placement]], times: Sequence[float], k: int) -> int:
    """``k`` (the mixed placement), or the fastest single backend where ``k`` did not win by
    ``MIXED_MARGIN`` ([Note: a mixed placement must win clearly])."""
    singles_timed = [i for i, (name, _) in enumerate(contenders) if name != "mixed"]
    if not singles_timed:
        return k
    fastest = min(singles_timed, key=lambda i: times[i])
    if times[k] * (1 + MIXED_MARGIN) <= times[fastest]:
        return k
    name = contenders[fastest][0]
    logger.info(
        "torch_collage: mixed placement %.3f ms end to end, %s %.3f ms: less than %.0f%% faster; using %s",
        times[k], name, times[fastest], 100 * MIXED_MARGIN, name,
    )  # fmt: skip
    return fastest


def verify(e2e: EndToEnd, choice: Choice, inputs: Sequence[Any]) -> Choice:
    """``choice`` if its assembled graph matches eager on the recorded values; else eager (logged).

    A placement of one partition needs no second check: its callable was checked against eager on
    these same values when it was compiled or loaded (``CostModel._check``)."""
    if len(choice.assembled.steps) <= 1:
        return choice
    model, gm = e2e.model, e2e.gm
    want = list(fx.node.map_arg(_outputs(gm), lambda n: model.values[n]))
    with torch.no_grad(), model.replaying_rng():
        got = list(choice.assembled(*[copy_strided(x) if isinstance(x, torch.Tensor) else x for x in inputs]))
    reason = outputs_match(got, want, model.options.rtol * 10, model.options.atol * 10)
    if not reason:
        return choice
    logger.warning("torch_collage: assembled placement differs from eager (%s); running eager", reason)
    eager = assemble(gm, single(e2e.graph, "eager", 0.0), model)
    return Choice(eager, choice.measured_ms, "eager", choice.compared)


def _outputs(gm: fx.GraphModule) -> Any:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]

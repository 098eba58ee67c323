"""Deterministic operator costs for the zoo models, and noisy draws of them (for the plan-stability tests).

``flop_costs`` times every operator by its floating-point operations (``torch.utils.flop_counter``) plus
its output bytes and a per-call overhead: a stand-in for a profile that is the same on every machine.
``noisy`` multiplies every operator's times by an independent factor in ``[1 - level, 1 + level]``, as
repeated profiles of one machine differ, and says so in the table's spreads.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from torch_graphpipe import CapturedGraph, CommModel, CostTable, capture, profile_graph
from torch_graphpipe.stable import NOTCH

__all__ = ["flop_costs", "noisy", "zoo_case"]

FLOPS_PER_MS = 2.0e6  # a slow device, so the tiny models' costs are milliseconds
BYTES_PER_MS = 2.0e6  # memory traffic of elementwise work
OVERHEAD_MS = 0.01  # per operator call


def zoo_case(name: str, batch: int = 8) -> tuple[CapturedGraph, tuple[Any, ...]]:
    """The captured tiny zoo model ``name`` and a batch of its inputs."""
    from torch_zoo import get_model

    spec = get_model(name)
    model = spec.build("tiny").train()
    inputs = spec.example_inputs("tiny", batch, seed=0)
    return capture(model, (), inputs), inputs


def flop_costs(captured: CapturedGraph, inputs: tuple[Any, ...], comm: CommModel | None = None) -> CostTable:
    """Costs of every operator of ``captured`` on ``inputs``; see the module docstring. Bytes, what each
    operator saves for backward and which operators do the same work come from one profile."""
    gm = captured.graph_module
    profiled = profile_graph(gm, captured.graph, inputs, repeats=1)
    flops: dict[str, int] = {}
    out_bytes: dict[str, int] = {}

    class Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            flops[n.name] = counter.get_total_flops()
            out_bytes[n.name] = sum(
                t.numel() * t.element_size()
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor)
            )
            return out

    with torch.no_grad():
        Counting(gm).run(*inputs)
    ops = {}
    for node in captured.graph.nodes:
        weighted = node.kind == "module" and any(True for _ in gm.get_submodule(node.target).parameters())
        fwd = OVERHEAD_MS + flops[node.name] / FLOPS_PER_MS + out_bytes[node.name] / BYTES_PER_MS
        bwd = 2 * fwd if weighted else fwd
        ops[node.name] = dataclasses.replace(
            profiled.ops[node.name],
            fwd_ms=fwd,
            bwd_ms=bwd,
            wgt_ms=bwd / 2 if weighted else 0.0,
            fwd_spread_ms=0.0,
            bwd_spread_ms=0.0,
        )
    return CostTable(ops=ops, comm=comm or CommModel(alpha_ms=0.05, bytes_per_ms=1.0e6), microbatch_size=1)


def noisy(costs: CostTable, level: float, seed: int, *, per_signature: bool = False) -> CostTable:
    """``costs`` with every operator's times scaled by its own factor drawn from ``1 +- level`` (one
    factor per signature with ``per_signature``: a profile pools the samples of operators doing the
    same work, so they move together), and the uncertainty a profile with that noise reports: spreads
    such that each median that moves on its own is known to ``+- level`` (see [Note: plans that
    reproduce]; the planner pools a signature's samples, so a group moving together reports a spread
    ``sqrt(members)`` times wider)."""
    rng = random.Random(seed)
    factors: dict[str, float] = {}
    keys = {name: c.signature if per_signature and c.signature else name for name, c in costs.ops.items()}
    members = Counter(keys.values())
    ops = {}
    for name in sorted(costs.ops):
        c, key = costs.ops[name], keys[name]
        f = factors.setdefault(key, 1 + rng.uniform(-level, level))
        width = level * math.sqrt(members[key]) / NOTCH
        ops[name] = dataclasses.replace(
            c,
            fwd_ms=c.fwd_ms * f,
            bwd_ms=c.bwd_ms * f,
            wgt_ms=c.wgt_ms * f,
            fwd_spread_ms=c.fwd_ms * width,
            bwd_spread_ms=c.bwd_ms * width,
            samples=1,
        )
    return dataclasses.replace(costs, ops=ops)

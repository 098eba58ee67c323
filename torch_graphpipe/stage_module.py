"""A stage as a module: an FX graph with the stage's operators, built from the traced model.

``stage(*model_inputs, *received_values)`` returns ``(sent_values, model_output)``: the values in
``route.out_values`` order and, on the loss stage, the model output (``None`` elsewhere). The module
holds only the submodules and attributes its operators use, under their qualified names in the
original model, so its ``state_dict`` keys are the original model's keys.

A stage split at a late input (see [Note: late inputs] in torch_graphpipe/schedule.py) also runs as
two parts cut from its module (:func:`split_stage_module`), sharing its parameters:
``early(*model_inputs, *early_received)`` returns the values the late part reads (its ``boundary``),
``late(*model_inputs, *boundary, *received_values)`` returns what the whole stage returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from torch_graphpipe.routing import StageRoute

__all__ = [
    "StageParts",
    "build_stage_module",
    "check_shared_parameters",
    "match_persistence",
    "split_stage_module",
    "unowned_state",
]


def build_stage_module(gm: fx.GraphModule, route: StageRoute) -> fx.GraphModule:
    """The stage's module; see the module docstring."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = graph.node_copy(node)
    for name in route.in_values:
        env[name] = graph.placeholder(f"recv_{name}")
    own = set(route.node_names)
    fx_nodes = {n.name: n for n in gm.graph.nodes}

    def lookup(arg: fx.Node) -> fx.Node:
        if arg.name not in env:
            assert arg.op == "get_attr", f"stage {route.stage}: {arg.name} is neither local nor received"
            env[arg.name] = graph.node_copy(arg)
        return env[arg.name]

    for node in gm.graph.nodes:
        if node.name in own:
            env[node.name] = graph.node_copy(node, lookup)
    sent = tuple(lookup(fx_nodes[v]) for v in route.out_values)
    output = None
    if route.holds_output:
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        output = fx.node.map_arg(out_node.args[0], lookup)
    graph.output((sent, output))
    graph.lint()
    return fx.GraphModule(gm, graph, f"Stage{route.stage}")


@dataclasses.dataclass
class StageParts:
    """A split stage's two parts; see the module docstring. The modules may be wrapped (benchmarks)."""

    early: torch.nn.Module  # (*model_inputs, *early_in values) -> tuple of boundary values
    late: torch.nn.Module  # (*model_inputs, *boundary values, *received values) -> (sent, output)
    early_in: tuple[str, ...]  # received values the early part reads (from the other predecessors)
    boundary: tuple[str, ...]  # early values the late part reads, sends or outputs


def split_stage_module(
    stage: fx.GraphModule, route: StageRoute, late_node_names: Sequence[str], late_pred: int
) -> StageParts:
    """Cut ``stage`` (from :func:`build_stage_module`) into the part that does not depend on the values
    received from ``late_pred`` and the part that does (``late_node_names``)."""
    late = set(late_node_names)
    placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
    assert len(route.recv) > 1, f"stage {route.stage} has one predecessor: nothing to split"
    received = dict(zip(route.in_values, placeholders[len(placeholders) - len(route.in_values) :]))
    early_in = tuple(v for peer, values in route.recv if peer != late_pred for v in values)
    own = [n for n in stage.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert {n.name for n in own} == set(route.node_names), f"stage {route.stage}: nodes were renamed"
    assert late <= set(route.node_names), f"stage {route.stage}: late operators outside the stage"
    early_nodes = [n for n in own if n.name not in late]
    late_nodes = [n for n in own if n.name in late]
    users = {n for n in late_nodes} | {n for n in stage.graph.nodes if n.op == "output"}
    boundary = tuple(n.name for n in early_nodes if any(u in users for u in n.users))
    inputs = [n for n in stage.graph.nodes if n.op == "placeholder" and n not in received.values()]

    def part(
        nodes: list[fx.Node], reads: Sequence[tuple[str, fx.Node]], out: Any, name: str
    ) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {n: graph.node_copy(n) for n in inputs}
        for label, n in reads:
            env[n] = graph.placeholder(f"in_{label}")

        def lookup(arg: fx.Node) -> fx.Node:
            if arg not in env:
                assert arg.op == "get_attr", (
                    f"stage {route.stage}: {arg.name} is not available to its {name} part"
                )
                env[arg] = graph.node_copy(arg)
            return env[arg]

        for n in nodes:
            env[n] = graph.node_copy(n, lookup)
        graph.output(fx.node.map_arg(out, lookup))
        graph.lint()
        return fx.GraphModule(stage, graph, f"Stage{route.stage}{name.capitalize()}")

    by_name = {n.name: n for n in own}
    out_node = next(n for n in stage.graph.nodes if n.op == "output")
    early = part(
        early_nodes, [(v, received[v]) for v in early_in], tuple(by_name[v] for v in boundary), "early"
    )
    late_reads = [(v, by_name[v]) for v in boundary] + [(v, received[v]) for v in route.in_values]
    late_gm = part(late_nodes, late_reads, out_node.args[0], "late")
    return StageParts(early=early, late=late_gm, early_in=early_in, boundary=boundary)


def check_shared_parameters(stages: Sequence[torch.nn.Module]) -> None:
    """Raise ``ValueError`` when a trainable parameter is used by more than one stage."""
    first: dict[int, tuple[int, str]] = {}
    for s, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in first and first[id(p)][0] != s:
                other, other_name = first[id(p)]
                raise ValueError(
                    f"parameter {other_name!r} is used by stages {other} and {s} (as {name!r}); tied "
                    "parameters across stages are not supported: place the modules that use it in one "
                    "stage (partition=[[...], ...])"
                )
            first.setdefault(id(p), (s, name))


def unowned_state(module: torch.nn.Module, stages: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Entries of ``module.state_dict()`` that no stage holds (kept by stage 0 for checkpoints)."""
    owned = {k for stage in stages for k in stage.state_dict()}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in owned}


def match_persistence(stage: torch.nn.Module, state_keys: set[str]) -> None:
    """Make buffers that the original model does not save (``persistent=False``) unsaved in ``stage`` too.

    FX registers every tensor a graph reads as a (persistent) buffer of the stage module.
    """
    for name, buf in list(stage.named_buffers()):
        if name not in state_keys:
            owner_name, _, leaf = name.rpartition(".")
            owner = stage.get_submodule(owner_name)
            owner.register_buffer(leaf, buf, persistent=False)

"""A stage as a module: an FX graph with the stage's operators, built from the traced model.

``stage(*model_inputs, *received_values)`` returns ``(sent_values, model_output)``: the values in
``route.out_values`` order and, on the loss stage, the model output (``None`` elsewhere). The module
holds only the submodules and attributes its operators use, under their qualified names in the
original model, so its ``state_dict`` keys are the original model's keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from torch_graphpipe.routing import StageRoute

__all__ = ["build_stage_module", "check_shared_parameters", "match_persistence", "unowned_state"]


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

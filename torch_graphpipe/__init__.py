"""torch_graphpipe: graph pipeline-parallel training (stages form a DAG, not a chain).

Planning runs in one process: ``torch_graphpipe.plan(model, example_inputs, num_stages,
num_microbatches)`` captures the operator graph, profiles it, partitions it into convex stages and
builds a DAG 1F1B schedule; ``plan.simulate()`` predicts a step, ``plot_timeline(result, path)``
draws it. The distributed runtime ``GraphPipe(model, example_inputs=..., loss_fn=...,
num_microbatches=...)`` runs under an initialised process group, one stage per rank:
``gp.step(*inputs, target=y)`` trains one batch.
"""

from torch_graphpipe.action import Action
from torch_graphpipe.graph import OpGraph, OpNode
from torch_graphpipe.graph_capture import CapturedGraph, GraphCaptureError, capture
from torch_graphpipe.planner import Plan, StagePlan, choose_microbatches, plan, plan_graph, plan_stages
from torch_graphpipe.profile import CommModel, CostTable, OpCost, profile_graph
from torch_graphpipe.schedule import Schedule, ScheduleError, build_1f1b
from torch_graphpipe.simulator import SimulationResult, TimelineEntry, action_costs, simulate
from torch_graphpipe.stage_cost import StageCost
from torch_graphpipe.timeline import plot_timeline
from torch_graphpipe.validate import validate_schedule
from torch_graphpipe.wire import PeerError
from torch_graphpipe.wrapper import GraphPipe

__all__ = [
    "Action",
    "CapturedGraph",
    "CommModel",
    "CostTable",
    "GraphCaptureError",
    "GraphPipe",
    "OpCost",
    "OpGraph",
    "OpNode",
    "PeerError",
    "Plan",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "StageCost",
    "StagePlan",
    "TimelineEntry",
    "action_costs",
    "build_1f1b",
    "capture",
    "choose_microbatches",
    "plan",
    "plan_graph",
    "plan_stages",
    "plot_timeline",
    "profile_graph",
    "simulate",
    "validate_schedule",
]

"""The runtime's one-process pieces: explicit partitions, routing, stage modules, shapes, packing."""

import pytest
import torch
from _gp_models import CASES
from torch._subclasses.fake_tensor import is_fake

from torch_graphpipe import CommModel, CostTable, OpCost, capture, plan_graph, plan_stages, profile_graph
from torch_graphpipe.groups import stages_from_module_groups
from torch_graphpipe.microbatch import join_outputs, split_batch
from torch_graphpipe.routing import route, with_routing
from torch_graphpipe.shape_oracle import ShapeOracle, TensorSpec
from torch_graphpipe.stage_module import build_stage_module, check_shared_parameters, unowned_state
from torch_graphpipe.validate import validate_schedule
from torch_graphpipe.wire import pack, packed_size, unpack


def _uniform_costs(graph):
    return CostTable(
        ops={n.name: OpCost(fwd_ms=1, bwd_ms=2, out_bytes=64) for n in graph.nodes}, comm=CommModel.free()
    )


def _explicit(case_name, num_microbatches=2):
    case = CASES[case_name]
    model = case.build()
    captured = capture(model)
    masks = stages_from_module_groups(captured.graph, case.partition)
    the_plan = plan_stages(captured.graph, _uniform_costs(captured.graph), masks, num_microbatches)
    return case, model, captured, the_plan


def _run_stages_in_one_process(captured, routing, inputs):
    """Execute the stage modules one after another, passing values as the runtime would."""
    values, output = {}, None
    for r in routing.stages:
        stage = build_stage_module(captured.graph_module, r)
        sent, out = stage(*inputs, *(values[v] for v in r.in_values))
        values.update(zip(r.out_values, sent))
        output = out if r.holds_output else output
    return output


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_stage_modules_compose_to_the_model(case_name):
    case, model, captured, the_plan = _explicit(case_name)
    inputs, _ = case.batch(6, torch.Generator().manual_seed(1))
    routing = route(the_plan, captured.graph)
    torch.testing.assert_close(_run_stages_in_one_process(captured, routing, inputs), model(*inputs))
    stages = [build_stage_module(captured.graph_module, r) for r in routing.stages]
    check_shared_parameters(stages)
    keys = [k for s in stages for k in s.state_dict()]
    assert sorted(keys) == sorted(model.state_dict()) and not unowned_state(model, stages)


def test_explicit_partition_places_functions_with_their_consumers():
    the_plan = _explicit("skip")[3]
    names = [s.node_names for s in the_plan.stages]
    assert names[0] == ("a",)
    assert set(names[1]) == {"b", "relu", "c"} and set(names[2]) == {"tanh", "d", "add", "e"}
    assert the_plan.edges == ((0, 1), (0, 2), (1, 2))


def test_explicit_partition_errors():
    graph = capture(CASES["fork_join"].build()).graph
    with pytest.raises(ValueError, match="no operator calls"):
        stages_from_module_groups(graph, [["stem", "left"], ["right", "hed"]])
    with pytest.raises(ValueError, match="does not place the modules"):
        stages_from_module_groups(graph, [["stem", "left"], ["right"]])
    with pytest.raises(ValueError, match="in partition groups 0 and 1"):
        stages_from_module_groups(graph, [["stem", "left"], ["left", "right", "head"]])
    with pytest.raises(ValueError, match="not convex"):
        stages_from_module_groups(graph, [["stem", "head"], ["left", "right"]])
    with pytest.raises(TypeError):
        stages_from_module_groups(graph, ["stem", "left"])


def test_routing_brings_outputs_to_the_loss_stage():
    _, _, captured, the_plan = _explicit("multi_output")
    assert the_plan.edges == ((0, 1), (0, 2), (1, 2))  # the output edge is planned
    routing = route(the_plan, captured.graph)
    assert routing.loss_stage == 2 and routing.edges == the_plan.edges
    assert routing.stages[1].send == ((2, ("h1",)),)
    executed = with_routing(the_plan, routing, {})
    assert executed.schedule is the_plan.schedule
    validate_schedule(executed.schedule)


def test_chain_routing_passes_values_on():
    model = CASES["skip"].build()
    captured = capture(model)
    the_plan = plan_graph(captured.graph, _uniform_costs(captured.graph), 3, 4, "chain")
    routing = route(the_plan, captured.graph)
    assert routing.edges == ((0, 1), (1, 2))
    middle = routing.stages[1]
    assert "a" in middle.in_values and "a" in middle.out_values  # the skip edge travels through stage 1
    inputs, _ = CASES["skip"].batch(4, torch.Generator().manual_seed(2))
    torch.testing.assert_close(_run_stages_in_one_process(captured, routing, inputs), model(*inputs))


def test_shape_oracle_uses_no_real_weights():
    case = CASES["multi_output"]
    captured = capture(case.build())
    oracle = ShapeOracle(captured.graph_module)
    assert all(is_fake(p) for p in oracle._meta.parameters())
    specs = oracle.specs((torch.randn(5, 8),))
    assert specs.values["trunk"].tensors == (TensorSpec((5, 8), torch.float32, True),)
    assert [t.shape for t in specs.output.tensors] == [(5, 3), (5, 5)]
    assert oracle.specs((torch.randn(5, 8),)) is specs  # cached per signature


def test_pack_unpack_round_trip():
    tensors = [torch.randn(3, 5), torch.randint(0, 9, (7,)), torch.rand(2, 2) > 0.5, torch.randn(1).double()]
    specs = [TensorSpec.of(t) for t in tensors]
    buf = pack(tensors, specs, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and buf.numel() == packed_size(specs) and buf.numel() % 16 == 0
    for a, b in zip(unpack(buf, specs), tensors):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        pack([torch.randn(3, 4)], specs[:1], torch.device("cpu"))


def test_split_and_join():
    x, target = torch.randn(6, 3), (torch.randn(6), 2.5)
    parts = split_batch((x, target), 3, "batch")
    assert len(parts) == 3 and parts[1][1][1] == 2.5
    torch.testing.assert_close(join_outputs([p[0] for p in parts]), x)
    with pytest.raises(ValueError, match=r"batch size 6.*num_microbatches=4"):
        split_batch(x, 4, "inputs")


def test_profiling_leaves_the_model_alone():
    model = CASES["fork_join"].build()
    captured = capture(model)
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    profile_graph(captured.graph_module, captured.graph, (x,), repeats=1)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.rand(1), expected)


def test_profiling_pools_operators_doing_the_same_work():
    """The four Linear(16, 16) of ForkJoin's two branches read (4, 16) inputs: one pooled cost; the stem
    (Linear(8, 16)) and the two activations (ReLU, Tanh) are measured on their own."""
    captured = capture(CASES["fork_join"].build())
    costs = profile_graph(captured.graph_module, captured.graph, (torch.randn(4, 8),), repeats=2)
    timed = ("fwd_ms", "bwd_ms", "wgt_ms", "out_bytes", "param_bytes")  # what each operator saves differs
    by_target = {n.target: tuple(getattr(costs.of(n.name), f) for f in timed) for n in captured.graph.nodes}
    same = [by_target[t] for t in ("left.0", "left.2", "right.0", "right.2")]
    assert all(c == same[0] for c in same) and same[0][0] > 0
    assert by_target["stem"] != same[0] and by_target["left.1"] != by_target["right.1"]

"""The assembled call's direct path (one step taking the graph's inputs, making every output)
returns what the slot loop returns, for outputs repeated, reordered or passed through."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.assembly import AssembledGraph, Step
from torch_collage.subgraph import extract


def _twice_reordered(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = torch.relu(x) + y
    b = a * y
    return b, a, b  # one value twice, out of computation order


def _one_output(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y).tanh()  # not a tuple: aot_autograd's graphs always return one; the slot loop


def _in_a_list(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [(x @ y).tanh()]


def _passes_an_input_through(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.sin(), y  # y is an output but no op's: the step does not make every output


def _reads_one_input(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [x.exp()]  # the step's inputs are not the graph's inputs as they come


def _whole(fn: Callable[..., object], *inputs: torch.Tensor) -> AssembledGraph:
    gm = make_fx(fn)(*inputs)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    whole = extract(gm, ops)
    return AssembledGraph(gm, [Step("eager", whole.module, whole)])


@pytest.mark.parametrize(
    ("fn", "direct"),
    [
        (_twice_reordered, True),
        (_in_a_list, True),
        (_one_output, False),
        (_passes_an_input_through, False),
        (_reads_one_input, False),
    ],
)
def test_a_whole_graph_step_returns_what_the_graph_returns(fn: Callable[..., object], direct: bool) -> None:
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    assembled = _whole(fn, x, y)
    assert (assembled._direct is not None) is direct
    x2, y2 = torch.randn(4, 4), torch.randn(4, 4)
    got, want = assembled(x2, y2), fn(x2, y2)
    assert type(got) is type(want)
    got_list, want_list = (list(v) if isinstance(v, (tuple, list)) else [v] for v in (got, want))
    assert len(got_list) == len(want_list)
    for g, w in zip(got_list, want_list, strict=True):
        torch.testing.assert_close(g, w)
    if fn is _twice_reordered:
        assert got[0] is got[2]  # the same value, as the graph returns it
    with pytest.raises(TypeError, match="expected 2 inputs"):
        assembled(x2)

"""Compiling never changes a user's state: buffers, inputs and the random stream change exactly as one
eager call changes them ([Note: inputs the graph writes], [Note: random ops])."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

_FAST = {"backends": ["eager", "inductor"], "max_depth": 2, "repeats": 3, "warmup": 1, "progress": False}


class _Counter(nn.Module):
    """A buffer updated in place on every call, and read by the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x) * self.calls


class _AddToInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(0.5)
        return self.lin(x).relu()


def _bn() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, 4))


class _Noise(nn.Module):
    """Random ops that are no dropout: ``draw`` fills a fresh tensor (``uniform_``, ``normal_``,
    ``exponential_``, ``bernoulli_``), as wav2vec2's LayerDrop and noise layers do."""

    def __init__(self, draw: str) -> None:
        super().__init__()
        self.draw = draw
        self.lin1, self.lin2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        noise = getattr(torch.empty_like(h), f"{self.draw}_")()
        return self.lin2((h * noise).relu())


_RANDOM = {
    "dropout": _dropout,
    **{draw: (lambda d=draw: _Noise(d)) for draw in ["uniform", "normal", "bernoulli"]},
}


def _compiled(model: nn.Module, tmp_path) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="collage", options={**_FAST, "cache_dir": str(tmp_path)})


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


@pytest.mark.parametrize("make", [_bn, _Counter, _AddToInput], ids=["batchnorm", "counter", "input_add_"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_state_changes_exactly_as_eager_calls_change_it(tmp_path, make, grad):
    """A train()-mode model: after each call (the first one places the graph) every buffer, the
    input and the output equal what the same eager calls give."""
    torch.manual_seed(0)
    model = make().train()
    ref = copy.deepcopy(model)
    compiled = _compiled(model, tmp_path)
    for _ in range(3):
        x = torch.randn(16, 8)
        x_ref = x.clone()
        with torch.set_grad_enabled(grad):
            out, want = compiled(x), ref(x_ref)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(x, x_ref)
        for got, expected in zip(_state(model), _state(ref)):  # counters exact; statistics to rounding
            exact = not expected.is_floating_point()
            torch.testing.assert_close(got, expected, rtol=0 if exact else None, atol=0 if exact else None)


@pytest.mark.parametrize("make", list(_RANDOM.values()), ids=list(_RANDOM))
def test_training_with_random_ops_matches_eager_from_the_same_seed(tmp_path, make):
    """Random ops (every op torch tags ``nondeterministic_seeded``) run on eager and are checked under
    the generator state the recording had; the placement restores the caller's generator, so the
    compiled step draws what eager draws. ONNX Runtime is offered too: it must not be handed them.
    No eager candidate is rejected: one that ends at the ``empty_like`` a draw fills holds
    unspecified values, which are not compared."""
    from torch_collage.entry import make_backend
    from torch_collage.options import CollageOptions

    torch.manual_seed(1)
    model = make().train()
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    options = {**_FAST, "backends": ["eager", "inductor", "onnxruntime"], "cache_dir": str(tmp_path)}
    reports: list = []
    compiled = torch.compile(
        model, backend=make_backend(CollageOptions.from_mapping(options), reports.append)
    )
    x = torch.randn(16, 8)
    for step in range(2):
        torch.manual_seed(100 + step)
        out = compiled(x)
        out.square().mean().backward()
        after = torch.rand(3)  # the stream after the call
        torch.manual_seed(100 + step)
        want = ref(x)
        want.square().mean().backward()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(after, torch.rand(3))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert reports and not [k for r in reports for k in r.rejected if k.startswith("eager:")]


def test_dropout_is_not_bit_equal_across_calls(tmp_path):
    """The check is not fooled by a fixed mask: two calls draw different dropout masks, like eager."""
    torch.manual_seed(2)
    model = _dropout().train()
    compiled = _compiled(model, tmp_path)
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert not torch.equal(compiled(x), compiled(x))


# --- caches and checks that a strange input cannot poison ------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def test_a_nan_in_the_first_input_neither_fails_nor_poisons_the_cache(tmp_path):
    """Eager's NaN and a backend's NaN at the same places match; a later compile on finite inputs
    still finds the backends usable (the first search's verdicts were not cached against them)."""
    import torch_collage

    torch.manual_seed(3)
    model, opts = _mlp(), {**_FAST, "cache_dir": str(tmp_path)}
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    compiled = _compiled(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), equal_nan=True)
    report = torch_collage.explain(_mlp(), torch.randn(4, 8), **opts)
    assert all(ms < float("inf") for ms in report.graphs[0].single_backend_ms.values()), report.to_markdown()


def _nan_elsewhere(gm, example_inputs):
    """A backend that runs the graph and moves its NaNs (as another reduction order might)."""

    def run(*args):
        return tuple(o.nan_to_num(0.0).roll(1, 0) if o.isnan().any() else o for o in gm(*args))

    return run


def test_a_rejection_measured_on_non_finite_values_is_not_cached(tmp_path):
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec, registered_backend
    from torch_collage.cache import CostCache
    from torch_collage.candidates import Candidate
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model = _mlp()
    with registered_backend("nan_elsewhere", compile=_nan_elsewhere):
        for nan, cached in ((True, 0), (False, 0)):
            x = torch.randn(4, 8)
            if nan:
                x[0, 0] = float("nan")
            gm = make_fx(model)(x)
            graph = DataflowGraph.from_graph(gm.graph)
            specs = {"eager": get_spec("eager"), "nan_elsewhere": get_spec("nan_elsewhere")}
            cache = CostCache(str(tmp_path))
            cost = CostModel(
                gm, graph, record_values(gm, [x]), specs, CollageOptions(cache_dir=str(tmp_path)), cache
            )
            ms = cost.cost(Candidate(graph.full, "nan_elsewhere"))
            assert (ms == float("inf")) == nan  # rejected on the NaN input, fine on a finite one
            assert cache.stats().rejected == cached
            cache.close()


@pytest.mark.parametrize("write", ["assign", "in_place_then_refresh"])
def test_weights_written_through_data_are_followed(tmp_path, write):
    import torch_collage

    torch.manual_seed(4)
    model = _mlp()
    compiled = torch.compile(model, backend="collage", options={**_FAST, "backends": ["eager", "inductor", "onnxruntime"],
                                                                 "cache_dir": str(tmp_path)})  # fmt: skip
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled(x)
        if write == "assign":
            model[0].weight.data = torch.randn_like(model[0].weight)
        else:
            model[0].weight.data.mul_(2.0)
            torch_collage.refresh(model)
        torch.testing.assert_close(compiled(x), model(x))


@torch.library.custom_op("collage_test::noise", mutates_args=())
def _noise(x: torch.Tensor) -> torch.Tensor:
    """Random, but named like no random op: eager cannot reproduce its recorded values."""
    return x + torch.randn_like(x)


@_noise.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_graph_no_backend_can_run_names_the_node_and_each_reason(tmp_path):
    import torch_collage
    from torch_collage.measure import UnplaceableGraph

    class Noisy(nn.Module):
        def forward(self, x):
            return torch.ops.collage_test.noise(x.relu()) * 2

    with pytest.raises(UnplaceableGraph, match=r"noise.*eager: mismatch"):
        torch_collage.explain(Noisy(), torch.randn(4, 8), **{**_FAST, "cache_dir": str(tmp_path)})


# --- costs that do not remember a busy minute ([Note: quiet measurements]) -------------------------


class _ScriptedProbe:
    """The machine's state as a test sets it: each ``slowdown()`` returns the next value."""

    def __init__(self, slowdowns):
        self.slowdowns = list(slowdowns)

    def slowdown(self) -> float:
        return self.slowdowns.pop(0) if self.slowdowns else 1.0

    def busy(self, slowdown: float) -> bool:
        from torch_collage.timing import BUSY_FACTOR

        return slowdown > BUSY_FACTOR


@pytest.mark.parametrize(
    ("slowdowns", "persisted"), [([1.0] * 2, 1), ([3.0, 1.0, 1.0, 1.0], 1), ([3.0] * 4, 0)]
)
def test_a_cost_measured_while_the_machine_is_busy_is_not_cached(tmp_path, slowdowns, persisted):
    """Quiet: cached. Busy once: timed again, cached. Busy twice: used, counted as noisy, not cached."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.registry import get_spec
    from torch_collage.cache import CostCache
    from torch_collage.candidates import Candidate
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph
    from torch_collage.options import CollageOptions

    model, x = _mlp(), torch.randn(4, 8)
    gm = make_fx(model)(x)
    graph = DataflowGraph.from_graph(gm.graph)
    cache = CostCache(str(tmp_path))
    cost = CostModel(gm, graph, record_values(gm, [x]), {"eager": get_spec("eager")},
                     CollageOptions(cache_dir=str(tmp_path), repeats=3, warmup=1), cache,
                     probe=_ScriptedProbe(slowdowns))  # fmt: skip
    ms = cost.cost(Candidate(graph.full, "eager"))
    assert 0 < ms < float("inf")
    assert cache.stats().measured == persisted and cost.noisy == 1 - persisted
    assert cost.cost(Candidate(graph.full, "eager")) == ms  # this search keeps it either way
    cache.close()


def test_the_probe_is_relative_to_the_fastest_run_seen_at_its_thread_count():
    from torch_collage.timing import InterferenceProbe, torch_threads

    probe = InterferenceProbe()
    first = probe.slowdown()
    assert first == 1.0 and probe.best_ms > 0
    assert all(probe.slowdown() >= 1.0 for _ in range(3))
    if torch.get_num_threads() > 1:  # one thread is slower, not busier: its own baseline
        with torch_threads(1):
            assert probe.slowdown() == 1.0 and probe.best_ms > 0


def test_copies_for_measuring_keep_the_strides_of_views():
    from torch_collage.cost import copy_strided

    h = torch.randn(2, 12, 32)
    for view in (h[:, 0], h.transpose(1, 2), torch.randn(1, 4).expand(3, 4), h[:, ::2]):
        copy = copy_strided(view)
        assert copy.stride() == view.stride() and torch.equal(copy, view)
        assert copy.data_ptr() != view.data_ptr()

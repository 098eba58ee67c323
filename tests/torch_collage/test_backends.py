"""Whole-graph backends: every built-in backend against eager on small models, fresh inputs each call."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

from torch_collage.backends import (
    CPU_BACKENDS,
    Backend,
    BackendCompileError,
    get_backend,
)
from torch_collage.backends.base import deterministic

ALL = CPU_BACKENDS
RUNTIMES = ("onnxruntime", "openvino")  # the backends that export the graph and run it outside torch
# both ONNX Runtime input paths: session.run with numpy (the default) and IOBinding
RUNTIME_CONFIGS = [("onnxruntime", {}), ("onnxruntime", {"io_binding": True}), ("openvino", {})]
TOL = {"rtol": 1e-4, "atol": 1e-4}


@torch.library.custom_op("collage_test::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    """An op no exporter knows: reverses the last dim and doubles."""
    return x.flip(-1) * 2


@twist.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(8, 5)
        for bn in (self.body[1], self.body[4]):  # not the identity: random running statistics
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class Encoder(nn.Module):
    """Token ids (int64, (B, T)) -> embeddings -> one transformer encoder block -> (B, T, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(tokens))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return h.relu(), (h * y).sum(-1)


class Awkward(nn.Module):
    """An unused input, an input returned as is, one tensor returned twice, a list, int32 and int64 inputs."""

    def forward(
        self, x: torch.Tensor, unused: torch.Tensor, index: torch.Tensor, count: torch.Tensor
    ) -> list[torch.Tensor]:
        h = x.tanh()
        return [x, x[:, index], h, h, count * 3]


class Twisted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twist(x.relu()) + 1


def _tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, 100, shape, dtype=torch.int64)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "mlp": (MLP, lambda: (torch.randn(4, 32),)),
    "conv_bn": (ConvBN, lambda: (torch.randn(2, 3, 12, 12),)),
    "encoder": (Encoder, lambda: (_tokens(2, 10),)),
    "two_outputs": (TwoOutputs, lambda: (torch.randn(4, 16), torch.randn(4, 8))),
}


def _compile(
    name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], **options: Any
) -> Callable[..., Any]:
    with torch.no_grad():
        return get_backend(name, **options).compile(module, inputs)


def _check_calls(
    fn: Callable[..., Any], reference: Callable[..., Any], make_inputs: Callable[[], Any]
) -> None:
    """Two calls with new inputs: both match eager, and the second does not overwrite the first."""
    with torch.no_grad():
        first_in, second_in = make_inputs(), make_inputs()
        first, first_ref = fn(*first_in), reference(*first_in)
        second, second_ref = fn(*second_in), reference(*second_in)
    assert type(first) is type(first_ref)
    torch.testing.assert_close(first, first_ref, **TOL)
    torch.testing.assert_close(second, second_ref, **TOL)


@pytest.mark.parametrize(("backend", "model"), [(b, m) for b in ALL for m in MODELS])
def test_matches_eager(backend: str, model: str) -> None:
    make_module, make_inputs = MODELS[model]
    module = make_module().eval()
    fn = _compile(backend, module, make_inputs())
    _check_calls(fn, module, make_inputs)


# Freezing only changes how parameters are compiled: two models suffice, the others cost compile time.
@pytest.mark.parametrize("model", ["mlp", "conv_bn"])
def test_inductor_with_freezing_matches_eager(model: str) -> None:
    make_module, make_inputs = MODELS[model]
    module = make_module().eval()
    fn = _compile("inductor", module, make_inputs(), freezing=True)
    _check_calls(fn, module, make_inputs)


@pytest.mark.parametrize("backend", ALL)
def test_available_and_version(backend: str) -> None:
    b = get_backend(backend)
    assert isinstance(b, Backend)
    assert b.name == backend
    assert b.available() == (True, "")
    assert isinstance(b.version(), str) and b.version()


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        get_backend("nope")
    assert all(name in str(info.value) for name in ALL)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match="allow_spinning"):
        get_backend("onnxruntime", spinning=True)
    assert get_backend("onnxruntime", allow_spinning=True).allow_spinning  # type: ignore[attr-defined]


def _aten_graphs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[nn.Module, tuple]]:
    """ATen-level GraphModules of ``module`` as ``torch.export``, ``make_fx`` and aot_autograd make them."""
    captured: list[tuple[torch.fx.GraphModule, list[torch.Tensor]]] = []

    def keep(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Callable[..., Any]:
        captured.append((gm, example))
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(*inputs)
        aot_gm, fake_inputs = captured[0]  # parameters become inputs; the example inputs are fake
        aot_inputs = tuple(torch.randn(t.shape, dtype=t.dtype) for t in fake_inputs)
        return {
            "export": (torch.export.export(module, inputs).module(), inputs),
            "make_fx": (make_fx(module)(*inputs), inputs),
            "aot_autograd": (aot_gm, aot_inputs),
        }


@pytest.mark.parametrize("backend", [*RUNTIMES, "inductor"])
def test_aten_graph_modules(backend: str) -> None:
    module = TwoOutputs().eval()
    inputs = MODELS["two_outputs"][1]()
    for kind, (gm, gm_inputs) in _aten_graphs(module, inputs).items():
        fn = _compile(backend, gm, gm_inputs)

        def make(gm_inputs: tuple = gm_inputs) -> tuple[torch.Tensor, ...]:
            return tuple(torch.randn_like(t) for t in gm_inputs)

        try:
            _check_calls(fn, gm, make)
        except AssertionError as exc:
            raise AssertionError(f"{kind} graph: {exc}") from exc


@pytest.mark.parametrize(("backend", "options"), RUNTIME_CONFIGS)
def test_awkward_inputs_and_outputs(backend: str, options: dict[str, Any]) -> None:
    module = Awkward()

    def make() -> tuple[torch.Tensor, ...]:
        index = torch.randint(0, 5, (4,), dtype=torch.int64)
        return torch.randn(3, 5), torch.randn(7), index, torch.randint(-9, 9, (2,), dtype=torch.int32)

    fn = get_backend(backend, **options).compile(module, make())
    _check_calls(fn, module, make)
    out = fn(*make())
    assert out[2] is out[3]  # as in eager: the same tensor twice


@pytest.mark.parametrize(("backend", "options"), RUNTIME_CONFIGS)
def test_non_contiguous_input_and_shape_check(backend: str, options: dict[str, Any]) -> None:
    module = MLP().eval()
    fn = get_backend(backend, **options).compile(module, (torch.randn(4, 32),))
    x = torch.randn(32, 4).t()  # (4, 32), not contiguous
    torch.testing.assert_close(fn(x), module(x).detach(), **TOL)
    with pytest.raises(ValueError, match=r"compiled for shape \(4, 32\)"):
        fn(torch.randn(5, 32))
    with pytest.raises(ValueError, match="expected 1 input"):
        fn(x, x)
    leaf = torch.randn(4, 32, requires_grad=True)  # detached on the way in, not refused
    torch.testing.assert_close(fn(leaf), module(leaf).detach(), **TOL)


def test_freezing_many_instances_of_one_class() -> None:
    """More instances than dynamo's recompile limit (8): each compiles, none runs another's weights."""
    for _ in range(9):
        module = TwoOutputs().eval()
        make = MODELS["two_outputs"][1]
        _check_calls(_compile("inductor", module, make(), freezing=True), module, make)


def test_freezing_runs_in_grad_mode_without_grad() -> None:
    module = MLP().eval()
    fn = _compile("inductor", module, (torch.randn(4, 32),), freezing=True)
    x = torch.randn(4, 32)
    out = fn(x)  # grad mode on: the callable switches to no_grad itself
    assert not out.requires_grad
    torch.testing.assert_close(out, module(x).detach(), **TOL)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_unsupported_custom_op_is_named(backend: str) -> None:
    with pytest.raises(BackendCompileError) as info:
        _compile(backend, Twisted(), (torch.randn(3, 4),))
    err = info.value
    assert err.backend == backend
    assert err.op == "collage_test.twist.default"
    assert str(err).startswith(f"{backend} could not compile the model: op {err.op}: ")


def test_onnxruntime_names_unsupported_aten_op() -> None:
    class Inverse(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.inv(x)

    with pytest.raises(BackendCompileError, match=re.escape("op aten.linalg_inv_ex.default")):
        _compile("onnxruntime", Inverse(), (torch.randn(2, 3, 3),))


def test_compile_error_message_and_parsing() -> None:
    err = BackendCompileError("onnxruntime", "no kernel", op="aten.foo.default")
    assert str(err) == "onnxruntime could not compile the model: op aten.foo.default: no kernel"
    ov_text = (
        "Check 'false' failed\nSummary:\n-- No conversion rule found for operations: aten::foo, aten::bar\n"
    )
    pattern = re.compile(r"No conversion rule found for operations: ([\w.:]+)")
    parsed = BackendCompileError.from_exception("openvino", RuntimeError(ov_text), [pattern])
    assert parsed.op == "aten.foo" and "aten::bar" in parsed.reason
    plain = BackendCompileError.from_exception("openvino", RuntimeError("boom\nmore"), [pattern])
    assert plain.op is None and plain.reason == "RuntimeError: boom"


def test_openvino_conversion_sends_no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """[Note: OpenVINO telemetry]: collage's conversions queue no telemetry event (each would fork
    the process); the opt-in variable lets them through, which shows the counter sees them."""
    from torch_collage.backends.openvino import TELEMETRY_ENV

    utils = pytest.importorskip("openvino.tools.ovc.telemetry_utils")
    telemetry = utils.init_ovc_telemetry()
    if not hasattr(telemetry, "sender"):
        pytest.skip("openvino_telemetry is not installed (OpenVINO uses its stub)")
    sent: list[Any] = []
    monkeypatch.setattr(telemetry, "consent", True)  # a user who has not opted out
    monkeypatch.setattr(telemetry.sender, "send", lambda backend, message: sent.append(message))
    monkeypatch.delenv(TELEMETRY_ENV, raising=False)
    x = torch.randn(5, 32)
    model = MLP().eval()
    torch.testing.assert_close(_compile("openvino", model, (x,))(x), model(x), **TOL)
    assert sent == []
    assert telemetry.consent is True  # restored after the conversion
    monkeypatch.setenv(TELEMETRY_ENV, "1")
    _compile("openvino", model, (x,))
    assert sent, "with the opt-in variable set, convert_model's events are sent"


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_whole_graph_runtimes_print_no_torch_treespec_deprecation(name: str) -> None:
    """torch's own export code (reached through OpenVINO's converter and the ONNX exporter) warns
    about ``LeafSpec``; a search would print it once per candidate, so collage silences it."""
    if not get_backend(name).available()[0]:
        pytest.skip(f"{name} unavailable")
    x = torch.randn(3, 32)
    model = MLP().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(_compile(name, model, (x,))(x), model(x), **TOL)
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def _openvino_or_skip() -> Any:
    from torch_collage.backends import openvino

    if not openvino.OpenVinoBackend().available()[0]:
        pytest.skip("openvino unavailable")
    return openvino


def test_openvino_helper_compile_matches_in_process_compile() -> None:
    """[Note: OpenVINO compiles in a helper process]: the blob compiled in the helper and imported
    here computes exactly what an in-process compile computes, on fresh inputs."""
    openvino = _openvino_or_skip()
    model = ConvBN().eval()
    example = (torch.randn(2, 3, 12, 12),)
    with torch.no_grad():
        helper = openvino.OpenVinoBackend(compile_in_helper=True).compile(model, example)
        local = openvino.OpenVinoBackend(compile_in_helper=False).compile(model, example)
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(helper(x), local(x), rtol=0, atol=0)
        torch.testing.assert_close(helper(x), model(x), **TOL)


_CRASH_ONCE = """
import os, runpy, signal, sys
marker, worker = sys.argv[1], sys.argv[2]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGSEGV)
sys.argv = [worker]
runpy.run_path(worker, run_name="__main__")
"""


def test_openvino_helper_crash_fails_the_graph_and_the_next_compile_recovers(tmp_path) -> None:
    """A helper that dies by a signal while compiling (as OpenVINO's CPU plugin does on some graphs)
    gives a ``BackendCompileError`` naming the signal, not a dead caller; the next compile starts a
    new helper, here the real worker (the command crashes its first process only)."""
    import sys

    openvino = _openvino_or_skip()
    command = [sys.executable, "-c", _CRASH_ONCE, str(tmp_path / "crashed"), openvino._WORKER]
    helper = openvino.CompileHelper(command)
    backend = openvino.OpenVinoBackend(helper=helper)
    model, x = MLP().eval(), torch.randn(4, 32)
    try:
        with (
            torch.no_grad(),
            pytest.raises(BackendCompileError, match=r"crashed in the helper process.*SIGSEGV"),
        ):
            backend.compile(model, (x,))
        with torch.no_grad():
            torch.testing.assert_close(backend.compile(model, (x,))(x), model(x), **TOL)
    finally:
        helper.close()


def test_openvino_imported_runner_saves_its_blob_once(tmp_path) -> None:
    """A runner compiled in the helper writes the helper's blob (loadable; an imported model's own
    export is not) and then lets it go: a second save has nothing to write."""
    openvino = _openvino_or_skip()
    backend = openvino.OpenVinoBackend(compile_in_helper=True)
    model, x = MLP().eval(), torch.randn(4, 32)
    for name in "abc":
        (tmp_path / name).mkdir()
    with torch.no_grad():
        runner = backend.compile(model, (x,))
        assert runner.save(tmp_path / "a")
        assert not runner.save(tmp_path / "b")
        loaded = backend.load(tmp_path / "a", (x,))
        assert loaded.save(tmp_path / "c")  # what it was loaded from, written again
        again = backend.load(tmp_path / "c", (x,))
        fresh = torch.randn(4, 32)
        torch.testing.assert_close(again(fresh), model(fresh), **TOL)


def test_openvino_scratch_directories_of_dead_processes_are_removed(tmp_path):
    """[Note: scratch directories of dead processes]: a directory left by a process that is gone is
    removed; those of running processes (this one, its parent) and other names are left alone."""
    import os
    import subprocess
    import sys

    from torch_collage.backends import openvino

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    dead = tmp_path / f"collage-ov-{gone.stdout.strip()}-abc"
    mine = tmp_path / f"collage-ov-{os.getpid()}-def"
    parent = tmp_path / f"collage-ov-{os.getppid()}-ghi"
    other = tmp_path / "collage-ov-notapid"
    for d in (dead, mine, parent, other):
        d.mkdir()
        (d / "model.bin").write_bytes(os.urandom(64))
    assert openvino._sweep_dead.__wrapped__(str(tmp_path)) == 1
    assert not dead.exists()
    assert mine.exists() and parent.exists() and other.exists()


_A = torch.ops.aten


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "random"),
    [
        (_A.native_dropout.default, (0.1, True), {}, True),
        (_A.dropout.default, (0.1, True), {}, True),
        (_A.dropout.default, (0.1, False), {}, False),  # an exported eval graph keeps it: the identity
        (_A.uniform.default, (), {}, True),
        (_A.normal_functional.default, (), {}, True),
        (_A.exponential.default, (), {}, True),
        (_A.randn_like.default, (), {}, True),
        (_A.bernoulli.p, (0.5,), {}, True),
        (_A.scaled_dot_product_attention.default, (None, None), {}, False),
        (_A.scaled_dot_product_attention.default, (None, None), {"dropout_p": 0.2}, True),
        (_A._scaled_dot_product_flash_attention_for_cpu.default, (None, None, 0.1), {}, True),
        (_A.rrelu.default, (0.1, 0.3, True), {}, True),
        (_A.rrelu.default, (0.1, 0.3), {}, False),
        (_A.mm.default, (None,), {}, False),
    ],
)
def test_random_ops_are_known_by_their_tag_and_arguments(target, args, kwargs, random) -> None:
    """torch's ``nondeterministic_seeded`` tag marks a random op, unless its arguments turn the draw
    off (``train=False``, ``dropout_p=0``): only those may go to a runtime ([Note: random ops])."""
    graph = torch.fx.Graph()
    node = graph.call_function(target, (graph.placeholder("x"), *args), kwargs)
    assert deterministic(node) is not random

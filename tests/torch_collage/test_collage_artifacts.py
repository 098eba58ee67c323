"""Compiled partitions saved under the cache and loaded by a warm compile ([Note: compiled artifacts])."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from torch_collage.artifacts import ArtifactStore
from torch_collage.backends import get_backend
from torch_collage.backends._export import GraphIO, export_graph
from torch_collage.backends.registry import registered_backend
from torch_collage.entry import make_backend
from torch_collage.options import CollageOptions
from torch_collage.place import Placer
from torch_collage.timing import QuietProbe

_FAST = {"max_depth": 2, "repeats": 3, "warmup": 1, "progress": False}
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino missing")


def _write(size: int):
    def saver(directory: Path) -> bool:
        (directory / "data").write_bytes(os.urandom(size))
        return True

    return saver


def test_store_round_trip_and_least_recently_used_eviction(tmp_path):
    store = ArtifactStore(str(tmp_path), max_mb=1)
    kb = 1024
    assert store.save("a", _write(400 * kb)) and store.save("b", _write(400 * kb))
    assert not store.save("a", _write(10))  # already there: kept as it was
    assert store.load("a", lambda d: len((d / "data").read_bytes())) == 400 * kb
    os.utime(store.root / "b", (1, 1))  # "b" is now the least recently used
    assert store.save("c", _write(400 * kb))  # 1.2 MB > 1 MB: one entry goes
    assert sorted(p.name for p in store.root.iterdir()) == ["a", "c"]
    assert store.size_bytes() == 800 * kb
    assert store.load("b", lambda d: 1) is None


def test_store_discards_an_entry_that_does_not_load(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path), max_mb=10)
    store.save("k", _write(100))

    def broken(directory: Path) -> int:
        raise RuntimeError("truncated blob")

    with caplog.at_level(logging.WARNING):
        assert store.load("k", broken) is None
    assert "truncated blob" in caplog.text and not (store.root / "k").exists()


def test_store_logs_a_failing_saver_and_leaves_nothing(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path), max_mb=10)

    def failing(directory: Path) -> bool:
        (directory / "half").write_bytes(b"x")
        raise OSError("disk full")

    with caplog.at_level(logging.WARNING):
        assert not store.save("k", failing)
    assert "disk full" in caplog.text and list(store.root.iterdir()) == []
    assert not store.save("k", lambda d: False) and list(store.root.iterdir()) == []
    assert not ArtifactStore(str(tmp_path), max_mb=0).save("k", _write(1))  # disabled
    with pytest.raises(ValueError, match="max_mb"):
        ArtifactStore(str(tmp_path), max_mb=-1)


class _Twice(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor):
        a = torch.relu(x) + y
        return a, {"b": x * 2, "again": a}


def test_graph_io_json_round_trip():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    graph = export_graph("test", _Twice(), (x, y))
    io = GraphIO.from_json(graph.io.to_json())
    assert io == graph.io and io.num_outputs == 2
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out = io.unflatten([a, b])
    assert out[0] is a and out[1]["b"] is b and out[1]["again"] is a
    with pytest.raises(ValueError, match="not a saved graph interface"):
        GraphIO.from_json('{"input_names": []}')
    bad = graph.io.to_json().replace("float32", "Linear")
    with pytest.raises(ValueError, match="not a saved graph interface"):
        GraphIO.from_json(bad)


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_runtime_runner_saves_and_loads(tmp_path, name):
    backend = get_backend(name)
    ok, reason = backend.available()
    if not ok:
        pytest.skip(reason)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    runner = backend.compile(_Twice(), (x, y))
    assert runner.save(tmp_path)
    loaded = backend.load(tmp_path, (x, y))
    x2, y2 = torch.randn(3, 4), torch.randn(3, 4)
    got, want = loaded(x2, y2), _Twice()(x2, y2)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1]["b"], want[1]["b"])
    torch.testing.assert_close(got[1]["again"], want[0])
    with pytest.raises(ValueError, match=r"input 0: compiled for shape \(3, 4\)"):
        backend.load(tmp_path, (torch.randn(5, 4), y))


def test_openvino_runner_loaded_from_the_store_keeps_the_file_not_its_bytes(tmp_path):
    """[Note: the blob a runner keeps]: a loaded runner holds no copy of the weights in memory, still
    saves (a copy of the file it came from), and says so when that file is gone."""
    backend = get_backend("openvino")
    ok, reason = backend.available()
    if not ok:
        pytest.skip(reason)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    first, second, third = (tmp_path / d for d in ("first", "second", "third"))
    for d in (first, second, third):
        d.mkdir()
    assert backend.compile(_Twice(), (x, y)).save(first)
    loaded = backend.load(first, (x, y))
    assert not any(isinstance(v, (bytes, bytearray)) for v in vars(loaded).values())
    assert loaded.save(second)
    assert (second / "model.blob").read_bytes() == (first / "model.blob").read_bytes()
    again = backend.load(second, (x, y))
    x2, y2 = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(again(x2, y2)[0], _Twice()(x2, y2)[0])
    orphan = backend.load(second, (x, y))
    (second / "model.blob").unlink()  # pruned from the store while the runner lives
    assert not orphan.save(third) and not (third / "model.blob").exists()
    torch.testing.assert_close(orphan(x2, y2)[0], _Twice()(x2, y2)[0])  # it still runs


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("store_mb", [0, 64])
def test_partition_runner_keeps_no_serialised_model_once_saved_or_never_to_be(tmp_path, name, store_mb):
    """[Note: the blob a runner keeps]: with the store off, or after saving into it, a runtime's
    partition holds no serialised copy of its model (as large as its weights) while it runs."""
    from torch_collage.backends.registry import get_spec

    spec = get_spec(name)
    ok, reason = spec.available()
    if not ok:
        pytest.skip(reason)
    gm, x = _mlp_graph()
    model, graph = _cost_model(tmp_path, spec, gm, x, compiled_cache_mb=store_mb)
    fresh = model.compile(graph.full, name).fn
    assert not any(isinstance(v, (bytes, bytearray)) for v in vars(fresh).values())
    assert (tmp_path / "compiled").is_dir() == (store_mb > 0)
    x2 = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x2)[0], gm(x2), rtol=1e-4, atol=1e-5)


def _cost_model(tmp_path: Path, spec, gm: fx.GraphModule, x: torch.Tensor, **options):
    from torch_collage.backends.registry import get_spec
    from torch_collage.cache import CostCache
    from torch_collage.cost import CostModel, record_values
    from torch_collage.graph import DataflowGraph

    graph = DataflowGraph.from_graph(gm.graph)
    opts = CollageOptions(cache_dir=str(tmp_path), **{**_FAST, **options})
    specs = {"eager": get_spec("eager"), spec.name: spec}
    return CostModel(gm, graph, record_values(gm, [x]), specs, opts, CostCache(str(tmp_path))), graph


class _Tracing:
    """A user backend that saves what it compiled (the FX code) and loads it, optionally wrongly."""

    def __init__(self, wrong: bool) -> None:
        self.compiles, self.loads, self.wrong = 0, 0, wrong

    def compile(self, gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
        self.compiles += 1
        return gm

    def save(self, fn, directory: Path) -> bool:
        torch.save(fn, directory / "module.pt")
        return True

    def load(self, directory: Path, example_inputs):
        self.loads += 1
        module = torch.load(directory / "module.pt", weights_only=False)
        if self.wrong:
            return lambda *args: tuple(t + 1 for t in module(*args))
        return module


def _mlp_graph(sign: float = 1.0) -> tuple[fx.GraphModule, torch.Tensor]:
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(sign)
    x = torch.randn(4, 16)
    with torch.no_grad():
        return make_fx(model)(x), x


@needs_openvino
def test_openvino_partition_is_loaded_not_compiled_when_warm(tmp_path, monkeypatch):
    from torch_collage.backends.openvino import OpenVinoBackend
    from torch_collage.backends.registry import get_spec

    calls = []
    real = OpenVinoBackend.compile
    monkeypatch.setattr(OpenVinoBackend, "compile", lambda self, *a: calls.append(1) or real(self, *a))
    gm, x = _mlp_graph()
    model, graph = _cost_model(tmp_path, get_spec("openvino"), gm, x)
    assert model.compile(graph.full, "openvino").fn is not None and len(calls) == 1
    assert len(list((tmp_path / "compiled").iterdir())) == 1

    model, graph = _cost_model(tmp_path, get_spec("openvino"), gm, x)  # as a warm compile would
    part = model.compile(graph.full, "openvino")
    assert len(calls) == 1 and model.loaded == 1
    x2 = torch.randn(4, 16)
    torch.testing.assert_close(part.fn(x2)[0], gm(x2), rtol=1e-4, atol=1e-5)

    other, _ = _mlp_graph(sign=-1.0)  # the same graph with other weights: not the saved model
    model, graph = _cost_model(tmp_path, get_spec("openvino"), other, x)
    part = model.compile(graph.full, "openvino")
    assert len(calls) == 2 and model.loaded == 0
    torch.testing.assert_close(part.fn(x2)[0], other(x2), rtol=1e-4, atol=1e-5)


@needs_openvino
def test_damaged_saved_partition_is_compiled_again(tmp_path, caplog):
    from torch_collage.backends.registry import get_spec

    gm, x = _mlp_graph()
    model, graph = _cost_model(tmp_path, get_spec("openvino"), gm, x)
    model.compile(graph.full, "openvino")
    (entry,) = (tmp_path / "compiled").iterdir()
    (entry / "model.blob").write_bytes(os.urandom(1000))
    model, graph = _cost_model(tmp_path, get_spec("openvino"), gm, x)
    with caplog.at_level(logging.WARNING):
        part = model.compile(graph.full, "openvino")
    assert "unusable" in caplog.text and model.loaded == 0
    torch.testing.assert_close(part.fn(x)[0], gm(x), rtol=1e-4, atol=1e-5)
    assert (entry / "model.blob").stat().st_size > 1000  # saved again, whole


def test_warm_compile_through_torch_compile_loads_what_it_saved(tmp_path):
    """End to end with a user backend that can save: the warm compile loads its partitions."""
    backend = _Tracing(wrong=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    with registered_backend("saving", compile=backend.compile, save=backend.save, load=backend.load):
        opts = CollageOptions(backends=("saving",), cache_dir=str(tmp_path), **_FAST)
        placer = Placer(probe=QuietProbe())  # counts timings: [Note: quiet measurements]
        reports: list = []
        compiles = []
        for _ in range(2):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=make_backend(opts, reports.append, placer))
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x))
            compiles.append(backend.compiles)
    cold, warm = reports
    # eager and "saving" run the same graph: either may win end to end. The warm compile loads
    # every "saving" partition of whatever was chosen, and also the runner-up it re-checks the
    # choice against ([Note: quiet measurements]); it compiles nothing and measures nothing
    assert [p.backend for p in warm.partitions] == [p.backend for p in cold.partitions]
    saving = sum(p.backend == "saving" for p in warm.partitions)
    assert warm.measured == 0 and compiles[1] == compiles[0] > 0
    assert warm.loaded == backend.loads and warm.loaded >= saving
    assert len(list((tmp_path / "compiled").glob("*"))) >= 1


@pytest.mark.parametrize("wrong", [False, True])
def test_user_backend_partitions_are_saved_and_checked_when_loaded(tmp_path, caplog, wrong):
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_collage.backends.base import BackendSpec

    backend = _Tracing(wrong)
    spec = BackendSpec(name="saving", compile=backend.compile, save=backend.save, load=backend.load)
    x = torch.randn(8, 8)
    gm = make_fx(lambda t: (t.relu() * 3).sin())(x)
    model, graph = _cost_model(tmp_path, spec, gm, x)
    part = model.compile(graph.full, "saving")
    assert part.fn is not None and backend.compiles == 1 and model.loaded == 0
    assert len(list((tmp_path / "compiled").iterdir())) == 1

    model, graph = _cost_model(tmp_path, spec, gm, x)  # as a warm compile would
    with caplog.at_level(logging.WARNING):
        part = model.compile(graph.full, "saving")
    assert backend.loads == 1 and part.fn is not None
    x2 = torch.randn(8, 8)
    torch.testing.assert_close(part.fn(x2)[0], (x2.relu() * 3).sin())
    if wrong:  # caught by the check against eager, deleted, compiled and saved again
        assert "differs from eager" in caplog.text and model.loaded == 0 and backend.compiles == 2
    else:
        assert model.loaded == 1 and backend.compiles == 1


def test_compiled_cache_mb_option():
    assert CollageOptions().compiled_cache_mb > 0
    with pytest.raises(ValueError, match="compiled_cache_mb must be an int >= 0"):
        CollageOptions(compiled_cache_mb=-1)

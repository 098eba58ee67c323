"""The timing core, the benchmark harness and writer, and one end-to-end run of bench_baselines."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from benchmarks import harness
from benchmarks.checks import compare_outputs
from benchmarks.plotting import PlotSpec, relative_values
from torch_collage import timing
from torch_collage.timing import Measurement, measure, quantile


class FakeClock:
    """Stands in for time.perf_counter_ns; each call of ``step`` advances it by the next duration."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now_ns = 0
        self.durations_ms = list(durations_ms)
        self.calls = 0

    def __call__(self) -> int:
        return self.now_ns

    def step(self) -> None:
        self.now_ns += int(self.durations_ms[self.calls % len(self.durations_ms)] * 1e6)
        self.calls += 1


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock([1.0])
    monkeypatch.setattr(timing.time, "perf_counter_ns", fake)
    return fake


def test_quantile_matches_numpy() -> None:
    values = np.random.default_rng(0).random(37).tolist()
    for q in (0.0, 0.2, 0.25, 0.5, 0.75, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    with pytest.raises(ValueError, match="q must be"):
        quantile(values, 1.5)


def test_measure_statistics_on_controlled_callable(clock: FakeClock) -> None:
    clock.durations_ms = [100.0, 100.0, 100.0, *range(1, 21)]  # three slow warm-up calls, then 1..20
    m = measure(clock.step, warmup=3, repeats=20)
    assert m.samples_ms == tuple(float(x) for x in range(1, 21))
    assert m.median_ms == pytest.approx(10.5)
    assert m.p20_ms == pytest.approx(float(np.quantile(range(1, 21), 0.2)))
    assert m.iqr_ms == pytest.approx(float(np.quantile(range(1, 21), 0.75) - np.quantile(range(1, 21), 0.25)))
    assert (m.mean_ms, m.min_ms) == (pytest.approx(10.5), 1.0)
    assert m.to_dict()["n"] == 20 and m.to_dict()["median_ms"] == pytest.approx(10.5)


def test_measure_extends_to_min_time_and_stops_at_max_time(clock: FakeClock) -> None:
    assert len(measure(clock.step, warmup=0, repeats=5, min_time_s=0.010).samples_ms) == 10
    assert len(measure(clock.step, warmup=2, repeats=100, max_time_s=0.007).samples_ms) == 5
    assert len(measure(clock.step, warmup=50, repeats=10, max_time_s=0.003).samples_ms) == 1


def test_measure_real_sleep() -> None:
    m = measure(lambda: time.sleep(0.002), warmup=1, repeats=5)
    assert len(m.samples_ms) == 5 and 1.9 <= m.min_ms <= m.median_ms < 50


def test_measure_pins_and_restores_threads() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    measure(lambda: seen.append(torch.get_num_threads()), warmup=1, repeats=2, threads=1)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure(boom, threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warmup": -1}, "warmup"),
        ({"repeats": 0}, "repeats"),
        ({"min_time_s": -1.0}, "min_time_s"),
        ({"max_time_s": 0.0}, "max_time_s"),
        ({"threads": 0}, "threads"),
    ],
)
def test_measure_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        measure(lambda: None, **kwargs)


def test_measurement_needs_samples() -> None:
    with pytest.raises(ValueError, match="samples_ms"):
        Measurement(samples_ms=())


def test_rotated_orders_put_every_name_first_once() -> None:
    orders = harness.rotated_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    with pytest.raises(ValueError, match="rounds"):
        harness.rotated_orders(["a"], 0)


def test_measure_interleaved_pools_rounds_in_rotated_order() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("x", "y")}
    stats = harness.measure_interleaved(fns, rounds=2, repeats=4, warmup=1)
    assert [len(stats[n].samples_ms) for n in ("x", "y")] == [4, 4]
    assert calls == ["x"] * 3 + ["y"] * 3 + ["y"] * 3 + ["x"] * 3


def test_measure_rounds_keeps_one_measurement_per_round() -> None:
    fns = {"x": lambda: None, "y": lambda: sum(range(1000))}
    blocks = harness.measure_rounds(fns, rounds=3, repeats=7, warmup=0)
    assert [len(blocks[n]) for n in ("x", "y")] == [3, 3]
    assert all(len(m.samples_ms) == 3 for m in blocks["x"])  # ceil(7 / 3) per round
    assert len(harness.pool(blocks["y"]).samples_ms) == 9


def test_paired_ratio_cancels_a_drift_the_pooled_medians_do_not() -> None:
    # the machine slows 2x, then 4x, in later rounds; b is 5% faster than a in every round
    a = [1.0, 2.0, 4.0, 4.0]
    b = [x / 1.05 for x in a]
    b = [b[0], b[1], b[2] * 0.5, b[3]]  # one round where b happened to run before the slowdown
    assert harness.paired_ratio(a, b) == pytest.approx(1.05)
    assert quantile(a, 0.5) / quantile(b, 0.5) != pytest.approx(1.05)
    with pytest.raises(ValueError, match="equally many rounds"):
        harness.paired_ratio([1.0], [1.0, 2.0])


def test_machine_info_and_header(capsys: pytest.CaptureFixture[str]) -> None:
    info = harness.machine_info()
    assert info["cores"] >= 1 and info["torch_threads"] >= 1 and "torch" in info["versions"]
    harness.print_header(info)
    assert "torch_threads" in capsys.readouterr().out
    assert "WARNING" in harness.load_note({"load_avg_1m": 9.0, "cores": 2})
    assert "WARNING" not in harness.load_note({"load_avg_1m": 0.1, "cores": 2})


def _rows() -> list[dict]:
    base = {"model": "mlp", "batch": 1}
    return [
        base | {"backend": "eager", "status": "ok", "median_ms": 2.0, "iqr_ms": 0.1, "speedup": 1.0},
        base | {"backend": "inductor", "status": "ok", "median_ms": 1.0, "iqr_ms": 0.1, "speedup": 2.0},
        base | {"backend": "openvino", "status": "fail", "error": "BackendCompileError: op | x"},
        base | {"backend": "onnxruntime", "status": "mismatch", "median_ms": 4.0, "max_abs_err": 0.5},
    ]


def test_relative_values_against_eager() -> None:
    values = relative_values(_rows(), PlotSpec())
    assert values == {"mlp\nb=1": {"eager": 1.0, "inductor": 0.5, "openvino": None, "onnxruntime": 2.0}}


def test_write_results_writes_json_markdown_png(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    table = harness.ResultTable(harness.BASELINE_COLUMNS)
    for row in _rows():
        table.add(**row)
    info = {"cpu": "test cpu", "versions": {"torch": torch.__version__}}
    paths = harness.write_results(
        "theme", "hw", info, table, notes=["a note"], out_dir=tmp_path, command="cmd x"
    )
    assert {p.name for p in tmp_path.iterdir()} == {"theme_hw.json", "theme_hw.md", "theme_hw.png"}
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "cmd x" and data["machine"]["cpu"] == "test cpu"
    assert [r["backend"] for r in data["rows"]] == ["eager", "inductor", "openvino", "onnxruntime"]
    md = paths["md"].read_text()
    assert "`cmd x`" in md and "test cpu" in md and "- a note" in md and "theme_hw.png" in md
    assert "| mlp | 1 | inductor | ok | 1.000 | 0.100 | 2.00x |" in md
    assert "op \\| x" in md  # a '|' inside a cell is escaped
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "inductor" in capsys.readouterr().out
    with pytest.raises(ValueError, match="theme"):
        harness.write_results("a/b", "hw", info, table, out_dir=tmp_path)


def test_compare_outputs() -> None:
    ref = (torch.randn(3, 4), {"i": torch.arange(5)})
    assert compare_outputs(ref, (ref[0] + 1e-6, {"i": torch.arange(5)})).ok
    off = compare_outputs(ref, (ref[0] + 1.0, {"i": torch.arange(5)}))
    assert not off.ok and off.max_abs_err == pytest.approx(1.0) and "differ" in off.message
    assert not compare_outputs(ref, (ref[0], {"i": torch.arange(5) + 1})).ok
    assert "shape" in compare_outputs(ref[0], ref[0][:2]).message
    assert "output tensors" in compare_outputs(ref, ref[0]).message


def test_bench_baselines_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_baselines

    argv = ["--models", "mlp,bert", "--size", "tiny", "--batches", "1", "--repeats", "3"]
    argv += ["--backends", "eager,inductor,onnxruntime", "--out-dir", str(tmp_path), "--threads", "1"]
    assert bench_baselines.main(argv) == 0
    data = json.loads((tmp_path / "baselines_cpu.json").read_text())
    backends = ["eager", "inductor", "onnxruntime"]
    assert [(r["model"], r["backend"], r["status"]) for r in data["rows"]] == [
        (model, backend, "ok") for model in ("mlp", "bert") for backend in backends
    ]
    assert all(r["median_ms"] > 0 and r["compile_s"] >= 0 for r in data["rows"])
    assert (tmp_path / "baselines_cpu.md").exists() and (tmp_path / "baselines_cpu.png").exists()
    out = capsys.readouterr().out
    assert "mlp b=1: best" in out and "bert b=1: best" in out


def test_compare_to_float64_scales_with_eagers_own_error() -> None:
    from benchmarks.checks import compare_to_float64, float64_reference

    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]).eval()
    x = (torch.randn(8, 64),)
    ref64, eager = float64_reference(module, x), module(*x).detach()
    eager_err = (eager.double() - ref64).abs().max().item()
    assert eager_err > 0
    near = eager + eager_err * torch.randn_like(eager).clamp(-2, 2)  # within 3x eager's error
    assert compare_to_float64(ref64, eager, near).ok
    far = eager.clone()
    far[0, 0] += 100 * eager_err + 1e-3
    result = compare_to_float64(ref64, eager, far)
    assert not result.ok and "error vs float64" in result.message
    ints = torch.randint(0, 9, (4,))
    assert not compare_to_float64(ints, ints, ints + 1).ok
    assert not compare_to_float64(ref64, eager, eager[:4]).ok  # shape mismatch

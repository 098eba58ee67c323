"""The collage benchmark's verdict lines, from rows shaped as the benchmark writes them."""

from __future__ import annotations

from benchmarks.bench_collage import summary


def _row(backend: str, ms: float, **extra) -> dict:
    return {"model": "m", "batch": 8, "backend": backend, "status": "ok", "median_ms": ms, **extra}


def test_summary_ratios_verdicts_and_geomeans():
    rows = [
        _row("eager", 10.0),
        _row("openvino", 4.0),
        _row("onnxruntime", 5.0),
        _row("openvino (torch.compile)", 6.0),
        _row("collage", 4.4, predicted_ms=4.0, compile_s=100.0, warm_s=5.0),
        _row("collage (export)", 4.08),
    ]
    lines = summary(rows)
    assert lines[0].startswith("m b=8: collage 4.400 ms = 1.10x best single (openvino 4.000 ms); MISSES")
    assert "export entry 1.02x (meets 1.03x)" in lines[0]
    assert "predicted 4.000 ms (-9%)" in lines[0] and "warm 5.0 s (5% of cold)" in lines[0]
    assert "openvino (torch.compile): 1.36x slower than collage" in lines[0]
    assert "0.909x (target >= 1.10x)" in lines[1]
    assert "export entry over the per-model best single backend: 0.980x" in lines[2]


def test_summary_without_collage_says_so():
    lines = summary([_row("eager", 1.0), {**_row("collage", 0.0), "status": "fail"}])
    assert lines == ["m b=8: no comparison (collage or every single backend failed)"]

"""The collage benchmark's verdict lines, from rows shaped as the benchmark writes them."""

from __future__ import annotations

from benchmarks.collage_summary import summary


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
    assert "best torch.compile backend (openvino (torch.compile)): 1.36x collage's time" in lines[0]
    assert "0.909x (target >= 1.10x)" in lines[1]
    assert "export entry over the per-model best single backend: 0.980x" in lines[2]


def test_summary_without_collage_says_so():
    lines = summary([_row("eager", 1.0), {**_row("collage", 0.0), "status": "fail"}])
    assert lines == ["m b=8: no comparison (collage or every single backend failed)"]


def test_summary_pairs_rounds_when_rows_carry_them():
    # openvino's pooled median is lower, but collage was within 1% of it in every round
    ov = [4.0, 4.0, 8.0, 8.0]
    rows = [
        _row("openvino", 5.0, round_ms=ov),
        _row("collage", 6.0, round_ms=[x * 1.01 for x in ov]),
        _row("collage (export)", 6.0, round_ms=[x * 1.05 for x in ov]),
        _row("openvino (torch.compile)", 9.0, round_ms=[x * 1.5 for x in ov]),
    ]
    lines = summary(rows)
    assert "= 1.01x best single (openvino 5.000 ms); meets" in lines[0]
    assert "4 rounds paired (pooled medians: 1.20x)" in lines[0]
    assert "export entry 1.05x (misses 1.03x)" in lines[0]
    assert "openvino (torch.compile): 1.49x slower than collage" in lines[0]
    assert "0.990x (target >= 1.10x)" in lines[1]


def test_summary_like_for_like_counts_inductor_as_a_torch_compile_backend():
    rows = [
        _row("openvino", 4.0),
        _row("inductor", 5.0),  # torch.compile(backend="inductor"): through dynamo, like collage
        _row("openvino (torch.compile)", 6.0),
        _row("collage", 4.0),
    ]
    lines = summary(rows)
    assert "best torch.compile backend (inductor): 1.25x collage's time" in lines[0]
    assert lines[-1].endswith("(like for like, both through dynamo): 1.250x")


def test_summary_reports_the_unguarded_entry():
    rows = [
        _row("openvino", 4.0),
        _row("collage", 4.4),
        _row("collage (module guards skipped)", 4.2),
    ]
    lines = summary(rows)
    assert "best single (openvino 4.000 ms)" in lines[0]  # the unguarded row is not a single backend
    assert "module guards skipped 1.05x (misses 1.03x)" in lines[0]
    assert lines[-1].endswith("best single backend: 0.952x")


def test_summary_shows_both_rankings_when_the_search_ranked_the_backends_otherwise():
    rows = [
        _row("openvino", 4.0),
        _row("inductor", 6.0),
        _row("inductor_freezing", 3.0),  # collage's Inductor partitions are frozen: this row stands for them
        _row("collage", 4.1, search_singles_ms={"eager": 9.0, "inductor": 3.5, "openvino": 3.2}),
    ]
    lines = summary(rows)
    assert "best single (inductor_freezing 3.000 ms)" in lines[0]
    assert (
        "rank the single backends differently (search/bench ms): openvino 3.200/4.000, inductor 3.500/3.000"
        in lines[0]
    )


def test_summary_says_nothing_of_rankings_when_they_agree():
    rows = [
        _row("openvino", 4.0),
        _row("onnxruntime", 5.0),
        _row("collage", 4.1, search_singles_ms={"onnxruntime": 4.9, "openvino": 3.9}),
    ]
    assert "rank" not in summary(rows)[0]


def test_checked_row_records_a_failing_compile_and_checks_the_callable():
    import torch

    from benchmarks.bench_collage import _checked_row

    x = torch.randn(5, 3)
    reference = (x.double() * 2, x * 2)

    def broken():
        raise RuntimeError("backend exploded")

    row, fn = _checked_row({"backend": "b"}, broken, (x,), reference)
    assert fn is None and row["status"] == "fail" and row["error"] == "RuntimeError: backend exploded"

    row, fn = _checked_row({"backend": "b"}, lambda: (lambda t: t * 2, {"compile_s": 1.5}), (x,), reference)
    assert row["status"] == "ok" and row["compile_s"] == 1.5 and fn is not None

    row, _ = _checked_row({"backend": "b"}, lambda: (lambda t: t * 3, {}), (x,), reference)
    assert row["status"] == "mismatch" and row["max_abs_err"] > 0


def test_summary_sets_the_predictions_beside_the_search_own_timing():
    """The dynamo entry's prediction leaves out dynamo's frame; the export entry's and the search's own
    end-to-end time show how much of the error is the frame and how much the machine's drift."""
    rows = [
        _row("openvino", 1.0),
        _row("collage", 1.25, predicted_ms=1.0, search_e2e_ms=1.05),
        _row("collage (export)", 1.1, predicted_ms=1.0),
    ]
    line = summary(rows)[0]
    assert "predicted 1.000 ms (-20%)" in line
    assert "the search timed it 1.050 ms end to end, without dynamo's frame (-16%)" in line
    assert "export entry predicted 1.000 ms (-9%)" in line


def test_summary_shows_the_end_to_end_check_only_where_it_chose_otherwise():
    otherwise = {"onnxruntime": 5.2, "openvino": 5.6}  # the check timed ONNX Runtime faster
    rows = [
        _row("openvino", 4.0),
        _row("onnxruntime", 5.0),
        _row("collage", 5.1, search_compared_ms=otherwise),
    ]
    assert "the search's end-to-end check ranked onnxruntime 5.200, openvino 5.600 ms" in summary(rows)[0]
    agreed = {"onnxruntime": 5.2, "openvino": 4.1}
    rows[-1] = _row("collage", 4.1, search_compared_ms=agreed)
    assert "end-to-end check" not in summary(rows)[0]

"""The cache-parallel benchmark's verdict lines, from rows shaped as the benchmark writes them."""

from __future__ import annotations

from benchmarks.bench_cp import target_lines


def _rows(length: int, cpp_ms: float, sdpa_ms: float, ceiling_ms: float) -> list[dict]:
    def row(impl: str, ms: float) -> dict:
        return {"part": "kernel", "context": length, "impl": impl, "median_ms": ms,
                "of_ceiling": ceiling_ms / ms, "vs_sdpa": sdpa_ms / ms}  # fmt: skip

    return [row("cpp", cpp_ms), row("sdpa", sdpa_ms), row("read ceiling", ceiling_ms)]


def test_verdicts_only_from_32k_and_name_the_bound():
    rows = _rows(16384, 1.0, 10.0, 0.5) + _rows(32768, 12.5, 35.0, 10.4) + _rows(65536, 8.0, 50.0, 6.0)
    lines = target_lines(rows)
    assert len(lines) == 2  # 16K is below the targets' range
    assert lines[0].startswith(
        "L=32768: C++ kernel 83% of the read ceiling (meets 60%), 2.80x SDPA (MISSES 5x"
    )
    assert "unreachable here: reading the cache at the ceiling is only 3.37x SDPA" in lines[0]
    assert lines[1] == (
        "L=65536: C++ kernel 75% of the read ceiling (meets 60%), 6.25x SDPA (meets 5x; the ceiling allows 8.33x)"
    )


def test_a_kernel_below_what_the_ceiling_allows_is_not_excused():
    (line,) = target_lines(_rows(32768, 20.0, 60.0, 6.0))
    assert "30% of the read ceiling (MISSES 60%)" in line
    assert "3.00x SDPA (MISSES 5x; the ceiling allows 10.00x)" in line

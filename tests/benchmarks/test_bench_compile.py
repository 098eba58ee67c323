"""bench_compile's arguments and its budget verdicts."""

from __future__ import annotations

import pytest

from benchmarks.bench_compile import parse_args, summary


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--budgets", "default,abc"], "--budgets"),
        (["--budgets", "-5"], "--budgets"),
        (["--models", "gpt9"], "--models"),
    ],
)
def test_bad_arguments_are_named(capsys, argv, named):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert named in capsys.readouterr().err


def test_the_summary_says_which_compile_overran_its_budget():
    rows = [
        {"model": "m", "run": "inductor", "compile_s": 3.0},
        {"model": "m", "run": "collage (defaults)", "compile_s": 40.0, "vs_budget": 0.8},
        {"model": "m", "run": "collage, time_budget_s=20", "compile_s": 23.0, "vs_budget": 1.15},
    ]
    lines = summary(rows)
    assert lines == [
        "m, collage (defaults): first call 40.0 s, within its budget",
        "m, collage, time_budget_s=20: first call 23.0 s, 15% over its budget",
    ]

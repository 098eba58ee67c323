"""The standalone OpenVINO reproduction runs a case in a child process and reports its outcome."""

from __future__ import annotations

import argparse
import re

import pytest

from benchmarks.repro_openvino_snippets import _ints, _run
from torch_collage.backends import get_backend


def test_a_case_that_compiles_reports_its_error_against_pytorch():
    if not get_backend("openvino").available()[0]:
        pytest.skip("openvino is not installed")
    # one block at batch 2 compiles everywhere seen so far, with and without snippets
    for snippets in ("default", "disable"):
        outcome = _run(2, 16, 1, snippets, timeout_s=120)
        match = re.fullmatch(r"ok, max abs err (\S+)", outcome)
        assert match, outcome
        assert float(match.group(1)) < 1e-4


@pytest.mark.parametrize("text", ["", "4,x", "0,4", "-2"])
def test_grid_arguments_are_checked(text):
    with pytest.raises(argparse.ArgumentTypeError, match="integers"):
        _ints(text)
    assert _ints("2,4,8") == [2, 4, 8]

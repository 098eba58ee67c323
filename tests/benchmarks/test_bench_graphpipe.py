"""bench_graphpipe's emulated devices: every action lasts its planned cost, or its real work where that
is longer (see [Note: emulated device time]), and the stage time respects the tiny model's real work
(see [Note: emulated time and real work]) with a warning where it is too little."""

from __future__ import annotations

import argparse
import time

import pytest

from benchmarks.graphpipe_workloads import REAL_WORK_RATIO, EmulatedDevice, stage_ms, workloads


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("work_s", [0.0, 0.004])
def test_an_action_lasts_its_cost_when_its_work_is_shorter(work_s):
    device = EmulatedDevice({"F": 25.0, "W": 0.0})
    start = time.perf_counter()
    with device.action("F"):
        _busy(work_s)
    assert time.perf_counter() - start >= 0.025
    start = time.perf_counter()
    with device.action("W"):  # a zero cost adds nothing
        pass
    assert time.perf_counter() - start < 0.005


def test_an_action_whose_work_outlasts_its_cost_is_not_extended():
    device = EmulatedDevice({"B": 5.0})
    start = time.perf_counter()
    with device.action("B"):
        _busy(0.02)
        inner = time.perf_counter() - start
    assert inner >= 0.02 and time.perf_counter() - start - inner < 0.004


def test_bad_costs_are_named():
    with pytest.raises(ValueError, match=r"'I': -1\.0"):
        EmulatedDevice({"F": 1.0, "I": -1.0})
    with pytest.raises(KeyError), EmulatedDevice({"F": 1.0}).action("W"):
        pass


def test_stage_time_is_the_workloads_and_too_little_is_warned(capsys):
    workloads_ = workloads()
    stage, real = stage_ms(workloads_["mmt"], argparse.Namespace(target_ms=20.0))
    assert stage == workloads_["mmt"].stage_ms == 60.0 and real > 0  # fixed, whatever the measurement
    assert stage_ms(workloads_["chain"], argparse.Namespace(target_ms=20.0))[0] == 20.0
    capsys.readouterr()
    stage, real = stage_ms(workloads_["chain"], argparse.Namespace(target_ms=1e-3))
    assert stage == 1e-3 and REAL_WORK_RATIO * real > stage
    assert "WARNING: chain's tiny model takes" in capsys.readouterr().err

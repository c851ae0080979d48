"""LoadTimes: the phases of a model load, as the engine and executor constructors time them."""

from __future__ import annotations

import time

import pytest

from kubellm.runtime.executor.load_times import PHASES, LoadTimes


def test_phases_add_up_and_the_slowest_is_named():
    times = LoadTimes()
    assert tuple(times.phases) == PHASES == ("download", "weights", "warmup")
    with times.phase("weights"):
        time.sleep(0.02)
    with times.phase("warmup"):
        pass
    with times.phase("weights"):   # a phase met twice (a group's join, then the checkpoint) adds up
        time.sleep(0.02)
    assert times.phases["weights"] >= 0.04 and times.phases["download"] == 0.0
    assert times.slowest == "weights"


def test_the_log_line():
    times = LoadTimes(phases={"download": 1.3, "weights": 9.04, "warmup": 3.2}, total=13.6)
    assert times.describe() == "13.6 s (download 1.3 s, weights 9.0 s, warmup 3.2 s)"


def test_a_failing_phase_still_counts_and_an_unknown_one_is_refused():
    times = LoadTimes()
    with pytest.raises(OSError), times.phase("download"):
        time.sleep(0.01)
        raise OSError("the download broke")
    assert times.phases["download"] >= 0.01
    with pytest.raises(ValueError, match="phase: 'compile' is not one of download, weights, warmup"):
        with times.phase("compile"):
            pass

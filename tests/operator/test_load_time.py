"""Time to ready per replica group (operator/load_time.py): pure, from pods as the API server returns them."""

import pytest

from kubellm.operator.load_time import (GroupTiming, group_timing, last_load_seconds, load_events,
                                        slow_load_after)
from kubellm.operator.status import GroupState


def pod(scheduled="", started="", ready="", deleting=False, container="worker"):
    conditions = []
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled})
    conditions.append({"type": "Ready", "status": "True" if ready else "False",
                       "lastTransitionTime": ready or "2026-01-01T00:00:00Z"})
    state = {"running": {"startedAt": started}} if started else {"waiting": {"reason": "ContainerCreating"}}
    meta = {"name": "p", "uid": "u", "labels": {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:09:00Z"
    return {"metadata": meta, "status": {"conditions": conditions,
                                         "containerStatuses": [{"name": container, "state": state}]}}


def group(*pods, expected=None):
    return GroupState(1, pods=list(pods), expected_pods=expected or len(pods))


T0, T1, T2, T3 = "2026-01-01T10:00:00Z", "2026-01-01T10:00:04Z", "2026-01-01T10:00:09Z", "2026-01-01T10:01:00Z"


@pytest.mark.parametrize("pods, want", [
    # one pod: scheduled, its worker started, Ready 51 s after the start
    ([pod(T0, T1, T3)], GroupTiming(1, T0, T1, T3)),
    # two ranks: the group's times are its last pod's (it serves once both do)
    ([pod(T0, T1, T2), pod(T1, T2, T3)], GroupTiming(1, T1, T2, T3)),
    # a rank still creating its container: no load start yet, not ready
    ([pod(T0, T1, T2), pod(T0)], GroupTiming(1, T0, "", "")),
    # unscheduled: nothing yet
    ([pod()], GroupTiming(1)),
    # a pod being deleted does not count; the group (1 of 2 pods left) does not serve
    ([pod(T0, T1, T3), pod(T0, T0, T1, deleting=True)], GroupTiming(1, T0, T1, "")),
    # the load starts with the worker container, not an init container or a sidecar
    ([pod(T0, T1, T3, container="download-model")], GroupTiming(1, T0, "", T3)),
])
def test_group_timing(pods, want):
    g = group(*pods, expected=2 if any(p["metadata"].get("deletionTimestamp") for p in pods) else None)
    assert group_timing(g) == want


def test_load_seconds_and_status_entry():
    timing = GroupTiming(0, T0, T1, T3)
    assert timing.load_seconds == 56.0
    assert timing.status() == {"index": 0, "scheduledAt": T0, "loadStartedAt": T1, "readyAt": T3, "loadSeconds": 56.0}
    assert "loadSeconds" not in GroupTiming(0, T0, T1).status()   # the CRD has no nulls


def test_last_load_is_the_group_that_became_ready_last():
    early, late = GroupTiming(0, T0, T0, T2), GroupTiming(1, T0, T1, T3)
    assert last_load_seconds([early, late], None) == 56.0
    assert last_load_seconds([late, early], None) == 56.0
    assert last_load_seconds([GroupTiming(0, T0, T1)], 12.5) == 12.5   # none ready now: the last value stays
    assert last_load_seconds([], None) is None


@pytest.mark.parametrize("startup_timeout, slow_after", [(1800, 120), (240, 120), (200, 100), (30, 15)])
def test_slow_is_over_two_minutes_or_half_the_startup_timeout(startup_timeout, slow_after):
    assert slow_load_after(startup_timeout) == slow_after


PHASES = {"download": 3.0, "weights": 150.2, "warmup": 20.5}


@pytest.mark.parametrize("timing, phases, unavailable, want", [
    # a quick load: ModelLoaded with the phases
    (GroupTiming(2, T0, T1, T3), {"download": 0.0, "weights": 40.0, "warmup": 10.0}, "",
     [("Normal", "ModelLoaded", "replica group 2: the model loaded in 56 s, from its worker's start to Ready "
                                "(download 0.0 s, weights 40.0 s, warmup 10.0 s)")]),
    # no metrics: still the time
    (GroupTiming(2, T0, T1, T3), None, "unreachable", [
        ("Normal", "ModelLoaded", "replica group 2: the model loaded in 56 s, from its worker's start to Ready")]),
    # slow: the Warning names the longest phase
    (GroupTiming(0, T0, "2026-01-01T10:00:00Z", "2026-01-01T10:03:00Z"), PHASES, "", [
        ("Normal", "ModelLoaded", "replica group 0: the model loaded in 180 s, from its worker's start to Ready "
                                  "(download 3.0 s, weights 150.2 s, warmup 20.5 s)"),
        ("Warning", "SlowModelLoad", "replica group 0: the model took 180 s to load (slow: over 120 s); most of it "
                                     "reading the weights (150.2 s; download 3.0 s, weights 150.2 s, warmup 20.5 s)")]),
    # with the worker's own total: the rest of the time is its process starting, which can be what was slow
    (GroupTiming(0, T0, "2026-01-01T10:00:00Z", "2026-01-01T10:03:00Z"), {**PHASES, "total": 173.7}, "", [
        ("Normal", "ModelLoaded", "replica group 0: the model loaded in 180 s, from its worker's start to Ready "
                                  "(the worker's own load 173.7 s: download 3.0 s, weights 150.2 s, warmup 20.5 s; "
                                  "the rest is the process starting and readiness)"),
        ("Warning", "SlowModelLoad", "replica group 0: the model took 180 s to load (slow: over 120 s); most of it "
                                     "reading the weights (150.2 s; download 3.0 s, weights 150.2 s, warmup 20.5 s)")]),
    (GroupTiming(0, T0, "2026-01-01T10:00:00Z", "2026-01-01T10:03:00Z"),
     {"download": 0.0, "weights": 20.0, "warmup": 5.0, "total": 25.0}, "", [
        ("Normal", "ModelLoaded", "replica group 0: the model loaded in 180 s, from its worker's start to Ready "
                                  "(the worker's own load 25.0 s: download 0.0 s, weights 20.0 s, warmup 5.0 s; "
                                  "the rest is the process starting and readiness)"),
        ("Warning", "SlowModelLoad", "replica group 0: the model took 180 s to load (slow: over 120 s); most of it "
                                     "starting the worker process and passing its readiness probe (155.0 s; "
                                     "download 0.0 s, weights 20.0 s, warmup 5.0 s)")]),
    # slow without metrics: says why there are no phases and where to look
    (GroupTiming(0, T0, "2026-01-01T10:00:00Z", "2026-01-01T10:03:00Z"), {}, "http://10.0.0.1:9090/metrics: timed out", [
        ("Normal", "ModelLoaded", "replica group 0: the model loaded in 180 s, from its worker's start to Ready"),
        ("Warning", "SlowModelLoad", "replica group 0: the model took 180 s to load (slow: over 120 s); its load phases "
                                     "could not be read (http://10.0.0.1:9090/metrics: timed out); the worker's log "
                                     "says where the time went")]),
    # not loaded yet: nothing to say
    (GroupTiming(0, T0, T1), PHASES, "", []),
])
def test_load_events(timing, phases, unavailable, want):
    assert load_events(timing, phases, 120.0, unavailable) == want

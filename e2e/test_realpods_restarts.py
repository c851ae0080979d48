"""Bounded restarts on the real-pod tier: a deployment whose model path does not exist crashes in a real
container; the operator reports the crash-looping rank in the GroupFailed condition and quotes the crashed
container's log, read through the API server's pods/log (under the chart's RBAC), and the Warning Event says
the same. Shares test_realpods.py's release (its module fixture, set up again for this module)."""

from __future__ import annotations

import time

import pytest

from test_realpods import FIGURES, NS, apply, get, release  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_a_crash_looping_rank_is_reported_with_its_log(release):
    c = release
    t0 = time.monotonic()
    apply(c, {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "broken"},
              "spec": {"model": {"source": "/models/does-not-exist"}, "device": "cpu",
                       "replicas": 1, "maxGroupRestarts": 1,   # the release's runtimeImage (-cpu)
                       "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}}})
    try:
        status = c.wait_for(lambda: (lambda s: s if condition(s, "GroupFailed").get("status") == "True" else None)(
            get(c, "llmd", "broken").get("status") or {}), "GroupFailed reported", timeout=240, interval=1)
        FIGURES["crash_to_group_failed_s"] = round(time.monotonic() - t0, 1)
        failed = condition(status, "GroupFailed")
        assert failed["reason"] == "CrashLoopBackOff", failed
        message = failed["message"]
        assert "replica group 0, rank pod broken-g0-0" in message, message
        assert "last log lines of its worker" in message, message
        assert "/models/does-not-exist' is neither an existing directory" in message, message
        events = [e for e in get(c, "events")["items"] if e["reason"] == "RankCrashLooping"]
        assert events and "broken-g0-0" in events[0]["message"], events
        print(f"\nGroupFailed after {FIGURES['crash_to_group_failed_s']} s:\n{message}")
    finally:
        c.kubectl("delete", "llmd", "broken", "-n", NS, "--wait=false", check=False)

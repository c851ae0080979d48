"""Drain on the real-pod tier: under a steady streaming load through the router Service, a rolling update,
deleting one group's pod by hand and scaling 2 -> 1 lose nothing. The pods stop as Kubernetes stops them
(spec.drain: a preStop sleep, SIGTERM, the worker drains its streams, then exits within the grace period).

For each: 0 requests failed that had not started, and 0 streams cut (every stream here finishes in a few
seconds, well within the drain timeout, so any cut one could have finished). The counts are printed.

Shares test_realpods.py's release and CPU example (its module fixtures, set up again for this module).
"""

from __future__ import annotations

import json
import time

import pytest

from test_realpods import NS, FIGURES, Load, get, phase, port_forward, release, smollm2  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]

TOKENS = 48   # per stream: a few seconds on CPU


def worker_pods(c) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in get(c, "pods", "-l", "app.kubernetes.io/component=worker")["items"]}


def all_ready(pod: dict) -> bool:
    statuses = pod["status"].get("containerStatuses") or []
    return bool(statuses) and all(s["ready"] for s in statuses) and not pod["metadata"].get("deletionTimestamp")


def counts(load: Load, what: str, leaving: tuple[str, float] | None = None) -> dict:
    """The figures; `leaving`: (replica prefix, when it was told to go): its streams that ended OK after that."""
    results = load.results
    ok = [r for r in results if r["error"] is None]
    not_started = [r for r in results if r["error"] and not r["started"]]
    cut = [r for r in results if r["error"] and r["started"]]
    longest = max((r["end"] - r["t"] for r in ok), default=0.0)
    figures = {"requests": len(results), "failed_before_start": len(not_started), "streams_cut": len(cut),
               "longest_stream_s": round(longest, 1)}
    if leaving:
        figures["finished_on_the_leaving_pod"] = load.served_by(leaving[0], leaving[1], float("inf"))
    FIGURES[f"drain_{what}"] = figures
    print(f"\n{what} under load: {json.dumps(figures)}")
    assert ok, results
    assert longest < 30, figures   # every stream could finish within the drain timeout (30 s)
    assert not not_started, not_started
    assert not cut, cut
    return figures


@pytest.fixture(scope="module")
def drained(smollm2):   # noqa: F811 - the imported fixture
    """The CPU example (2 replicas) with its spec.drain stated, as a user would."""
    c = smollm2
    spec = get(c, "llmd", "smollm2")["spec"]
    assert R_DEFAULTS == {k: spec.get("drain", {}).get(k) for k in R_DEFAULTS}, spec.get("drain")   # the CRD's defaults
    pod = get(c, "pods", "smollm2-g0-0")
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 5 + 30
    assert pod["spec"]["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    return c


R_DEFAULTS = {"preStopSeconds": 5, "timeoutSeconds": 30}


def test_rolling_update_under_load_loses_nothing(drained):
    c = drained
    before = {p["metadata"]["uid"] for p in worker_pods(c).values()}
    with port_forward(c, "svc/smollm2", 50051) as ports:
        with Load(f"127.0.0.1:{ports[50051]}", threads=4, max_new_tokens=TOKENS) as load:
            time.sleep(5)
            # A worker change rolls the groups, one at a time (not the router: kubectl port-forward holds one
            # router pod, so a client here could not retry on another router as one through the Service does).
            c.kubectl("patch", "llmd", "smollm2", "-n", NS, "--type=merge",
                      "-p", json.dumps({"spec": {"generation": {"maxNewTokens": 9}}}))

            def rolled():
                fresh = [p for p in worker_pods(c).values() if p["metadata"]["uid"] not in before and all_ready(p)]
                return len(fresh) == 2 and phase(c, "smollm2") == "Ready"
            c.wait_for(rolled, "both groups rolled and Ready", timeout=900, interval=1)
            time.sleep(3)
    counts(load, "rolling_update")


def test_deleting_a_groups_pod_under_load_loses_nothing(drained):
    c = drained
    with port_forward(c, "svc/smollm2", 50051) as ports:
        with Load(f"127.0.0.1:{ports[50051]}", threads=4, max_new_tokens=TOKENS) as load:
            time.sleep(5)
            old = get(c, "pods", "smollm2-g1-0")["metadata"]["uid"]
            t_delete = time.monotonic()
            c.kubectl("delete", "pod", "smollm2-g1-0", "-n", NS, "--wait=false")

            def back():
                pod = worker_pods(c).get("smollm2-g1-0")
                return pod is not None and pod["metadata"]["uid"] != old and all_ready(pod) \
                    and phase(c, "smollm2") == "Ready"
            c.wait_for(back, "group 1 back and Ready", timeout=600, interval=1)
            time.sleep(3)
    counts(load, "pod_delete", leaving=("smollm2-g1", t_delete))


def test_scale_down_under_load_loses_nothing(drained):
    c = drained
    with port_forward(c, "svc/smollm2", 50051) as ports:
        with Load(f"127.0.0.1:{ports[50051]}", threads=4, max_new_tokens=TOKENS) as load:
            time.sleep(5)
            t_scale = time.monotonic()
            c.kubectl("scale", "llmd", "smollm2", "-n", NS, "--replicas=1")
            # The operator removes the group with the fewest requests in flight (the routers' counts), which
            # under an even load may be either one.
            c.wait_for(lambda: len(worker_pods(c)) == 1 or None, "one group gone", timeout=180, interval=0.5)
            time.sleep(3)
    kept = next(iter(worker_pods(c)))
    left = "smollm2-g1" if kept == "smollm2-g0-0" else "smollm2-g0"
    counts(load, "scale_2_to_1", leaving=(left, t_scale))
    assert phase(c, "smollm2") == "Ready"

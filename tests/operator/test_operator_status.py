"""Status derivation from observed children (pure functions, no API server)."""

import pytest

from kubellm.operator import resources as R
from kubellm.api.spec import InferencePoolSpec, LLMDeploymentSpec
from kubellm.operator.status import (CRASH_LOOP, FAILED, GROUP_FAILED, READY_PODS, RESTARTING, TOO_MANY_RESTARTS,
                                     compute_status, group_states, inference_pool_condition, phase_event,
                                     rank_failure_message)

SPEC = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "tensorParallel": 2, "gpusPerPod": 1,
                                         "replicas": 2})
HASH = R.worker_spec_hash(SPEC)


def pod(group, ordinal, ready=True, spec_hash=HASH, restarts=0, unschedulable=""):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    return {"metadata": {"name": f"x-g{group}-{ordinal}", "uid": f"u{group}{ordinal}{spec_hash[:2]}",
                         "labels": {R.GROUP_LABEL: str(group)}, "annotations": {R.SPEC_HASH: spec_hash}},
            "status": {"phase": "Running", "conditions": conditions,
                       "containerStatuses": [{"restartCount": restarts}]}}


def sts(group, **annotations):
    return {"metadata": {"labels": {R.GROUP_LABEL: str(group)}, "annotations": annotations}}


def status_of(pods, statefulsets=(), router_ready=True, failure="", old=None):
    groups = group_states(SPEC, list(statefulsets), pods, HASH)
    return compute_status(SPEC, groups, router_ready, 3, old or {}, "ep", "", "sel", failure), groups


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_all_groups_ready():
    status, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)])
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2 and status["observedGeneration"] == 3
    assert status["ready"] == "2/2"
    assert conditions(status)["Available"] == ("True", "ReplicasAvailable")
    assert conditions(status)["Degraded"][0] == "False"


def test_router_not_ready_keeps_it_progressing():
    status, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)], router_ready=False)
    assert status["phase"] == "Progressing"


def test_missing_rank_of_a_recorded_group_is_degraded_and_broken():
    pods = [pod(0, 0), pod(1, 0), pod(1, 1)]
    status, groups = status_of(pods, [sts(0, **{READY_PODS: "u00" + HASH[:2] + ",u01" + HASH[:2]})])
    assert status["phase"] == "Degraded" and status["readyReplicas"] == 1 and status["ready"] == "1/2"
    assert groups[0].broken and not groups[1].broken


def test_restarted_container_breaks_the_group():
    pods = [pod(0, 0, restarts=1), pod(0, 1)]
    _, groups = status_of(pods, [sts(0, **{READY_PODS: ",".join(sorted(p["metadata"]["uid"] for p in pods))})])
    assert groups[0].broken


def test_only_restarts_after_the_group_was_whole_break_it():
    """A rank that restarted while its group formed (it came up before its rank 0) is recorded
    with that count when the group is whole; only a restart after that is a failure."""
    formed = [pod(0, 0), pod(0, 1, restarts=2)]
    _, groups = status_of(formed)
    recorded = groups[0].ready_record
    assert recorded == f"u00{HASH[:2]}:0,u01{HASH[:2]}:2"
    _, groups = status_of(formed, [sts(0, **{READY_PODS: recorded})])
    assert not groups[0].broken
    _, groups = status_of([pod(0, 0), pod(0, 1, restarts=3)], [sts(0, **{READY_PODS: recorded})])
    assert groups[0].broken


def test_rollout_restart_is_progress_not_degradation():
    pods = [pod(1, 0), pod(1, 1)]
    status, groups = status_of(pods, [sts(0, **{READY_PODS: "old", RESTARTING: "rollout"})])
    assert status["phase"] == "Progressing" and not groups[0].broken
    failed, _ = status_of(pods, [sts(0, **{READY_PODS: "old", RESTARTING: "failure"})])
    assert failed["phase"] == "Degraded"


def test_outdated_pods_serve_but_are_not_updated():
    pods = [pod(g, o, spec_hash="0" * 16) for g in (0, 1) for o in (0, 1)]
    status, _ = status_of(pods)
    assert status["readyReplicas"] == 2 and status["updatedReplicas"] == 0 and status["phase"] == "Progressing"


def test_unschedulable_and_insufficient_gpus():
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    status, _ = status_of([pod(0, 0, ready=False, unschedulable=message)])
    assert status["phase"] == "Pending" and conditions(status)["Progressing"] == ("True", "Unschedulable")
    failed, _ = status_of([], failure="needs 16")
    assert failed["phase"] == "Failed" and conditions(failed)["Degraded"] == ("True", "InsufficientGPUs")


def test_transition_time_kept_while_a_condition_holds():
    first, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)])
    again, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)], old=first)
    assert again == first


def test_each_phase_change_posts_one_event_that_says_why():
    from kubellm.operator.status import phase_event

    ready, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)])
    assert phase_event("Ready", ready) is None   # unchanged: nothing posted on every tick
    assert phase_event("Progressing", ready) == ("Normal", "Ready", "2/2 replicas ready; serving at ep")
    # A rank of a recorded group is gone: Degraded, a Warning that names the group.
    recorded = sts(0, **{READY_PODS: "u00" + HASH[:2] + ",u01" + HASH[:2]})
    degraded, _ = status_of([pod(0, 0), pod(1, 0), pod(1, 1)], [recorded, sts(1)], old=ready)
    kind, reason, message = phase_event("Ready", degraded)
    assert (kind, reason) == ("Warning", "Degraded") and "[0]" in message and "(was Ready)" in message
    starting, _ = status_of([pod(0, 0, ready=False)])
    assert phase_event(None, starting) == ("Normal", "Progressing", "0/2 replicas ready")
    pending, _ = status_of([pod(0, 0, ready=False, unschedulable="0/3 nodes have enough nvidia.com/gpu")])
    assert phase_event("Progressing", pending) == ("Warning", "Unschedulable", "0/3 nodes have enough nvidia.com/gpu")
    failed, _ = status_of([], failure="each pod needs 8 nvidia.com/gpu")
    assert phase_event("Pending", failed) == ("Warning", "InsufficientGPUs", "each pod needs 8 nvidia.com/gpu")


def test_a_rolling_update_is_progress_that_says_so():
    from kubellm.operator.status import phase_event

    ready, _ = status_of([pod(g, o) for g in (0, 1) for o in (0, 1)])
    # Group 1 still runs the old spec, group 0 the new one: progress, not degradation.
    rolling, _ = status_of([pod(0, 0), pod(0, 1), pod(1, 0, spec_hash="old"), pod(1, 1, spec_hash="old")],
                           old=ready)
    assert rolling["phase"] == "Progressing" and conditions(rolling)["Progressing"] == ("True", "RollingUpdate")
    assert phase_event("Ready", rolling) == (
        "Normal", "Progressing", "rolling update: 1/2 replica groups on the new spec, 2 ready (was Ready)")


def test_pods_a_group_restart_deletes():
    from kubellm.operator.status import GroupState, pods_to_delete

    def group(pods_per_group, pods):
        return GroupState(0, pods=pods, expected_pods=pods_per_group)
    terminating = pod(0, 1)
    terminating["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    cases = [  # (pods per group, pods, cause, names deleted)
        (2, [pod(0, 0), pod(0, 1)], "failure", ["x-g0-0", "x-g0-1"]),   # every rank of a broken group
        (2, [pod(0, 0), terminating], "failure", ["x-g0-0"]),           # not the one already going
        (2, [pod(0, 0), pod(0, 1)], "rollout", ["x-g0-0", "x-g0-1"]),
        (1, [pod(0, 0, ready=False)], "failure", []),                    # its replacement is the restart
        (1, [pod(0, 0, restarts=1)], "failure", []),                     # so is a restarted container
        (1, [pod(0, 0, spec_hash="old")], "rollout", ["x-g0-0"]),        # a rollout replaces it
    ]
    for pods_per_group, pods, cause, want in cases:
        got = [p["metadata"]["name"] for p in pods_to_delete(group(pods_per_group, pods), cause)]
        assert got == want, (pods_per_group, cause, got)


# -- InferencePool condition ---------------------------------------------------------------------
POOL_SPEC = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "inferencePool": {
    "enabled": True, "endpointPickerRef": {"name": "epp", "failureMode": "FailOpen"}}})


@pytest.mark.parametrize("pool_spec, outcome, detail, want_ok, want_reason, words", [
    (POOL_SPEC, "PoolApplied", "", True, "PoolApplied", ["InferencePool x", "port 8000", "epp:9002 (FailOpen)"]),
    (SPEC.model_copy(update={"inferencePool": InferencePoolSpec(enabled=True)}), "PoolApplied", "", True,
     "PoolApplied", ["no endpoint picker", "inferencePool.endpointPickerRef"]),
    (POOL_SPEC, "CRDNotInstalled", "", False, "CRDNotInstalled",
     ["inferencepools.inference.networking.k8s.io", "kubectl apply -k", "gateway-api-inference-extension",
      "next refresh"]),
    (POOL_SPEC, "ApplyFailed", "403 Forbidden", False, "ApplyFailed", ["could not be applied: 403 Forbidden"]),
])
def test_inference_pool_condition(pool_spec, outcome, detail, want_ok, want_reason, words):
    ok, reason, message = inference_pool_condition(pool_spec, outcome, "x", detail)
    assert (ok, reason) == (want_ok, want_reason)
    assert all(w in message for w in words), message


def test_no_pool_condition_while_disabled_and_a_missing_crd_never_fails_the_deployment():
    assert inference_pool_condition(SPEC, "CRDNotInstalled", "x") is None
    pods = [pod(g, o) for g in (0, 1) for o in (0, 1)]
    missing = inference_pool_condition(POOL_SPEC, "CRDNotInstalled", "x")
    status = compute_status(SPEC, group_states(SPEC, [], pods, HASH), True, 3, {}, "ep", "", "sel", pool=missing)
    assert status["phase"] == "Ready" and conditions(status)["InferencePoolReady"] == ("False", "CRDNotInstalled")
    plain, _ = status_of(pods)
    assert "InferencePoolReady" not in conditions(plain)
    # Once the CRD is there the same status flips the condition, and only it.
    applied = compute_status(SPEC, group_states(SPEC, [], pods, HASH), True, 3, status, "ep", "", "sel",
                             pool=inference_pool_condition(POOL_SPEC, "PoolApplied", "x"))
    assert conditions(applied)["InferencePoolReady"] == ("True", "PoolApplied")
    assert {k: v for k, v in applied.items() if k != "conditions"} == {k: v for k, v in status.items() if k != "conditions"}


def test_status_records_each_groups_time_to_ready():
    def timed(group, ordinal, started, ready_at):
        p = pod(group, ordinal)
        p["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T10:00:00Z"},
                                     {"type": "Ready", "status": "True", "lastTransitionTime": ready_at}]
        p["status"]["containerStatuses"] = [{"name": "worker", "restartCount": 0,
                                             "state": {"running": {"startedAt": started}}}]
        return p
    pods = [timed(0, 0, "2026-01-01T10:00:05Z", "2026-01-01T10:00:45Z"), timed(0, 1, "2026-01-01T10:00:06Z", "2026-01-01T10:00:40Z"),
            timed(1, 0, "2026-01-01T10:00:05Z", "2026-01-01T10:01:05Z"), timed(1, 1, "2026-01-01T10:00:05Z", "2026-01-01T10:01:00Z")]
    status, _ = status_of(pods)
    assert status["groups"] == [
        {"index": 0, "scheduledAt": "2026-01-01T10:00:00Z", "loadStartedAt": "2026-01-01T10:00:06Z",
         "readyAt": "2026-01-01T10:00:45Z", "loadSeconds": 39.0},
        {"index": 1, "scheduledAt": "2026-01-01T10:00:00Z", "loadStartedAt": "2026-01-01T10:00:05Z",
         "readyAt": "2026-01-01T10:01:05Z", "loadSeconds": 60.0}]
    assert status["lastLoadSeconds"] == 60.0   # group 1 became ready last
    # Group 1 restarting (its pods gone): its entry empties; the last load shown is the serving group's.
    later, _ = status_of(pods[:2], old=status)
    assert later["groups"][1] == {"index": 1, "scheduledAt": "", "loadStartedAt": "", "readyAt": ""}
    assert later["lastLoadSeconds"] == 39.0
    assert status_of([pod(0, 0, ready=False)], old={"lastLoadSeconds": 12.0})[0]["lastLoadSeconds"] == 12.0


def _failed_message(reason=TOO_MANY_RESTARTS, log="loading /models/x\nFileNotFoundError: /models/x\n", error=""):
    return rank_failure_message(1, "x-g1-1", reason, 2, 3600, log, error, previous=True)


def test_a_group_left_failed_degrades_the_deployment_and_quotes_the_rank():
    """One group spent its budget, the other serves: Degraded (not Failed), Available, GroupFailed names the
    group and rank and quotes the log."""
    statefulsets = [sts(1, **{READY_PODS: f"u10{HASH[:2]}:0,u11{HASH[:2]}:0", FAILED: "x-g1-1"})]
    pods = [pod(0, 0), pod(0, 1), pod(1, 0), pod(1, 1, restarts=1)]
    groups = group_states(SPEC, statefulsets, pods, HASH)
    status = compute_status(SPEC, groups, True, 3, {}, "ep", "", "sel",
                            failures=[(1, TOO_MANY_RESTARTS, _failed_message())])
    assert status["phase"] == "Degraded" and status["readyReplicas"] == 1
    assert conditions(status)["Available"] == ("True", "ReplicasAvailable")
    assert conditions(status)["Degraded"] == ("True", GROUP_FAILED)
    assert conditions(status)[GROUP_FAILED] == ("True", TOO_MANY_RESTARTS)
    message = next(c["message"] for c in status["conditions"] if c["type"] == GROUP_FAILED)
    assert "replica group 1, rank pod x-g1-1" in message and "FileNotFoundError: /models/x" in message
    assert "previous (crashed) container" in message and "maxGroupRestarts" in message
    # No group serving: the deployment is Failed, and its Event says why.
    groups[0].failed = "x-g0-0"
    failed = compute_status(SPEC, groups, True, 3, status, "ep", "", "sel",
                            failures=[(0, TOO_MANY_RESTARTS, "g0"), (1, TOO_MANY_RESTARTS, "g1")])
    assert failed["phase"] == "Failed" and conditions(failed)["Degraded"] == ("True", TOO_MANY_RESTARTS)
    assert phase_event("Degraded", failed)[:2] == ("Warning", TOO_MANY_RESTARTS)
    # Fixed (the failures are gone): the condition stays, False, so that a watcher sees it clear.
    fixed = compute_status(SPEC, group_states(SPEC, [], pods[:3] + [pod(1, 1)], HASH), True, 4, failed, "ep", "", "sel")
    assert fixed["phase"] == "Ready" and conditions(fixed)[GROUP_FAILED] == ("False", "NoFailedRank")


def test_a_crash_looping_rank_is_reported_without_changing_the_phase():
    status = compute_status(SPEC, group_states(SPEC, [], [pod(0, 0, ready=False)], HASH), True, 1, {}, "ep", "", "sel",
                            failures=[(0, CRASH_LOOP, _failed_message(CRASH_LOOP))])
    assert status["phase"] == "Progressing"
    assert conditions(status)[GROUP_FAILED] == ("True", CRASH_LOOP)


@pytest.mark.parametrize("log, error, words", [
    ("", "500 Internal Server Error: no kubelet", ["could not be read: 500 Internal Server Error: no kubelet"]),
    ("", "", ["(empty)"]),
    ("line 1\nline 2\n", "", ["last log lines", "line 1\nline 2"]),
])
def test_rank_failure_message_says_why_a_log_is_missing(log, error, words):
    message = _failed_message(log=log, error=error)
    assert all(w in message for w in words), message
    assert rank_failure_message(0, "", CRASH_LOOP, 0, 60, "", "", False).endswith("before the group is whole")


# -- autoscaling --------------------------------------------------------------------------------
AUTO = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}})


def test_zero_replicas_is_scaled_to_zero_and_says_how_it_wakes():
    from kubellm.operator.autoscaler import Decision
    from kubellm.operator.status import SCALED_TO_ZERO, SCALING_CONDITION, scaling_condition
    steady = scaling_condition(AUTO, Decision(0, "Steady", "0 in flight, 0 waiting: 0 replicas"))
    status = compute_status(AUTO, group_states(AUTO, [], [], HASH, []), True, 1, {}, "ep", "", "sel", scaling=steady)
    assert (status["phase"], status["ready"]) == ("ScaledToZero", "0/0")
    conds = conditions(status)
    assert conds[SCALED_TO_ZERO] == ("True", "NoReplicas") and conds[SCALING_CONDITION] == ("True", "ReadingRouterLoad")
    assert "holds the next request" in next(c["message"] for c in status["conditions"] if c["type"] == SCALED_TO_ZERO)
    assert phase_event("Ready", status) == ("Normal", "ScaledToZero", "0 replicas (was Ready)")
    # a reconcile (no decision this tick) keeps the last ScalingActive condition as it was
    again = compute_status(AUTO, [], True, 1, status, "ep", "", "sel")
    assert conditions(again)[SCALING_CONDITION] == ("True", "ReadingRouterLoad")
    # the load unreadable: ScalingActive False, the reason given
    unknown = scaling_condition(AUTO, Decision(0, "LoadUnknown", "could not read: http://10.0.0.1:9090/metrics: refused"))
    assert unknown[:2] == (False, "LoadUnknown") and "refused" in unknown[2]


def test_groups_kept_after_a_scale_down_may_have_gaps():
    spec = SPEC.model_copy(update={"replicas": 2})
    groups = group_states(spec, [sts(0), sts(2)], [pod(0, o) for o in (0, 1)] + [pod(2, o) for o in (0, 1)], HASH, [0, 2])
    assert [g.index for g in groups] == [0, 2] and all(g.serving for g in groups)
    assert compute_status(spec, groups, True, 1, {}, "ep", "", "sel")["phase"] == "Ready"

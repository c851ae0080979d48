"""Status from observed children: pure functions over what the API server returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from kubellm.operator.load_time import group_timing, last_load_seconds
from kubellm.operator.resources import GROUP_LABEL, HTTP_PORT, INFERENCE_POOL_CRD, SPEC_HASH
from kubellm.api.spec import LLMDeploymentSpec

READY_PODS = "kubellm.io/ready-pods"   # StatefulSet annotation: pod uids of the group when it was last Ready
RESTARTING = "kubellm.io/restarting"   # StatefulSet annotation: the operator is restarting the whole group
# StatefulSet annotation: the group's restarts after a failure, "<worker spec hash>:<epoch s>,<epoch s>,..."; a
# record for another spec hash counts nothing (the user changed the spec: the budget starts again).
FAILURE_RESTARTS = "kubellm.io/failure-restarts"
FAILED = "kubellm.io/failed"           # StatefulSet annotation: the rank (pod) the group was left Failed for
GROUP_FAILED = "GroupFailed"           # the condition naming failed ranks and quoting their logs
TOO_MANY_RESTARTS, CRASH_LOOP = "TooManyRestarts", "CrashLoopBackOff"   # its reasons
MAX_FAILED_MESSAGE = 8192   # characters of the GroupFailed condition's message (each rank's log is bounded too)
CRASH_RESTARTS = 3   # container restarts (since the group was last whole) that report a rank as crash-looping
POOL_CONDITION = "InferencePoolReady"
# What applying the InferencePool came to (handlers.sync_inference_pool): the condition's reason.
POOL_APPLIED, POOL_CRD_MISSING, POOL_APPLY_FAILED = "PoolApplied", "CRDNotInstalled", "ApplyFailed"
GIE_CRDS = "https://github.com/kubernetes-sigs/gateway-api-inference-extension/config/crd?ref=v1.6.0"


@dataclass
class GroupState:
    index: int
    pods: list[dict] = field(default_factory=list)
    expected_pods: int = 0
    spec_hash: str = ""
    recorded_ready: str = ""    # READY_PODS annotation of its StatefulSet
    restarting: str = ""        # RESTARTING annotation of its StatefulSet: "", "failure" or "rollout"
    restarts: tuple[int, ...] = ()   # FAILURE_RESTARTS of its StatefulSet for this spec hash: epoch seconds
    failed: str = ""            # FAILED annotation of its StatefulSet

    @property
    def ready_record(self) -> str:
        """What READY_PODS records of a whole group: each pod's uid and container restarts
        ("uid:restarts,..."), so that a restart counted before the group was whole is not taken
        for a failure afterwards."""
        return ",".join(sorted(f"{p['metadata']['uid']}:{_restarts(p)}" for p in self.pods))

    @property
    def updated(self) -> bool:
        return len(self.pods) == self.expected_pods and all(
            (p["metadata"].get("annotations") or {}).get(SPEC_HASH) == self.spec_hash for p in self.pods)

    @property
    def serving(self) -> bool:
        """Every rank is there and Ready, whichever spec it runs."""
        return len(self.pods) == self.expected_pods and all(
            pod_ready(p) and not p["metadata"].get("deletionTimestamp") for p in self.pods)

    @property
    def ready(self) -> bool:
        return self.serving and self.updated

    @property
    def broken(self) -> bool:
        """A rank of a group that was whole is gone, replaced or restarted: the group must restart."""
        if not self.recorded_ready or self.restarting:
            return False
        recorded = dict(_uid_and_restarts(item) for item in self.recorded_ready.split(","))
        current = {p["metadata"]["uid"]: _restarts(p) for p in self.pods}
        restarted = any(current[uid] > restarts for uid, restarts in recorded.items() if uid in current)
        return restarted or not recorded.keys() <= current.keys() or any(
            p["status"].get("phase") == "Failed" for p in self.pods)

    def _recorded(self) -> dict[str, int]:
        return dict(_uid_and_restarts(item) for item in self.recorded_ready.split(",")) if self.recorded_ready else {}

    @property
    def failed_rank(self) -> dict | None:
        """The pod that broke the group: Failed, crash-looping, restarted since the group was whole, or new in
        place of a recorded one; None when none can be named."""
        live = [p for p in self.pods if not p["metadata"].get("deletionTimestamp")]
        recorded = self._recorded()
        return next((p for p in live if p["status"].get("phase") == "Failed"), None) or next(
            (p for p in live if waiting_reason(p) == CRASH_LOOP), None) or next(
            (p for p in live if p["metadata"]["uid"] in recorded and _restarts(p) > recorded[p["metadata"]["uid"]]),
            None) or next((p for p in live if p["metadata"]["uid"] not in recorded), None) or self._missing_rank()

    def _missing_rank(self) -> dict | None:
        """A rank whose pod is gone and not yet replaced, named after its StatefulSet ordinal (<group>-<i>)
        from a sibling's name; uid "" (it has no pod)."""
        names = {p["metadata"]["name"] for p in self.pods}
        prefix = next((n.rpartition("-")[0] for n in names), "")
        missing = [f"{prefix}-{i}" for i in range(self.expected_pods) if f"{prefix}-{i}" not in names]
        return {"metadata": {"name": missing[0], "uid": ""}, "status": {}} if prefix and missing else None

    @property
    def crash_looping(self) -> dict | None:
        """A rank of a group that is not serving whose container is in CrashLoopBackOff, or has restarted
        CRASH_RESTARTS times since the group was last whole (or since it was created)."""
        if self.serving:
            return None
        recorded = self._recorded()
        return next((p for p in self.pods if not p["metadata"].get("deletionTimestamp") and (
            waiting_reason(p) == CRASH_LOOP
            or _restarts(p) - recorded.get(p["metadata"]["uid"], 0) >= CRASH_RESTARTS)), None)

    @property
    def unschedulable(self) -> str:
        for p in self.pods:
            for c in (p.get("status") or {}).get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                    return c.get("message", "")
        return ""


def pods_to_delete(group: GroupState, cause: str) -> list[dict]:
    """The pods a group restart deletes (their StatefulSet recreates them). A rollout replaces every
    pod (the StatefulSets are OnDelete). After a failure a group of several pods restarts all its
    ranks, since torch.distributed cannot re-admit one; a group of one pod is whole again once its
    pod or container is replaced, so deleting the fresh replacement would only restart it twice."""
    if cause == "failure" and group.expected_pods == 1:
        return []
    return [p for p in group.pods if not p["metadata"].get("deletionTimestamp")]


def waiting_reason(pod: dict) -> str:
    """Why the pod's worker container waits (e.g. CrashLoopBackOff), "" when it does not."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name", "worker") == "worker":
            return ((cs.get("state") or {}).get("waiting") or {}).get("reason") or ""
    return ""


def restart_record(spec_hash: str, times: tuple[int, ...]) -> str:
    """The FAILURE_RESTARTS annotation of these restarts under this spec."""
    return f"{spec_hash}:{','.join(map(str, times))}" if times else ""


def _restart_times(annotation: str, spec_hash: str) -> tuple[int, ...]:
    recorded_hash, _, times = (annotation or "").partition(":")
    if recorded_hash != spec_hash:
        return ()
    return tuple(int(t) for t in times.split(",") if t.strip().isdigit())


def restart_count(pod: dict) -> int:
    """The pod's container restarts, all containers together."""
    return _restarts(pod)


def _restarts(pod: dict) -> int:
    return sum(cs.get("restartCount", 0) for cs in (pod.get("status") or {}).get("containerStatuses") or [])


def _uid_and_restarts(item: str) -> tuple[str, int]:
    uid, _, restarts = item.partition(":")  # "uid" alone: recorded by an older operator, no restarts
    return uid, int(restarts or 0)


def pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def group_states(spec: LLMDeploymentSpec, statefulsets: list[dict], pods: list[dict], spec_hash: str,
                 indices: list[int] | None = None) -> list[GroupState]:
    """`indices`: the groups the deployment keeps (groups.choose_groups; default 0..replicas-1)."""
    groups = {i: GroupState(i, expected_pods=spec.pods_per_group, spec_hash=spec_hash)
              for i in (range(spec.replicas) if indices is None else indices)}
    for sts in statefulsets:
        index = int(sts["metadata"]["labels"][GROUP_LABEL])
        if index in groups:
            annotations = sts["metadata"].get("annotations") or {}
            groups[index].recorded_ready = annotations.get(READY_PODS, "")
            groups[index].restarting = annotations.get(RESTARTING, "")
            groups[index].restarts = _restart_times(annotations.get(FAILURE_RESTARTS, ""), spec_hash)
            groups[index].failed = annotations.get(FAILED, "")
    for pod in pods:
        index = int(pod["metadata"]["labels"].get(GROUP_LABEL, -1))
        if index in groups:
            groups[index].pods.append(pod)
    return [groups[i] for i in sorted(groups)]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(old: list[dict], type_: str, ok: bool, reason: str, message: str, generation: int) -> dict:
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != status
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now() if changed else previous["lastTransitionTime"],
            "observedGeneration": generation}


def inference_pool_condition(spec: LLMDeploymentSpec, outcome: str, pool: str, detail: str = "") -> tuple[bool, str, str] | None:
    """(ok, reason, message) of the InferencePoolReady condition, from what applying the pool came to; None
    while spec.inferencePool is off (no condition). Never a phase: a deployment without its pool still serves
    through its router."""
    if not spec.inferencePool.enabled:
        return None
    if outcome == POOL_CRD_MISSING:
        return False, outcome, (f"the InferencePool CRD ({INFERENCE_POOL_CRD}) is not installed, so there is no pool "
                                f"{pool}; install the Gateway API Inference Extension's CRDs (kubectl apply -k "
                                f"'{GIE_CRDS}') and the next refresh creates it; the router serves meanwhile")
    if outcome == POOL_APPLY_FAILED:
        return False, outcome, f"InferencePool {pool} could not be applied: {detail}"
    picker = spec.inferencePool.endpointPickerRef
    return True, outcome, (f"InferencePool {pool} selects the replica leaders (rank-0 pods) on port {HTTP_PORT}; "
                           + (f"endpoint picker {picker.name}:{picker.port} ({picker.failureMode})" if picker
                              else "no endpoint picker (set inferencePool.endpointPickerRef)"))


def rank_failure_message(index: int, rank: str, reason: str, restarts: int, window: int, log: str, error: str,
                         previous: bool) -> str:
    """One failed rank in the GroupFailed condition: which group and pod, why, and its worker container's
    last log lines (or why they could not be read)."""
    who = f"replica group {index}, rank pod {rank or '(none left to name)'}"
    if reason == TOO_MANY_RESTARTS:
        what = (f"{who} failed again after {restarts} restarts within {window}s (maxGroupRestarts): the group is left "
                "Failed and not restarted again; fix the cause and change the spec (or raise maxGroupRestarts)")
    else:
        what = f"{who} is crash-looping (CrashLoopBackOff or repeated container restarts) before the group is whole"
    if not rank:
        return what
    if error:
        return f"{what}; its log could not be read: {error}"
    which = "previous (crashed) container" if previous else "container"
    return f"{what}; last log lines of its worker {which}:\n{log.rstrip() or '(empty)'}"


SCALING_CONDITION, SCALED_TO_ZERO = "ScalingActive", "ScaledToZero"


def scaling_condition(spec: LLMDeploymentSpec, decision, last_scaled: str = "") -> tuple[bool, str, str] | None:
    """(ok, reason, message) of the ScalingActive condition from the autoscaler's decision (autoscaler.Decision)
    of this tick; None without one (no autoscaling, or a reconcile rather than a tick: the last one stays). The
    message names no live counts, so an unchanged state writes no status."""
    if spec.autoscaling is None or decision is None:
        return None
    a = spec.autoscaling
    if decision.reason == "LoadUnknown":
        return False, decision.reason, decision.message
    message = (f"replicas {decision.replicas} within {a.minReplicas}..{a.maxReplicas}, target "
               f"{a.targetInFlightPerReplica:g} requests in flight per replica")
    return True, "ReadingRouterLoad", message + (f"; last change: {last_scaled}" if last_scaled else "")


def compute_status(spec: LLMDeploymentSpec, groups: list[GroupState], router_ready: bool, generation: int,
                   old: dict, endpoint: str, rest_endpoint: str, selector: str, failure: str = "",
                   pool: tuple[bool, str, str] | None = None,
                   failures: list[tuple[int, str, str]] | tuple = (),
                   scaling: tuple[bool, str, str] | None = None) -> dict:
    """The whole `.status`, derived from observed children only; `pool`: inference_pool_condition's;
    `failures`: (group index, reason, rank_failure_message) of the ranks the supervision plan reports;
    `scaling`: scaling_condition's."""
    ready = sum(g.serving and not g.failed for g in groups)   # like a Deployment's readyReplicas: any revision
    updated = sum(g.updated for g in groups)
    # A planned rollout restart is progress; a lost rank (restarting or not yet noticed) is degradation.
    degraded = [g.index for g in groups if not g.serving and (
        g.restarting == "failure" or (g.recorded_ready and not g.restarting))]
    unschedulable = next((g.unschedulable for g in groups if g.unschedulable), "")
    spent = sorted({i for i, why, _ in failures if why == TOO_MANY_RESTARTS})
    if failure:
        phase, reason, message = "Failed", "InsufficientGPUs", failure
    elif spent:
        phase, reason = ("Failed", TOO_MANY_RESTARTS) if not ready else ("Degraded", GROUP_FAILED)
        message = (f"replica groups {spent} are left Failed after too many restarts (maxGroupRestarts "
                   f"{spec.maxGroupRestarts} within {spec.groupRestartWindowSeconds}s); {ready}/{spec.replicas} "
                   f"replicas ready; see condition {GROUP_FAILED}")
    elif spec.replicas == 0:
        phase, reason = "ScaledToZero", "ScaledToZero"
        message = ("0 replicas: idle; the router holds the next request and the autoscaler starts a group for it"
                   if spec.autoscaling and spec.autoscaling.minReplicas == 0 else "0 replicas (spec.replicas)")
    elif ready == updated == spec.replicas and router_ready:
        phase, reason, message = "Ready", "AllReplicasReady", f"{ready}/{spec.replicas} replicas ready"
    elif degraded:
        phase, reason, message = "Degraded", "GroupNotReady", f"replica groups {degraded} lost a rank and are restarting"
    elif unschedulable:
        phase, reason, message = "Pending", "Unschedulable", unschedulable
    elif any(g.serving and not g.updated for g in groups) or any(g.restarting == "rollout" for g in groups):
        phase, reason, message = "Progressing", "RollingUpdate", (
            f"rolling update: {updated}/{spec.replicas} replica groups on the new spec, {ready} ready")
    else:
        phase, reason, message = "Progressing", "ReplicasStarting", f"{ready}/{spec.replicas} replicas ready"
    conditions = old.get("conditions") or []
    timings = [group_timing(g) for g in groups]
    extra = [_condition(conditions, POOL_CONDITION, *pool, generation)] if pool else []
    if failures:
        extra.append(_condition(conditions, GROUP_FAILED, True, failures[0][1],
                                "\n\n".join(m for _, _, m in failures)[:MAX_FAILED_MESSAGE], generation))
    elif any(c.get("type") == GROUP_FAILED for c in conditions):
        extra.append(_condition(conditions, GROUP_FAILED, False, "NoFailedRank", "", generation))
    if spec.autoscaling is not None:
        kept = next((c for c in conditions if c.get("type") == SCALING_CONDITION), None)
        if scaling is not None:
            extra.append(_condition(conditions, SCALING_CONDITION, *scaling, generation))
        elif kept is not None:
            extra.append(kept)
        extra.append(_condition(conditions, SCALED_TO_ZERO, spec.replicas == 0,
                                "NoReplicas" if spec.replicas == 0 else "Serving",
                                message if spec.replicas == 0 else f"{spec.replicas} replicas", generation))
    return {
        "phase": phase, "replicas": spec.replicas, "readyReplicas": ready, "ready": f"{ready}/{spec.replicas}",
        "updatedReplicas": updated,
        "selector": selector, "endpoint": endpoint, "restEndpoint": rest_endpoint, "observedGeneration": generation,
        "groups": [t.status() for t in timings],
        "lastLoadSeconds": last_load_seconds(timings, old.get("lastLoadSeconds")),
        "conditions": [
            _condition(conditions, "Available", ready > 0 and router_ready,
                       "ReplicasAvailable" if ready else "NoReplicaReady", f"{ready}/{spec.replicas} replicas ready",
                       generation),
            _condition(conditions, "Progressing", phase in ("Progressing", "Pending"),
                       reason if phase in ("Progressing", "Pending") else "Complete", message, generation),
            _condition(conditions, "Degraded", phase in ("Degraded", "Failed"),
                       reason if phase in ("Degraded", "Failed") else "AsExpected",
                       message if phase in ("Degraded", "Failed") else "", generation),
            *extra,
        ],
    }


def phase_event(old_phase: str | None, new: dict) -> tuple[str, str, str] | None:
    """The Event (type, reason, message) that a change of `.status.phase` posts on the LLMDeployment, for
    `kubectl describe llmd`; None when the phase did not change."""
    phase = new["phase"]
    if phase == old_phase:
        return None
    why = next((c["message"] for c in new["conditions"]
                if c["type"] in ("Progressing", "Degraded") and c["status"] == "True" and c["message"]), "")
    was = f" (was {old_phase})" if old_phase else ""
    if phase == "Ready":
        serving = f"; serving at {new['endpoint']}" if new.get("endpoint") else ""
        return "Normal", "Ready", f"{new['ready']} replicas ready{serving}"
    if phase == "Progressing":
        return "Normal", "Progressing", f"{why or new['ready'] + ' replicas ready'}{was}"
    if phase == "Degraded":
        return "Warning", "Degraded", f"{why[:1024]}{was}"
    if phase == "Pending":
        return "Warning", "Unschedulable", why
    if phase == "ScaledToZero":
        return "Normal", "ScaledToZero", f"0 replicas{was}"
    if phase == "Failed":
        reason = next((c["reason"] for c in new["conditions"] if c["type"] == "Degraded"), "InsufficientGPUs")
        return "Warning", reason, why[:1024]
    return "Warning", phase, why

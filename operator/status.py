"""Status from observed children: pure functions over what the API server returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from kubellm.operator.load_time import group_timing, last_load_seconds
from kubellm.operator.resources import GROUP_LABEL, HTTP_PORT, INFERENCE_POOL_CRD, SPEC_HASH
from kubellm.api.spec import LLMDeploymentSpec

READY_PODS = "kubellm.io/ready-pods"   # StatefulSet annotation: pod uids of the group when it was last Ready
RESTARTING = "kubellm.io/restarting"   # StatefulSet annotation: the operator is restarting the whole group
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


def _restarts(pod: dict) -> int:
    return sum(cs.get("restartCount", 0) for cs in (pod.get("status") or {}).get("containerStatuses") or [])


def _uid_and_restarts(item: str) -> tuple[str, int]:
    uid, _, restarts = item.partition(":")  # "uid" alone: recorded by an older operator, no restarts
    return uid, int(restarts or 0)


def pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def group_states(spec: LLMDeploymentSpec, statefulsets: list[dict], pods: list[dict], spec_hash: str) -> list[GroupState]:
    groups = {i: GroupState(i, expected_pods=spec.pods_per_group, spec_hash=spec_hash) for i in range(spec.replicas)}
    for sts in statefulsets:
        index = int(sts["metadata"]["labels"][GROUP_LABEL])
        if index in groups:
            annotations = sts["metadata"].get("annotations") or {}
            groups[index].recorded_ready = annotations.get(READY_PODS, "")
            groups[index].restarting = annotations.get(RESTARTING, "")
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


def compute_status(spec: LLMDeploymentSpec, groups: list[GroupState], router_ready: bool, generation: int,
                   old: dict, endpoint: str, rest_endpoint: str, selector: str, failure: str = "",
                   pool: tuple[bool, str, str] | None = None) -> dict:
    """The whole `.status`, derived from observed children only; `pool`: inference_pool_condition's."""
    ready = sum(g.serving for g in groups)   # like a Deployment's readyReplicas: any revision
    updated = sum(g.updated for g in groups)
    # A planned rollout restart is progress; a lost rank (restarting or not yet noticed) is degradation.
    degraded = [g.index for g in groups if not g.serving and (
        g.restarting == "failure" or (g.recorded_ready and not g.restarting))]
    unschedulable = next((g.unschedulable for g in groups if g.unschedulable), "")
    if failure:
        phase, reason, message = "Failed", "InsufficientGPUs", failure
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
        return "Warning", "Degraded", f"{why}{was}"
    if phase == "Pending":
        return "Warning", "Unschedulable", why
    return "Warning", "InsufficientGPUs" if phase == "Failed" else phase, why

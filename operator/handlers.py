"""kopf handlers: thin glue between LLMDeployment events and the builders, apply path and status.

- create / update / resume: apply every child (skipping unchanged ones; the NetworkPolicies among
  them), remove groups above `replicas` (each with its NetworkPolicy), delete the deployment's
  NetworkPolicies when spec.networkPolicy is off, then refresh.
- a timer refreshes every few seconds: restarts a group whose rank died (torch.distributed
  cannot re-admit one rank), rolls groups to a new spec one at a time while the others keep
  serving, and writes `.status` from what it observed, only when it changed.
Deletion needs no handler: every child has an owner reference and is garbage-collected.

Events on the LLMDeployment (`kubectl describe llmd`), posted here deliberately (kopf's own posting
is limited to errors): Created, Updated, Applied (children re-applied on resume), Scaled,
GroupRestarted and GroupReady (a group's restart or rolling update, begun and done), GroupFailed (a
group left Failed, its restart budget spent) and RankCrashLooping (both quoting the rank's log), ModelLoaded and
SlowModelLoad (a group whole: how long its load took and, where its metrics answer, where the time
went; `load_time.load_events`), each phase change (Ready, Progressing, Degraded, Unschedulable,
InsufficientGPUs; `status.phase_event`) and InvalidSpec.

With spec.inferencePool.enabled an InferencePool selects the leaders; without its CRD in the cluster the
InferencePoolReady condition says so, everything else reconciles, and each refresh tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubellm.operator import network_policy as NP
from kubellm.operator import resources as R
from kubellm.operator.autoscaler import Decision, History, decide
from kubellm.operator.groups import choose_groups
from kubellm.operator.kube import Kube
from kubellm.operator.load_metrics import read_load_phases
from kubellm.operator.load_time import group_timing, load_events, slow_load_after
from kubellm.operator.metrics import OperatorMetrics
from kubellm.operator.router_load import read_router_load
from kubellm.api.spec import DEFAULT_IMAGE, GROUP, PLURAL, VERSION, LLMDeploymentSpec, object_problem
from kubellm.operator.status import (CRASH_LOOP, scaling_condition, FAILED, FAILURE_RESTARTS, POOL_APPLIED, POOL_APPLY_FAILED,
                                     POOL_CONDITION, POOL_CRD_MISSING, READY_PODS, RESTARTING, GroupState,
                                     compute_status, group_states, inference_pool_condition, phase_event,
                                     rank_failure_message, restart_count)
from kubellm.operator.supervision import (FAILURE, ROLLOUT, Budget, LeaveFailed, RankFailure, RestartGroup,
                                          SupervisionPlan, supervision_plan)

INTERVAL = float(os.environ.get("KUBELLM_OPERATOR_INTERVAL", "5"))
RUNTIME_IMAGE = os.environ.get("KUBELLM_RUNTIME_IMAGE") or DEFAULT_IMAGE
# The router pods' image (the chart's routerImage: kubellm[router], no torch); unset, they run the workers'.
ROUTER_IMAGE = os.environ.get("KUBELLM_ROUTER_IMAGE") or None
# The operator's own pods (the chart's POD_NAMESPACE and KUBELLM_OPERATOR_POD_LABELS), which the NetworkPolicies
# admit to the pods' /metrics; None outside a pod.
OPERATOR_PODS = NP.OperatorPods.from_env(os.environ)
log = logging.getLogger("kubellm.operator")
_kube: Kube | None = None
# The phase each LLMDeployment's last phase Event announced (by uid): the create handler and the timer
# may both see the old phase before the status patch lands, and one change must post one Event.
_announced: dict[str, str] = {}
METRICS = OperatorMetrics(writes=lambda: _kube.writes if _kube else 0)


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def parse_spec(spec, name: str | None = None) -> LLMDeploymentSpec:
    """The spec as the operator runs it; `name`: the object's, for the rules that read it (spec.OBJECT_RULES)."""
    try:
        parsed = LLMDeploymentSpec.model_validate(dict(spec))
    except ValidationError as err:
        problems = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
                             for e in err.errors())
        raise kopf.PermanentError(problems) from None
    problem = object_problem(name, parsed) if name is not None else None
    if problem:
        raise kopf.PermanentError(problem)
    return parsed if parsed.image else parsed.model_copy(update={"image": RUNTIME_IMAGE})


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    # Progress in annotations, not in .status: the CRD's status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubellm.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubellm.io")
    settings.posting.level = logging.ERROR  # Events are posted deliberately, below
    settings.watching.server_timeout = 120
    # No runtime observation of CRDs and namespaces: the watched namespaces are named exactly and the
    # CRD exists before the operator starts (the chart installs it), so the operator needs no
    # cluster-wide read of either (see the chart's RBAC).
    settings.scanning.disabled = True


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body, spec, status, patch, reason, **_):
    METRICS.reconciled(reason)
    owner = R.Owner.from_body(body)
    try:
        desired = parse_spec(spec, owner.name)
    except kopf.PermanentError as err:  # what the CRD schema cannot express; say so in status
        patch.status.update(phase="Failed", observedGeneration=body["metadata"].get("generation", 0))
        kopf.event(body, type="Warning", reason="InvalidSpec", message=str(err))
        raise
    if (spec or {}).get("replicas") is None:
        # Unset replicas (no schema default, so the CEL rule can tell a hand-set one): written as it runs, because
        # the API server answers GET /scale (what an HPA, KEDA and `kubectl scale --current-replicas` read first)
        # with a 500 while the field is missing.
        k = kube()
        k.scale(GROUP, VERSION, PLURAL, owner.name, owner.namespace, desired.replicas)
    keep, remove = plan_groups(owner, desired)
    children = R.children(owner, desired, router_image=ROUTER_IMAGE, groups=keep, operator=OPERATOR_PODS)
    written = sum(kube().apply(child) for child in children)
    removed = remove_groups(owner, remove)
    if not desired.networkPolicy.enabled:
        remove_network_policies(owner, keep + remove)
    # A pool to apply, or one to delete (its condition says there was one): else not even a discovery lookup.
    had_pool = any(c.get("type") == POOL_CONDITION for c in (status or {}).get("conditions") or [])
    pool = sync_inference_pool(owner, desired) if desired.inferencePool.enabled or had_pool else None
    if reason == "create":
        kopf.event(body, type="Normal", reason="Created",
                   message=f"created {written} children for {desired.replicas} replica groups "
                           f"of {desired.world_size} ranks")
    elif reason == "update":
        kopf.event(body, type="Normal", reason="Updated",
                   message=f"spec generation {body['metadata'].get('generation', 0)} applied: {written} of "
                           f"{len(children)} children changed; replica groups whose pods must change are "
                           "restarted one at a time")
    elif written:  # resume: the operator (re)started and found children out of date
        kopf.event(body, type="Normal", reason="Applied",
                   message=f"re-applied {written} of {len(children)} children that differed from the spec")
    previous = (status or {}).get("replicas")
    if previous is not None and previous != desired.replicas:
        kopf.event(body, type="Normal", reason="Scaled", message=f"replicas {previous} -> {desired.replicas}"
                   + (f" (removed groups {removed})" if removed else ""))
    refresh(body, patch, owner, desired, pool)


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, initial_delay=INTERVAL)
def observe(body, spec, patch, **_):
    try:
        desired = parse_spec(spec, body["metadata"]["name"])
    except kopf.PermanentError:
        return
    owner = R.Owner.from_body(body)
    refresh(body, patch, owner, desired, scaling=autoscale(body, owner, desired))


# The built-in autoscaler's recommendations (by uid): kept in memory, so a restarted operator waits a whole
# delay window again before it scales, which errs on the side of not scaling.
_histories: dict[str, History] = {}
_last_scaled: dict[str, str] = {}


def autoscale(body, owner: R.Owner, spec: LLMDeploymentSpec) -> Decision | None:
    """spec.autoscaling: read the routers' load, decide (autoscaler.decide) and set replicas through the scale
    subresource, whose write comes back as a spec update that reconcile applies. None without autoscaling."""
    if spec.autoscaling is None:
        _histories.pop(owner.uid, None)
        return None
    k = kube()
    load = read_router_load(k.list("v1", "Pod", owner.namespace, R.selector(owner, "router")))
    decision = decide(spec.autoscaling, spec.replicas, _histories.setdefault(owner.uid, History()), load.total(),
                      time.monotonic())
    if load.routers == 0:
        decision = dataclasses.replace(decision, message=f"{decision.message}: "
                                                         f"{load.errors[0] if load.errors else 'no router pod runs'}")
    stored = (body.get("spec") or {}).get("replicas")
    if decision.replicas != stored:
        k.scale(GROUP, VERSION, PLURAL, owner.name, owner.namespace, decision.replicas)
        a = spec.autoscaling
        message = decision.message if decision.replicas != spec.replicas else (
            f"spec.replicas {'unset' if stored is None else stored} -> {decision.replicas}: autoscaling keeps it "
            f"within minReplicas..maxReplicas ({a.minReplicas}..{a.maxReplicas})")
        METRICS.autoscaled(decision.reason)
        _last_scaled[owner.uid] = message
        kopf.event(body, type="Normal", reason="Autoscaled", message=message)
    return decision


def _timers_without_finalizer(registry) -> None:
    """kopf puts its finalizer on every object a timer runs for, so deleting an LLMDeployment would
    wait for the operator, and hang while it is down — e.g. `helm uninstall` with crds.keep=false
    deletes the operator and the CRD together, and the CRD would stay Terminating. Nothing needs
    cleaning up on deletion (children are garbage-collected through owner references; the timer
    stops with the object), so no finalizer is added.

    kopf has no public switch for it (its timers always ask for one), so the timers are rewritten in
    its registry: a private API. pyproject.toml pins kopf to the versions with this layout and
    tests/operator/test_kopf_registry.py fails if it moves."""
    spawning = registry._spawning
    spawning._handlers = [dataclasses.replace(h, requires_finalizer=False) for h in spawning._handlers]


_timers_without_finalizer(kopf.get_default_registry())


@kopf.on.event(GROUP, VERSION, PLURAL)  # raw watch events: no finalizer needed
def forget(event, name, namespace, **_):
    if event.get("type") == "DELETED":
        METRICS.phase(namespace, name, None)
        uid = ((event.get("object") or {}).get("metadata") or {}).get("uid", "")
        for memory in (_announced, _histories, _last_scaled):
            memory.pop(uid, None)


def live_groups(statefulsets: list[dict]) -> list[int]:
    """The group indices whose StatefulSets exist and are not being deleted."""
    return sorted(int(s["metadata"]["labels"][R.GROUP_LABEL]) for s in statefulsets
                  if not s["metadata"].get("deletionTimestamp"))


def plan_groups(owner: R.Owner, spec: LLMDeploymentSpec) -> tuple[list[int], list[int]]:
    """(groups to keep or create, groups to remove): a scale-down removes the groups that serve least, by the
    routers' requests in flight to each leader (groups.choose_groups)."""
    k = kube()
    statefulsets = k.list("apps/v1", "StatefulSet", owner.namespace, R.selector(owner, "worker"))
    existing = live_groups(statefulsets)
    if len(existing) <= spec.replicas:
        return choose_groups(existing, spec.replicas)
    serving = {int(s["metadata"]["labels"][R.GROUP_LABEL]) for s in statefulsets
               if (s.get("status") or {}).get("readyReplicas", 0) >= spec.pods_per_group}
    leaders = {p["status"]["podIP"]: int(p["metadata"]["labels"][R.GROUP_LABEL])
               for p in k.list("v1", "Pod", owner.namespace, R.leader_selector(owner))
               if (p.get("status") or {}).get("podIP") and R.GROUP_LABEL in p["metadata"].get("labels", {})}
    load = read_router_load(k.list("v1", "Pod", owner.namespace, R.selector(owner, "router")))
    return choose_groups(existing, spec.replicas, load.by_group(leaders), serving)


def remove_groups(owner: R.Owner, indices: list[int]) -> list[int]:
    """Delete these replica groups (StatefulSet, headless Service, NetworkPolicy); their pods drain (spec.drain)."""
    k = kube()
    for index in indices:
        k.delete("apps/v1", "StatefulSet", R.group_name(owner, index), owner.namespace)
        k.delete("v1", "Service", R.group_name(owner, index), owner.namespace)
        # After the pods' StatefulSet: the policy goes with the group (a 404 when policies are off is ignored).
        k.delete("networking.k8s.io/v1", "NetworkPolicy", NP.group_policy_name(owner, index), owner.namespace)
    return indices


def remove_network_policies(owner: R.Owner, groups: list[int]) -> list[str]:
    """spec.networkPolicy.enabled off: delete the policies this deployment owns (of these groups and its own
    two), read first so that an unchanged spec sends no deletes, and a policy someone else made is left alone."""
    k, removed = kube(), []
    for name in NP.policy_names(owner, groups):
        live = k.get("networking.k8s.io/v1", "NetworkPolicy", name, owner.namespace)
        if live and any(ref.get("uid") == owner.uid for ref in live["metadata"].get("ownerReferences") or []):
            k.delete("networking.k8s.io/v1", "NetworkPolicy", name, owner.namespace)
            removed.append(name)
    return removed


def sync_inference_pool(owner: R.Owner, spec: LLMDeploymentSpec) -> tuple[str, str]:
    """Apply the InferencePool, or delete ours when spec.inferencePool is off: (outcome, detail), the
    outcome one of status.POOL_*, or "" when there is nothing to report. Never raises for a missing CRD
    or a refused apply: the deployment serves through its router without a pool."""
    k = kube()
    if not k.served(R.INFERENCE_POOL_API, R.INFERENCE_POOL_KIND):
        return (POOL_CRD_MISSING if spec.inferencePool.enabled else ""), ""
    manifest = R.inference_pool(owner, spec)
    if manifest is None:
        # Literal kinds, not R.INFERENCE_POOL_*: tests/charts/test_chart.py finds the RBAC the operator needs by them.
        live = k.get("inference.networking.k8s.io/v1", "InferencePool", R.inference_pool_name(owner), owner.namespace)
        if live and any(ref.get("uid") == owner.uid for ref in live["metadata"].get("ownerReferences") or []):
            k.delete("inference.networking.k8s.io/v1", "InferencePool", R.inference_pool_name(owner), owner.namespace)
        return "", ""
    try:
        k.apply(manifest)
    except ApiException as err:
        if err.status == 404:   # the kind itself is gone (its CRD deleted since discovery was cached)
            k.rediscover()
            if not k.served(R.INFERENCE_POOL_API, R.INFERENCE_POOL_KIND):
                return POOL_CRD_MISSING, ""
        log.warning("InferencePool %s/%s: %s %s", owner.namespace, owner.name, err.status, err.reason)
        return POOL_APPLY_FAILED, f"{err.status} {err.reason}: {(err.body or '')[:300]}"
    return POOL_APPLIED, ""


RESTART_REASONS = {FAILURE: "a rank failed or was replaced", ROLLOUT: "the spec changed (rolling update)"}


def post_load_events(body, spec: LLMDeploymentSpec, group: GroupState) -> None:
    """ModelLoaded (and SlowModelLoad) for a group that just became whole, with its leader's load phases
    when its metrics port answers within a second."""
    timing = group_timing(group)
    if timing.load_seconds is None:
        return
    leader = next((p for p in group.pods if p["metadata"].get("labels", {}).get(R.POD_INDEX_LABEL) == "0"), None)
    phases, unavailable = read_load_phases(leader) if leader else ({}, "no rank-0 pod")
    for type_, reason, message in load_events(timing, phases or None, slow_load_after(spec.startupTimeoutSeconds),
                                              unavailable):
        kopf.event(body, type=type_, reason=reason, message=message)


# Logs read for failed ranks, by (pod uid, container restarts): each crash is read once, not every tick.
_logs: dict[tuple[str, int], tuple[str, str, bool]] = {}
MAX_LOGS_CACHED = 512


def rank_log(owner: R.Owner, pod: dict) -> tuple[str, str, bool, bool]:
    """(log, error, previous, fresh) of a failed rank's worker container: the previous (crashed) instance
    for a restarted container; fresh when it was read now rather than remembered."""
    key = (pod["metadata"]["uid"] or pod["metadata"]["name"], restart_count(pod))
    if key in _logs:
        return (*_logs[key], False)
    k, previous = kube(), key[1] > 0
    text, error = k.pod_log(pod["metadata"]["name"], owner.namespace, previous=previous)
    if error and previous:   # no previous instance kept (e.g. the pod was recreated): the current one
        text, error, previous = (*k.pod_log(pod["metadata"]["name"], owner.namespace), False)
    if len(_logs) >= MAX_LOGS_CACHED:
        _logs.clear()
    _logs[key] = (text, error, previous)
    return text, error, previous, True


def failure_messages(body, owner: R.Owner, spec: LLMDeploymentSpec, failures: tuple[RankFailure, ...]) -> list[tuple[int, str, str]]:
    """(group index, reason, message) for the GroupFailed condition, each quoting its rank's log; a rank
    newly seen crash-looping posts a RankCrashLooping Event."""
    out = []
    for f in failures:
        name = f.pod["metadata"]["name"] if f.pod else ""
        log_text, error, previous, fresh = rank_log(owner, f.pod) if f.pod else ("", "", False, False)
        message = rank_failure_message(f.index, name, f.reason, f.restarts, spec.groupRestartWindowSeconds,
                                       log_text, error, previous)
        if fresh and f.reason == CRASH_LOOP:
            kopf.event(body, type="Warning", reason="RankCrashLooping", message=_event_text(message))
        out.append((f.index, f.reason, message))
    return out


def _event_text(message: str, limit: int = 1024) -> str:
    """An Event's message, bounded: the head (who failed) and the tail (the last log lines)."""
    return message if len(message) <= limit else f"{message[:400]} … {message[-(limit - 405):]}"


def apply_supervision(body, owner: R.Owner, plan: SupervisionPlan, spec: LLMDeploymentSpec | None = None,
                      messages: dict[int, str] | None = None) -> None:
    """Carry out the supervision plan's actions, in order (deletes, StatefulSet marks, Events); `messages`:
    each reported group's failure message (failure_messages), for the GroupFailed Event."""
    k = kube()
    for action in plan.actions:
        if isinstance(action, LeaveFailed):
            _annotate(owner, action.index, {FAILED: action.rank or "?"})
            kopf.event(body, type="Warning", reason="GroupFailed", message=_event_text(
                (messages or {}).get(action.index) or f"replica group {action.index}: restart budget spent"))
        elif isinstance(action, RestartGroup):
            for pod in action.delete_pods:
                k.delete("v1", "Pod", pod, owner.namespace)
            _mark_group(owner, action.index, ready_pods=action.ready_pods, restarting=action.cause,
                        restarts=action.restarts)
            METRICS.restarted(action.cause)
            budget = (f" (restart {action.spent} of maxGroupRestarts {spec.maxGroupRestarts} within "
                      f"{spec.groupRestartWindowSeconds}s)" if action.spent and spec is not None else "")
            kopf.event(body, type="Warning" if action.cause == FAILURE else "Normal", reason="GroupRestarted",
                       message=f"replica group {action.index}: {RESTART_REASONS[action.cause]}; "
                               f"restarting all its ranks{budget}")
        else:
            if action.completed:
                kopf.event(body, type="Normal", reason="GroupReady",
                           message=f"replica group {action.index}: all {action.pods} pods ready again after the "
                                   f"{'rolling update' if action.completed == ROLLOUT else 'restart'}")
            _mark_group(owner, action.index, ready_pods=action.ready_pods, restarting="")
            group = next((g for g in plan.groups if g.index == action.index), None)
            if spec is not None and group is not None:
                post_load_events(body, spec, group)


def _mark_group(owner: R.Owner, index: int, ready_pods: str, restarting: str, restarts: str | None = None) -> None:
    """Record on the group's StatefulSet which pods made it whole, and whether it is restarting (which
    ends its Failed mark); `restarts`: its new FAILURE_RESTARTS record (None: kept)."""
    annotations = {READY_PODS: ready_pods or None, RESTARTING: restarting or None, FAILED: None}
    if restarts is not None:
        annotations[FAILURE_RESTARTS] = restarts or None
    _annotate(owner, index, annotations)


def _annotate(owner: R.Owner, index: int, annotations: dict[str, str | None]) -> None:
    """Merge these annotations into the group's StatefulSet (None removes one)."""
    k = kube()
    try:
        k.resource("apps/v1", "StatefulSet").patch(
            name=R.group_name(owner, index), namespace=owner.namespace, content_type="application/merge-patch+json",
            body={"metadata": {"annotations": annotations}})
    except ApiException as err:
        if err.status != 404:  # the group (or its namespace) is being deleted: nothing to record
            raise
    k.writes += 1


def refresh(body, patch, owner: R.Owner, spec: LLMDeploymentSpec, pool: tuple[str, str] | None = None,
            scaling: Decision | None = None) -> None:
    """`pool`: what reconcile's sync_inference_pool came to; without it (a timer tick) the pool is synced
    again only while the last status says it is not there (its CRD was missing, or the apply failed);
    `scaling`: the autoscaler's decision of this tick, for the ScalingActive condition."""
    k = kube()
    statefulsets = k.list("apps/v1", "StatefulSet", owner.namespace, R.selector(owner, "worker"))
    pods = k.list("v1", "Pod", owner.namespace, R.selector(owner, "worker"))
    indices, _ = choose_groups(live_groups(statefulsets), spec.replicas)
    plan = supervision_plan(group_states(spec, statefulsets, pods, R.worker_spec_hash(spec), indices),
                            Budget.of(spec), int(time.time()))
    failures = failure_messages(body, owner, spec, plan.failures)
    apply_supervision(body, owner, plan, spec, {i: m for i, _, m in failures})
    router = k.get("apps/v1", "Deployment", R.router_name(owner), owner.namespace) or {}
    router_ready = bool((router.get("status") or {}).get("availableReplicas"))
    failure = ""
    if spec.replicas and spec.device == "gpu":
        largest = k.max_node_gpus()
        if spec.gpus_per_pod > largest:
            failure = (f"each pod needs {spec.gpus_per_pod} nvidia.com/gpu but the largest schedulable node offers "
                       f"{largest}; set gpusPerPod lower (more pods per group) or add larger GPU nodes")
    old = dict(body.get("status") or {})
    if pool is None and spec.inferencePool.enabled:
        last = next((c for c in old.get("conditions") or [] if c.get("type") == POOL_CONDITION), None)
        pool = ((POOL_APPLIED, "") if last and last.get("status") == "True"
                else sync_inference_pool(owner, spec))
    selector = ",".join(f"{k_}={v}" for k_, v in R.leader_selector(owner).items())
    new = compute_status(spec, list(plan.groups), router_ready, body["metadata"].get("generation", 0), old,
                         R.grpc_endpoint(owner, spec), R.rest_endpoint(owner, spec), selector, failure,
                         inference_pool_condition(spec, *(pool or ("", "")), R.inference_pool_name(owner)), failures,
                         scaling_condition(spec, scaling, _last_scaled.get(owner.uid, "")))
    METRICS.phase(owner.namespace, owner.name, new["phase"])
    if all(old.get(key) == value for key, value in new.items()):
        return
    event = phase_event(old.get("phase"), new)
    if event and _announced.get(owner.uid) != new["phase"]:
        kopf.event(body, type=event[0], reason=event[1], message=event[2])
        _announced[owner.uid] = new["phase"]
    patch.status.update(new)


def watched_namespaces(namespace: str | None) -> list[str]:
    """`--namespace a,b` (the chart's watchNamespaces): watch these namespaces only; none: the cluster."""
    return [name.strip() for name in (namespace or "").split(",") if name.strip()]


def run(namespace: str | None = None, verbose: bool = False) -> None:
    """Entry point of `kubellm operator` and of the operator container.

    KUBELLM_OPERATOR_HEALTH (e.g. ``http://0.0.0.0:8080/healthz``) serves kopf's liveness endpoint,
    which the chart's probes and `helm test` use; KUBELLM_OPERATOR_METRICS_PORT serves Prometheus
    /metrics. KUBELLM_RUNTIME_IMAGE is the workers' image when a spec names none; KUBELLM_ROUTER_IMAGE
    the routers' (without it they run the workers' image).
    """
    # kopf.configure installs the one log handler (with basicConfig too, every line came out twice);
    # the probes' access log would be a line every few seconds.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if os.environ.get("KUBELLM_OPERATOR_METRICS_PORT"):
        METRICS.serve(int(os.environ["KUBELLM_OPERATOR_METRICS_PORT"]))
    kopf.configure(verbose=verbose)
    namespaces = watched_namespaces(namespace)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=os.environ.get("KUBELLM_OPERATOR_HEALTH") or None)

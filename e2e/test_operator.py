"""The operator against a real API server: kubectl as a user would drive it, KWOK for GPU nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "llmdeployments.kubellm.io.yaml"
EXAMPLE = ROOT / "examples" / "llmdeployment.yaml"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.kubellm.io", "--timeout=60s")
    # Room for the tests' groups while earlier test namespaces are still being deleted: 32 GPUs.
    extra = ("gpu-node-extra-a", "gpu-node-extra-b")
    for name in extra:
        cluster.add_gpu_node(name, gpus=8)
    with cluster.operator(tmp_path_factory.mktemp("operator") / "operator.log") as op:
        yield op
    # The cluster is shared by the session (e2e/test_autoscaling_api.py uses this fixture too): the nodes go with
    # the module, so e2e/test_cluster.py's two GPU nodes are the cluster's only ones wherever it runs.
    cluster.kubectl("delete", "node", *extra, "--ignore-not-found", "--wait=false", check=False)
    # The cluster is shared by the session: e2e/test_helm.py installs the CRD through its chart.
    cluster.kubectl("delete", "-f", str(CRD), "--ignore-not-found", "--timeout=120s")


_ns_counter = iter(range(1000))


@pytest.fixture
def ns(cluster):
    name = f"llm-{next(_ns_counter)}-{int(time.time()) % 100000}"
    cluster.create_namespace(name, RESTRICTED)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get(cluster, ns, *what) -> dict:
    return json.loads(cluster.kubectl("get", "-n", ns, *what, "-o", "json").stdout)


def llmd_status(cluster, ns, name) -> dict:
    return get(cluster, ns, "llmd", name).get("status") or {}


def wait_status(cluster, operator, ns, name, predicate, what, timeout=90):
    try:
        return cluster.wait_for(lambda: (lambda s: s if predicate(s) else None)(llmd_status(cluster, ns, name)),
                                what, timeout=timeout, interval=0.5)
    except Exception as err:
        raise AssertionError(f"{err}\nstatus: {llmd_status(cluster, ns, name)}\noperator log:\n{operator.tail()}")


def apply(cluster, ns, manifest: dict | str):
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=text)


def deployment(name, **spec) -> dict:
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
            "spec": {"model": {"source": "/models/tiny"}, **spec}}


def pods_of(cluster, ns, name, group=None) -> list[dict]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=worker"
    if group is not None:
        selector += f",kubellm.io/group={group}"
    return get(cluster, ns, "pods", "-l", selector)["items"]


def test_readme_example_creates_every_child_and_becomes_ready(cluster, operator, ns):
    apply(cluster, ns, EXAMPLE.read_text())
    status = wait_status(cluster, operator, ns, "mistral", lambda s: s.get("phase") == "Ready", "Ready")
    assert status["readyReplicas"] == 2 and status["replicas"] == 2
    assert status["endpoint"] == f"mistral.{ns}.svc.cluster.local:50051"
    assert status["restEndpoint"] == "http://mistral.example.com"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Available": "True", "Progressing": "False", "Degraded": "False"}

    sts = get(cluster, ns, "statefulsets")["items"]
    assert sorted(s["metadata"]["name"] for s in sts) == ["mistral-g0", "mistral-g1"]
    assert all(s["spec"]["replicas"] == 1 for s in sts)  # TP=2 in one pod with 2 GPUs
    for pod in pods_of(cluster, ns, "mistral"):
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert pod["spec"]["nodeName"].startswith("gpu-")
    names = {(o["kind"], o["metadata"]["name"]) for o in get(
        cluster, ns, "services,deployments,ingresses,configmaps,poddisruptionbudgets")["items"]}
    assert {("Service", "mistral"), ("Service", "mistral-leaders"), ("Service", "mistral-g0"),
            ("Deployment", "mistral-router"), ("Ingress", "mistral"), ("ConfigMap", "mistral-config"),
            ("PodDisruptionBudget", "mistral-workers")} <= names

    table = cluster.kubectl("get", "llmd", "-n", ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "TP", "PP", "READY", "PHASE", "ENDPOINT", "AGE"]
    assert row.split()[:6] == ["mistral", "hf://mistralai/Mistral-7B-v0.1", "2", "1", "2/2", "Ready"]
    reasons = {e["reason"] for e in get(cluster, ns, "events")["items"]}
    assert {"Created", "Ready"} <= reasons


def test_scale_adds_and_removes_whole_groups(cluster, operator, ns):
    apply(cluster, ns, deployment("scaled", tensorParallel=2, gpusPerPod=1, replicas=1))
    wait_status(cluster, operator, ns, "scaled", lambda s: s.get("phase") == "Ready", "Ready")
    cluster.kubectl("scale", "llmd", "scaled", "-n", ns, "--replicas=3")
    wait_status(cluster, operator, ns, "scaled", lambda s: s.get("readyReplicas") == 3 and s.get("phase") == "Ready",
                "3 ready replicas")
    assert len(pods_of(cluster, ns, "scaled")) == 6  # 3 groups x 2 ranks
    cluster.kubectl("scale", "llmd", "scaled", "-n", ns, "--replicas=1")
    wait_status(cluster, operator, ns, "scaled", lambda s: s.get("replicas") == 1 and s.get("phase") == "Ready", "1")
    cluster.wait_for(lambda: len(get(cluster, ns, "statefulsets")["items"]) == 1, "groups 1 and 2 removed", 30)
    assert "Scaled" in {e["reason"] for e in get(cluster, ns, "events")["items"]}


def test_a_dead_rank_restarts_its_whole_group(cluster, operator, ns):
    apply(cluster, ns, deployment("tp", tensorParallel=2, gpusPerPod=1, replicas=2))
    wait_status(cluster, operator, ns, "tp", lambda s: s.get("phase") == "Ready", "Ready")
    cluster.wait_for(lambda: all(s["metadata"].get("annotations", {}).get("kubellm.io/ready-pods")
                                 for s in get(cluster, ns, "statefulsets")["items"]), "groups recorded", 30)
    group0 = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods_of(cluster, ns, "tp", 0)}
    group1 = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "tp", 1)}
    # Watch every status update: the Degraded phase may last only one operator tick.
    watch = subprocess.Popen([cluster.bin("kubectl"), "get", "llmd", "tp", "-n", ns, "--watch",
                              "-o", "jsonpath={.status.phase}{'\\n'}"], env={**os.environ, **cluster.env},
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        cluster.kubectl("delete", "pod", "-n", ns, "tp-g0-1", "--wait=false")

        def recovered():
            status = llmd_status(cluster, ns, "tp")
            uids = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "tp", 0)}
            return status.get("phase") == "Ready" and len(uids) == 2 and not uids & set(group0.values())

        cluster.wait_for(recovered, "group 0 fully replaced and Ready", timeout=90, interval=0.3)
        time.sleep(1)
    finally:
        watch.terminate()
    phases = watch.communicate()[0].split()
    assert "Degraded" in phases, phases
    # The untouched rank 0 was restarted too; group 1 was left alone.
    assert {p["metadata"]["uid"] for p in pods_of(cluster, ns, "tp", 1)} == group1
    assert "GroupRestarted" in {e["reason"] for e in get(cluster, ns, "events")["items"]}


def test_spec_change_rolls_groups_one_at_a_time(cluster, operator, ns):
    apply(cluster, ns, deployment("roll", replicas=3))
    wait_status(cluster, operator, ns, "roll", lambda s: s.get("phase") == "Ready", "Ready")
    old = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "roll")}
    apply(cluster, ns, deployment("roll", replicas=3, engine={"maxBatchSize": 8}))
    lowest_ready = 3

    def rolled():
        nonlocal lowest_ready
        status = llmd_status(cluster, ns, "roll")
        if status.get("observedGeneration") == 2:
            lowest_ready = min(lowest_ready, status.get("readyReplicas", 0))
        uids = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "roll")}
        return status.get("phase") == "Ready" and status.get("updatedReplicas") == 3 and not uids & old

    cluster.wait_for(rolled, "all groups replaced", timeout=120, interval=0.2)
    assert lowest_ready >= 2, "more than one group was down at once"


@pytest.mark.parametrize("spec, field", [
    ({"replicas": -1}, "spec.replicas"),
    ({"restApi": {"enabled": False, "ingress": {"host": "x.example.com"}}}, "spec.restApi"),
    ({"unknownField": 1}, "unknownField"),
    ({"model": {"source": "ftp://somewhere/model"}}, "spec.model.source"),
    ({"tensorParallel": 4, "gpusPerPod": 3}, "gpusPerPod"),
    ({"maxGroupRestarts": -1}, "spec.maxGroupRestarts"),
    ({"groupRestartWindowSeconds": 10}, "spec.groupRestartWindowSeconds"),
])
def test_invalid_resources_are_rejected_by_the_api_server(cluster, operator, ns, spec, field):
    body = deployment("bad")
    body["spec"].update(spec)
    result = cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_operator_restart_leaves_children_alone(cluster, operator, ns):
    apply(cluster, ns, deployment("steady", replicas=2, restApi={"enabled": True}))
    wait_status(cluster, operator, ns, "steady", lambda s: s.get("phase") == "Ready", "Ready")
    time.sleep(3)  # let the ready-pods annotations settle

    def versions():
        items = get(cluster, ns, "statefulsets,services,deployments,configmaps,poddisruptionbudgets")["items"]
        return {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in items}

    before = versions()
    operator.stop()
    operator.start()
    time.sleep(8)  # resume handler + several timer ticks
    assert versions() == before, "a reconcile of an unchanged spec wrote to its children"
    assert len(get(cluster, ns, "statefulsets")["items"]) == 2


def test_delete_garbage_collects_every_child(cluster, operator, ns):
    apply(cluster, ns, deployment("gone", replicas=2))
    wait_status(cluster, operator, ns, "gone", lambda s: s.get("phase") == "Ready", "Ready")
    cluster.kubectl("delete", "llmd", "gone", "-n", ns)
    # The garbage collector learns of a new CRD's kind within its 30 s discovery resync.
    cluster.wait_for(lambda: not get(cluster, ns, "statefulsets,deployments,services,configmaps,pods",
                                     "-l", "app.kubernetes.io/instance=gone")["items"],
                     "children garbage-collected", timeout=90)


def test_more_gpus_than_any_node_is_explained(cluster, operator, ns):
    apply(cluster, ns, deployment("huge", tensorParallel=16))
    status = wait_status(cluster, operator, ns, "huge", lambda s: s.get("phase") == "Failed", "Failed")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InsufficientGPUs" and "16 nvidia.com/gpu" in degraded["message"]


def test_cluster_full_is_reported_as_unschedulable(cluster, operator, ns):
    apply(cluster, ns, deployment("full", tensorParallel=8, replicas=6))  # 48 GPUs; the nodes have 32
    status = wait_status(cluster, operator, ns, "full", lambda s: s.get("phase") == "Pending", "Pending", timeout=60)
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "Unschedulable" and "nvidia.com/gpu" in progressing["message"]


def condition(status, type_) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_inference_pool_follows_its_crd_and_selects_exactly_the_leaders(cluster, operator, ns):
    """Without the GIE CRD the deployment is Ready and a condition says why there is no pool; once the real
    CRD (from the Go module, e2e/build-control-plane.sh) is installed, the next refresh creates the pool, the
    API server accepts it, and its selector matches the rank-0 pods of every group and nothing else; turning
    it off deletes it. Each group's time to ready is in the status, `-o wide` and the ModelLoaded Events."""
    crd_file = sys.modules["kubellm_e2e_cluster"].inference_pool_crd(cluster.bin_dir)
    if crd_file is None:
        pytest.skip("the InferencePool CRD is not fetched; run: bash e2e/build-control-plane.sh")
    cluster.remove_inference_pool_crd()
    picker = {"name": "pool-epp", "port": 9002}
    apply(cluster, ns, deployment("pool", tensorParallel=2, gpusPerPod=1, replicas=2,
                                  inferencePool={"enabled": True, "endpointPickerRef": picker}))
    apply(cluster, ns, deployment("other", replicas=1))   # a neighbour whose leader must not be selected
    try:
        status = wait_status(cluster, operator, ns, "pool", lambda s: s.get("phase") == "Ready"
                             and condition(s, "InferencePoolReady").get("reason") == "CRDNotInstalled", "Ready, no CRD")
        assert condition(status, "InferencePoolReady")["status"] == "False"
        assert "inferencepools.inference.networking.k8s.io" in condition(status, "InferencePoolReady")["message"]
        assert {c["type"]: c["status"] for c in status["conditions"]}["Available"] == "True"

        # Time to ready: per group, from the pods the API server holds.
        assert [g["index"] for g in status["groups"]] == [0, 1]
        for group in status["groups"]:
            assert group["scheduledAt"] <= group["loadStartedAt"] <= group["readyAt"], group
            assert group["loadSeconds"] >= 0
        assert status["lastLoadSeconds"] == max(status["groups"], key=lambda g: g["readyAt"])["loadSeconds"]
        wide = cluster.kubectl("get", "llmd", "pool", "-n", ns, "-o", "wide").stdout.splitlines()
        assert "LOAD-SECONDS" in wide[0].split()
        assert wide[1].split()[wide[0].split().index("LOAD-SECONDS")] == f"{status['lastLoadSeconds']:g}", wide
        cluster.wait_for(lambda: sum(e["reason"] == "ModelLoaded" for e in get(
            cluster, ns, "events", "--field-selector", "involvedObject.name=pool")["items"]) >= 1, "ModelLoaded", 30)

        cluster.install_inference_pool_crd()
        status = wait_status(cluster, operator, ns, "pool",
                             lambda s: condition(s, "InferencePoolReady").get("status") == "True", "pool created")
        assert status["phase"] == "Ready" and "pool-epp:9002" in condition(status, "InferencePoolReady")["message"]
        pool = get(cluster, ns, "inferencepool", "pool")
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]
        assert pool["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "pool-epp",
                                                     "port": {"number": 9002}, "failureMode": "FailClose"}
        assert pool["metadata"]["ownerReferences"][0]["name"] == "pool"
        match = ",".join(f"{k}={v}" for k, v in pool["spec"]["selector"]["matchLabels"].items())
        selected = sorted(p["metadata"]["name"] for p in get(cluster, ns, "pods", "-l", match)["items"])
        every = get(cluster, ns, "pods")["items"]
        leaders = sorted(p["metadata"]["name"] for p in every
                         if p["metadata"]["labels"].get("app.kubernetes.io/instance") == "pool"
                         and p["metadata"]["labels"].get("apps.kubernetes.io/pod-index") == "0")
        assert selected == leaders == ["pool-g0-0", "pool-g1-0"], (selected, [p["metadata"]["name"] for p in every])
        assert len(every) > len(selected) + 2   # rank-1 pods, routers and the neighbour's pods are there, unselected
        for p in get(cluster, ns, "pods", "-l", match)["items"]:
            assert p["metadata"]["labels"]["inference.networking.k8s.io/engine-type"] == "vllm"
            [worker] = p["spec"]["containers"]
            assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in worker["ports"]
            assert worker["command"][worker["command"].index("--served-model-name") + 1] == "pool"

        apply(cluster, ns, deployment("pool", tensorParallel=2, gpusPerPod=1, replicas=2))
        cluster.wait_for(lambda: not get(cluster, ns, "inferencepools")["items"], "the pool deleted", timeout=60)
        status = wait_status(cluster, operator, ns, "pool", lambda s: not condition(s, "InferencePoolReady"),
                             "no pool condition")
        assert status["phase"] == "Ready"
    finally:
        cluster.remove_inference_pool_crd()


def test_a_group_that_keeps_failing_is_left_failed_with_its_rank_named(cluster, operator, ns):
    """maxGroupRestarts 2: group 0's rank 1 is lost three times; the first two losses restart the group, the
    third leaves it Failed (no more restarts) with a GroupFailed condition naming the group and rank, which
    says why its log could not be read (kwok pods have none). Group 1 keeps serving throughout. A spec
    change resets the budget and the group serves again. The pods carry LeaderWorkerSet's variables."""
    apply(cluster, ns, deployment("flaky", tensorParallel=2, gpusPerPod=1, replicas=2, maxGroupRestarts=2))
    wait_status(cluster, operator, ns, "flaky", lambda s: s.get("phase") == "Ready", "Ready")
    for pod in pods_of(cluster, ns, "flaky", 0):
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["LWS_LEADER_ADDRESS"]["value"] == f"flaky-g0-0.flaky-g0.{ns}"
        assert env["LWS_GROUP_SIZE"]["value"] == "2"
        assert env["LWS_WORKER_INDEX"]["valueFrom"] == env["POD_INDEX"]["valueFrom"]
    assert sorted(p["metadata"]["labels"]["apps.kubernetes.io/pod-index"] for p in pods_of(cluster, ns, "flaky", 0)) \
        == ["0", "1"]
    group1 = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 1)}

    def recorded(group):
        sts = get(cluster, ns, "statefulset", f"flaky-g{group}")
        annotations = sts["metadata"].get("annotations") or {}
        uids = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", group)}
        record = {item.partition(":")[0] for item in annotations.get("kubellm.io/ready-pods", "").split(",") if item}
        return annotations if len(uids) == 2 and record == uids and not annotations.get("kubellm.io/restarting") \
            else None

    for attempt in (1, 2):
        before = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 0)}
        cluster.wait_for(lambda: recorded(0), "group 0 recorded", 30)
        cluster.kubectl("delete", "pod", "-n", ns, "flaky-g0-1", "--wait=false")
        annotations = cluster.wait_for(lambda: (lambda a: a if a and not before & {
            p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 0)} else None)(recorded(0)),
            f"group 0 restarted ({attempt}) and whole again", 60, interval=0.3)
        assert len(annotations["kubellm.io/failure-restarts"].partition(":")[2].split(",")) == attempt
        assert llmd_status(cluster, ns, "flaky")["readyReplicas"] >= 1

    cluster.kubectl("delete", "pod", "-n", ns, "flaky-g0-1", "--wait=false")
    status = wait_status(cluster, operator, ns, "flaky", lambda s: condition(s, "GroupFailed").get("status") == "True",
                         "GroupFailed", timeout=60)
    failed = condition(status, "GroupFailed")
    assert failed["reason"] == "TooManyRestarts", failed
    assert "replica group 0, rank pod flaky-g0-1" in failed["message"] and "2 restarts" in failed["message"], failed
    assert "its log could not be read: " in failed["message"], failed   # kwok nodes run no kubelet to ask
    left = {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 0)}
    time.sleep(4)   # four operator ticks: the group is left alone
    status = llmd_status(cluster, ns, "flaky")
    assert {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 0)} == left
    assert status["phase"] == "Degraded" and status["readyReplicas"] == 1, status
    assert condition(status, "Available")["status"] == "True"
    assert {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 1)} == group1, "group 1 was touched"
    events = [e for e in get(cluster, ns, "events")["items"] if e["reason"] == "GroupFailed"]
    assert len(events) == 1 and events[0]["type"] == "Warning" and "flaky-g0-1" in events[0]["message"], events
    restarted = [e["message"] for e in get(cluster, ns, "events")["items"] if e["reason"] == "GroupRestarted"]
    assert any("restart 2 of maxGroupRestarts 2" in m for m in restarted), restarted

    # The user fixes something: a new spec restarts the group with a fresh budget.
    apply(cluster, ns, deployment("flaky", tensorParallel=2, gpusPerPod=1, replicas=2, maxGroupRestarts=2,
                                  engine={"maxBatchSize": 8}))
    status = wait_status(cluster, operator, ns, "flaky", lambda s: s.get("phase") == "Ready"
                         and s.get("updatedReplicas") == 2 and condition(s, "GroupFailed").get("status") == "False",
                         "Ready on the new spec", timeout=120)
    assert not {p["metadata"]["uid"] for p in pods_of(cluster, ns, "flaky", 0)} & left


def spec_of(cluster, ns, name) -> dict:
    return get(cluster, ns, "llmd", name)["spec"]


def test_autoscaling_is_exclusive_with_a_hand_set_replicas(cluster, operator, ns):
    """The transition rule on the real API server: replicas beside autoscaling is refused where a user sets it
    (on create, or when turning autoscaling on), and accepted where the autoscaler (or `kubectl scale`) writes it."""
    both = cluster.kubectl("apply", "-n", ns, "-f", "-", check=False,
                           input=yaml.safe_dump(deployment("both", replicas=2, autoscaling={"maxReplicas": 3})))
    assert both.returncode != 0 and "spec.replicas" in both.stderr and "exclusive" in both.stderr, both.stderr
    assert "remove spec.replicas" in both.stderr

    apply(cluster, ns, deployment("hand", replicas=2))
    turned_on = cluster.kubectl("patch", "llmd", "hand", "-n", ns, "--type=merge", "-p",
                                json.dumps({"spec": {"autoscaling": {"maxReplicas": 4}}}), check=False)
    assert turned_on.returncode != 0 and "exclusive" in turned_on.stderr, turned_on.stderr
    # Turning it on while removing replicas is the way (the message says so).
    cluster.kubectl("patch", "llmd", "hand", "-n", ns, "--type=json", "-p", json.dumps([
        {"op": "remove", "path": "/spec/replicas"}, {"op": "add", "path": "/spec/autoscaling",
                                                     "value": {"minReplicas": 1, "maxReplicas": 4}}]))

    # Autoscaling alone: the operator writes replicas (the floor, 2) through /scale and creates the groups.
    apply(cluster, ns, deployment("auto", autoscaling={"minReplicas": 2, "maxReplicas": 3}))
    cluster.wait_for(lambda: spec_of(cluster, ns, "auto").get("replicas") == 2, "replicas set through /scale", 60)
    wait_status(cluster, operator, ns, "auto", lambda s: s.get("readyReplicas") == 2, "2 groups", timeout=90)
    # kwok's pod IPs answer nothing: the load is unknown, which is no reason to scale, and the condition says so.
    status = wait_status(cluster, operator, ns, "auto", lambda s: condition(s, "ScalingActive").get("reason")
                         == "LoadUnknown", "ScalingActive LoadUnknown", timeout=60)
    assert condition(status, "ScalingActive")["status"] == "False" and "metrics" in condition(status, "ScalingActive")[
        "message"]
    cluster.kubectl("scale", "llmd", "auto", "-n", ns, "--replicas=9")     # accepted by the API server...
    cluster.wait_for(lambda: spec_of(cluster, ns, "auto").get("replicas") == 3, "brought back to maxReplicas", 60)
    assert "Autoscaled" in {e["reason"] for e in get(cluster, ns, "events")["items"]}


def test_scale_to_zero_keeps_the_router_and_reports_it(cluster, operator, ns):
    apply(cluster, ns, deployment("idle", autoscaling={"minReplicas": 0, "maxReplicas": 2}))
    status = wait_status(cluster, operator, ns, "idle", lambda s: s.get("phase") == "ScaledToZero", "ScaledToZero")
    assert condition(status, "ScaledToZero")["status"] == "True", status
    assert get(cluster, ns, "statefulsets")["items"] == []
    router = get(cluster, ns, "deployment", "idle-router")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--scale-from-zero" in router and router[router.index("--wait-for-replica") + 1] == "600"
    row = cluster.kubectl("get", "llmd", "idle", "-n", ns).stdout.splitlines()[1].split()
    assert row[4:6] == ["0/0", "ScaledToZero"], row


# -- NetworkPolicies (spec.networkPolicy) ---------------------------------------------------------
def policies(cluster, ns, name) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in get(cluster, ns, "networkpolicies", "-l",
                                                  f"app.kubernetes.io/instance={name}")["items"]}


def selected_by(cluster, ns, policy: dict) -> list[str]:
    """What `kubectl get pods -l <the policy's podSelector>` lists: the pods the policy applies to."""
    match = ",".join(f"{k}={v}" for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    return sorted(p["metadata"]["name"] for p in get(cluster, ns, "pods", "-l", match)["items"])


def test_network_policies_select_the_pods_meant_and_follow_the_groups(cluster, operator, ns):
    """The API server accepts the operator's policies; each one's podSelector selects exactly its pods (a
    neighbour deployment's pods in the namespace are never selected); a scale-down deletes the removed group's
    policy; turning spec.networkPolicy off deletes them all and on again brings them back. (Whether traffic
    is then filtered is the network plugin's business: docs/network.md.)"""
    body = dict(tensorParallel=2, gpusPerPod=1, replicas=2, restApi={"enabled": True},
                networkPolicy={"metricsFrom": {"kubernetes.io/metadata.name": "monitoring"}})
    apply(cluster, ns, deployment("fenced", **body))
    apply(cluster, ns, deployment("fenced-other", replicas=1))      # a neighbour with policies of its own
    wait_status(cluster, operator, ns, "fenced", lambda s: s.get("phase") == "Ready", "Ready")
    wait_status(cluster, operator, ns, "fenced-other", lambda s: s.get("phase") == "Ready", "neighbour Ready")
    cluster.wait_for(lambda: any(p["status"].get("phase") == "Running" for p in get(
        cluster, ns, "pods", "-l", "app.kubernetes.io/instance=fenced,app.kubernetes.io/component=router")["items"]),
        "router pod", 60)
    found = policies(cluster, ns, "fenced")
    assert sorted(found) == ["fenced-g0", "fenced-g1", "fenced-router", "fenced-workers"], sorted(found)
    routers = sorted(p["metadata"]["name"] for p in get(cluster, ns, "pods", "-l",
                                                        "app.kubernetes.io/instance=fenced,app.kubernetes.io/component=router")["items"])
    assert len(routers) == 1
    assert selected_by(cluster, ns, found["fenced-g0"]) == ["fenced-g0-0", "fenced-g0-1"]
    assert selected_by(cluster, ns, found["fenced-g1"]) == ["fenced-g1-0", "fenced-g1-1"]
    assert selected_by(cluster, ns, found["fenced-workers"]) == ["fenced-g0-0", "fenced-g0-1", "fenced-g1-0",
                                                                  "fenced-g1-1"]
    assert selected_by(cluster, ns, found["fenced-router"]) == routers
    # The peers as the API server stored them: a group from itself; gRPC from this deployment's routers only.
    assert found["fenced-g0"]["spec"]["ingress"] == [{"from": [{"podSelector": found["fenced-g0"]["spec"]["podSelector"]}]}]
    [from_router] = [r for r in found["fenced-workers"]["spec"]["ingress"] if {"port": 50051, "protocol": "TCP"} in r["ports"]]
    [router_peer] = from_router["from"]
    match = ",".join(f"{k}={v}" for k, v in router_peer["podSelector"]["matchLabels"].items())
    assert sorted(p["metadata"]["name"] for p in get(cluster, ns, "pods", "-l", match)["items"]) == routers
    [metrics] = [r for r in found["fenced-workers"]["spec"]["ingress"] if r["ports"] == [{"port": 9090, "protocol": "TCP"}]]
    assert metrics["from"][0] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for policy in found.values():
        assert policy["metadata"]["ownerReferences"][0]["name"] == "fenced" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert sorted(policies(cluster, ns, "fenced-other")) == ["fenced-other-g0", "fenced-other-router",
                                                             "fenced-other-workers"]

    cluster.kubectl("scale", "llmd", "fenced", "-n", ns, "--replicas=1")
    cluster.wait_for(lambda: len(get(cluster, ns, "statefulsets", "-l", "app.kubernetes.io/instance=fenced")["items"])
                     == 1, "one group left", 60)
    [kept] = [s["metadata"]["name"] for s in get(cluster, ns, "statefulsets", "-l", "app.kubernetes.io/instance=fenced")["items"]]
    cluster.wait_for(lambda: sorted(policies(cluster, ns, "fenced")) == sorted([kept, "fenced-router", "fenced-workers"]),
                     "the removed group's policy deleted with it", 30)

    apply(cluster, ns, deployment("fenced", **{**body, "replicas": 1, "networkPolicy": {"enabled": False}}))
    cluster.wait_for(lambda: not policies(cluster, ns, "fenced"), "every policy of the deployment deleted", 30)
    assert len(policies(cluster, ns, "fenced-other")) == 3, "the neighbour's policies are its own"
    wait_status(cluster, operator, ns, "fenced", lambda s: s.get("phase") == "Ready", "Ready without policies")
    apply(cluster, ns, deployment("fenced", **{**body, "replicas": 1}))
    cluster.wait_for(lambda: sorted(policies(cluster, ns, "fenced")) == sorted([kept, "fenced-router", "fenced-workers"]),
                     "the policies back", 30)


@pytest.mark.parametrize("spec, field, says", [
    ({"networkPolicy": {"gatewayFrom": {"gateway": "true"}}}, "spec.networkPolicy.gatewayFrom", "inferencePool.enabled"),
    ({"networkPolicy": {"metricsFrom": {"not a key": "x"}}}, "spec.networkPolicy.metricsFrom", "label key"),
    ({"networkPolicy": {"metricsFrom": {"team": "not a value"}}}, "spec.networkPolicy.metricsFrom", "should match"),
    ({"restApi": {"apiKeySecret": "Not_A_Name"}}, "spec.restApi.apiKeySecret", "should match"),
    ({"limits": {"maxRequestBytes": 10}}, "spec.limits.maxRequestBytes", "1024"),
    ({"limits": {"rateLimit": {"burst": 2}}}, "spec.limits.rateLimit.requestsPerSecond", "Required"),
])
def test_security_fields_are_checked_by_the_api_server(cluster, operator, ns, spec, field, says):
    body = deployment("bad")
    body["spec"].update(spec)
    result = cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0 and field in result.stderr and says in result.stderr, result.stderr


def test_adapters_become_lora_flags_on_every_rank_and_bad_ones_are_refused(cluster, operator, ns):
    """spec.adapters through the real API server and the operator: every rank's pod template runs `kubellm worker`
    with one --lora per adapter (pvc:// on a read-only mounted claim, hf:// downloaded by an init container like
    the model), and the API server refuses duplicate names, an adapter named like the deployment (the rule at the
    CRD's root reads metadata.name) and a source that is no adapter source, naming the field."""
    apply(cluster, ns, deployment("lora", tensorParallel=2, gpusPerPod=1, replicas=2, adapters=[
        {"name": "sql", "source": "pvc://loras/sql"}, {"name": "chat", "source": "hf://org/chat-lora@v1"},
        {"name": "code", "source": "/models/code-lora"}], engine={"maxLoraRank": 16}))
    cluster.wait_for(lambda: len(get(cluster, ns, "statefulsets")["items"]) == 2, "two groups", timeout=60)
    for sts in get(cluster, ns, "statefulsets")["items"]:
        assert sts["spec"]["replicas"] == 2   # two ranks (pods) per group, one template
        pod = sts["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]
        flags = [command[i + 1] for i, word in enumerate(command) if word == "--lora"]
        assert flags == ["sql=/adapters/pvc/loras/sql", "chat=/adapters/hf/org/chat-lora@v1", "code=/models/code-lora"]
        [init] = pod["initContainers"]
        assert init["command"] == ["kubellm", "models", "download", "hf://org/chat-lora@v1", "--dest",
                                   "/adapters/hf/org/chat-lora@v1", "--adapter"]
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"claimName": "loras", "readOnly": True}]
    config = get(cluster, ns, "configmap", "lora-config")["data"]
    assert json.loads(config["engine.json"])["max_lora_rank"] == 16

    for adapters, field, says in [
        ([{"name": "sql", "source": "/a"}, {"name": "sql", "source": "/b"}], "spec.adapters", "its own name"),
        ([{"name": "bad", "source": "/a"}], "spec.adapters", "named like the LLMDeployment"),
        ([{"name": "sql", "source": "smollm2-135m"}], "spec.adapters[0].source", "should match"),
        ([{"name": "Not_A_Label", "source": "/a"}], "spec.adapters[0].name", "should match"),
    ]:
        body = deployment("bad", adapters=adapters)
        result = cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body), check=False)
        assert result.returncode != 0 and field in result.stderr and says in result.stderr, result.stderr

"""Smoke tests proving the local control plane is a real Kubernetes: versions, scheduling onto
fake GPU nodes, Pod Security admission, extended-resource accounting, garbage collection, helm."""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.e2e

GPU = "nvidia.com/gpu"


def restricted_pod_spec(gpus: int = 0, *, privileged: bool = False) -> dict:
    """A pod spec that passes the `restricted` Pod Security Standard (unless ``privileged``)."""
    limits = {GPU: str(gpus)} if gpus else {}
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 65535,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if privileged:
        security = {"privileged": True}
    return {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}} if not privileged else {},
        "containers": [{
            "name": "app",
            "image": "registry.k8s.io/pause:3.10",
            "securityContext": security,
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": limits},
        }],
    }


def deployment(name: str, namespace: str, replicas: int, gpus: int = 0) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": restricted_pod_spec(gpus)},
        },
    }


def pod(name: str, namespace: str, gpus: int = 0, *, privileged: bool = False) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": restricted_pod_spec(gpus, privileged=privileged)}


def get(cluster, *args) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_kubectl_and_server_report_the_stamped_version(cluster):
    want = cluster.versions["K8S_VERSION"]
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == want
    assert out["clientVersion"]["gitVersion"] == want
    major, minor = want.lstrip("v").split(".")[:2]
    assert (out["serverVersion"]["major"], out["serverVersion"]["minor"]) == (major, minor)


def test_fake_gpu_nodes_are_ready(cluster):
    nodes = get(cluster, "nodes")["items"]
    gpu_nodes = {n["metadata"]["name"]: n for n in nodes if n["metadata"]["name"].startswith("gpu-node-")}
    assert sorted(gpu_nodes) == ["gpu-node-0", "gpu-node-1"]
    for node in gpu_nodes.values():
        assert node["status"]["allocatable"][GPU] == "8"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_deployment_runs_on_gpu_nodes_under_restricted_pod_security(cluster):
    ns = "e2e-restricted"
    cluster.create_namespace(ns, {"pod-security.kubernetes.io/enforce": "restricted",
                                  "pod-security.kubernetes.io/enforce-version": "latest"})
    cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment("web", ns, replicas=2, gpus=1)))
    cluster.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s")

    pods = get(cluster, "pods", "-n", ns, "-l", "app=web")["items"]
    assert len(pods) == 2
    for p in pods:
        assert p["spec"]["nodeName"] in {"gpu-node-0", "gpu-node-1"}
        assert p["status"]["phase"] == "Running"
        ready = {c["type"]: c["status"] for c in p["status"]["conditions"]}
        assert ready.get("Ready") == "True", p["status"]
    dep = get(cluster, "deployment", "web", "-n", ns)
    assert dep["status"].get("readyReplicas") == 2

    # Pod Security admission rejects a privileged pod in the same namespace.
    rejected = cluster.kubectl("apply", "-f", "-", input=json.dumps(pod("root", ns, privileged=True)), check=False)
    assert rejected.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in rejected.stderr, rejected.stderr
    assert "privileged" in rejected.stderr


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(cluster):
    ns = "e2e-gpu"
    cluster.create_namespace(ns)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod("greedy", ns, gpus=16)))

    def unschedulable():
        p = get(cluster, "pod", "greedy", "-n", ns)
        for c in p["status"].get("conditions") or []:
            if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                return p, c
        return None

    p, cond = cluster.wait_for(unschedulable, "pod greedy to be marked Unschedulable", timeout=60)
    assert p["status"]["phase"] == "Pending"
    assert "nodeName" not in p["spec"]
    assert f"Insufficient {GPU}" in cond["message"], cond["message"]


def test_deleting_a_deployment_garbage_collects_its_replicaset_and_pods(cluster):
    ns = "e2e-gc"
    cluster.create_namespace(ns)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment("gc-demo", ns, replicas=2)))
    cluster.kubectl("rollout", "status", "deployment/gc-demo", "-n", ns, "--timeout=60s")

    dep = get(cluster, "deployment", "gc-demo", "-n", ns)
    rs = get(cluster, "replicasets", "-n", ns, "-l", "app=gc-demo")["items"]
    assert len(rs) == 1
    assert rs[0]["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    pods = get(cluster, "pods", "-n", ns, "-l", "app=gc-demo")["items"]
    assert len(pods) == 2
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in pods} == {rs[0]["metadata"]["uid"]}

    cluster.kubectl("delete", "deployment", "gc-demo", "-n", ns, "--wait=true")

    def all_gone():
        left = cluster.kubectl("get", "replicasets,pods", "-n", ns, "-l", "app=gc-demo", "-o", "name").stdout
        return not left.strip()

    cluster.wait_for(all_gone, "the ReplicaSet and pods of gc-demo to be garbage-collected", timeout=60)


def test_statefulset_and_endpointslices(cluster):
    ns = "e2e-sts"
    cluster.create_namespace(ns, {"pod-security.kubernetes.io/enforce": "restricted"})
    labels = {"app": "ranks"}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ranks", "namespace": ns},
           "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "nccl", "port": 29500}]}}
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ranks", "namespace": ns},
           "spec": {"replicas": 2, "serviceName": "ranks", "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": restricted_pod_spec(gpus=2)}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [svc, sts]}))
    cluster.kubectl("rollout", "status", "statefulset/ranks", "-n", ns, "--timeout=60s")

    pods = get(cluster, "pods", "-n", ns, "-l", "app=ranks")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["ranks-0", "ranks-1"]
    assert {p["spec"]["nodeName"] for p in pods} <= {"gpu-node-0", "gpu-node-1"}

    def ready_endpoints():
        slices = get(cluster, "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=ranks")["items"]
        eps = [e for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")]
        return eps if len(eps) == 2 else None

    eps = cluster.wait_for(ready_endpoints, "2 ready endpoints in the EndpointSlice of service ranks", timeout=60)
    assert {e["targetRef"]["name"] for e in eps} == {"ranks-0", "ranks-1"}
    assert all(e["addresses"] for e in eps)  # kwok gives pods IPs

    cluster.kubectl("delete", "statefulset", "ranks", "-n", ns, "--cascade=foreground", "--wait=true")
    assert not get(cluster, "pods", "-n", ns, "-l", "app=ranks")["items"]


def test_helm_version_and_install(cluster, tmp_path):
    out = cluster.helm("version", "--short").stdout
    assert out.startswith(cluster.versions["HELM_VERSION"]), out

    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ .Release.Name }}-config
        data:
          kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
        """))
    cluster.create_namespace("e2e-helm")
    cluster.helm("install", "demo", str(chart), "-n", "e2e-helm", "--wait", "--timeout=60s")
    cm = get(cluster, "configmap", "demo-config", "-n", "e2e-helm")
    assert cm["data"]["kubeVersion"] == cluster.versions["K8S_VERSION"]  # helm asked the real server
    cluster.helm("uninstall", "demo", "-n", "e2e-helm", "--wait")
    assert cluster.kubectl("get", "configmap", "demo-config", "-n", "e2e-helm", check=False).returncode != 0

"""The Helm chart on a real control plane, with the real helm binary, as a user would drive it.

One release goes through its life in order: lint and server-side dry run, install, `helm test`,
the operator running with the chart's ServiceAccount token reconciling the README example (its
RBAC suffices) while the API server audits every request it makes (the ClusterRole grants nothing
it never uses), a namespaced second release, `helm upgrade` with a changed CRD, `helm uninstall`.
The operator runs as a local process (KWOK runs no containers), with the credentials the
chart's ServiceAccount would give its pod.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubellm"
EXAMPLE = ROOT / "examples" / "llmdeployment.yaml"
CPU_EXAMPLE = ROOT / "e2e" / "kind" / "smollm2-cpu.yaml"  # what the kind script applies
CRD_NAME = "llmdeployments.kubellm.io"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
SYSTEM = "kubellm-system"
SA_USER = f"system:serviceaccount:{SYSTEM}:kubellm"
# Our children, by the verbs with which they are server-side applied. An apply that creates an
# object is audited as `patch` but also authorized as `create`.
CHILDREN = {("apps", "statefulsets"), ("apps", "deployments"), ("", "services"), ("", "configmaps"),
            ("policy", "poddisruptionbudgets"), ("networking.k8s.io", "ingresses"),
            ("inference.networking.k8s.io", "inferencepools"), ("networking.k8s.io", "networkpolicies")}
# Authorized but never a request of its own: OwnerReferencesPermissionEnforcement checks it when a
# child names its LLMDeployment as owner with blockOwnerDeletion.
IMPLIED = {(group, resource, "create") for group, resource in CHILDREN} | {
    ("kubellm.io", "llmdeployments/finalizers", "update")}
# Used only when a rank fails (its log, quoted in the GroupFailed condition): the previous test fails none.
ON_FAILURE = {("", "pods/log", "get")}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_account_kubeconfig(cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig with a TokenRequest token of `namespace/account`: what its pods would get."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=2h").stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"][0]["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    (path.parent / f"{account}.{namespace}.token").write_text(token)
    return path


def get(cluster, *what, namespace=None) -> dict:
    return json.loads(cluster.kubectl("get", *what, *(["-n", namespace] if namespace else []), "-o", "json").stdout)


def wait_phase(cluster, operator, namespace, name, phase="Ready", timeout=90) -> dict:
    def status():
        s = get(cluster, "llmd", name, namespace=namespace).get("status") or {}
        return s if s.get("phase") == phase else None
    try:
        return cluster.wait_for(status, f"{namespace}/{name} {phase}", timeout=timeout, interval=0.5)
    except TimeoutError as err:
        raise AssertionError(f"{err}\noperator log:\n{operator.tail()}") from None


def operator_metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def audited(cluster, user: str) -> tuple[set[tuple[str, str, str]], list[dict]]:
    """(group, resource[/subresource], verb) of every resource request `user` made, and its denials."""
    seen, denied = set(), []
    for event in cluster.audit_events(user):
        ref = event.get("objectRef")
        if not ref:  # discovery and other non-resource URLs
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        seen.add((ref.get("apiGroup", ""), resource, event["verb"]))
        if event.get("responseStatus", {}).get("code") == 403:
            denied.append(event)
    return seen, denied


def granted_to(cluster, user_namespace: str, account: str) -> dict[str, set[tuple[str, str, str]]]:
    """What the RBAC objects of our releases grant the account: {binding scope: rules}."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    bindings = get(cluster, "clusterrolebindings", "-l", "app.kubernetes.io/name=kubellm")["items"]
    bindings += get(cluster, "rolebindings", "-A", "-l", "app.kubernetes.io/name=kubellm")["items"]
    for binding in bindings:
        if {"kind": "ServiceAccount", "name": account, "namespace": user_namespace} not in binding["subjects"]:
            continue
        role = get(cluster, "clusterrole", binding["roleRef"]["name"])
        scope = binding["metadata"].get("namespace", "*")
        out.setdefault(scope, set()).update(
            (group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"])
    return out


@pytest.fixture(scope="module")
def system(cluster):
    """The release's namespace; at the end, nothing of the module's is left (the CRD included),
    so that the next module starts from a bare cluster."""
    cluster.create_namespace(SYSTEM, RESTRICTED)
    yield SYSTEM
    for release, namespace in (("kubellm", SYSTEM), ("kubellm-team", "kubellm-team")):
        cluster.helm("uninstall", release, "-n", namespace, "--wait", check=False)
    cluster.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
    for namespace in (SYSTEM, "kubellm-team", "team-x", "team-y"):
        cluster.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false", check=False)


def test_lint_and_server_side_dry_run(cluster, system):
    assert "0 chart(s) failed" in cluster.helm("lint", "--strict", str(CHART)).stdout
    # Every rendered object (CRD, RBAC, Deployment, test Job...) is accepted by the API server as
    # it is (server-side dry run: validation and admission; the pods themselves are admitted under
    # `restricted` by the install and `helm test` below).
    for values in ([], ["--set", f"watchNamespaces={{{system}}}"]):
        rendered = cluster.helm("template", "kubellm", str(CHART), "-n", system, *values).stdout
        result = cluster.kubectl("apply", "--dry-run=server", "-n", system, "-f", "-", input=rendered)
        created = result.stdout.splitlines()
        assert len(created) == len([d for d in yaml.safe_load_all(rendered) if d]) and all(
            line.endswith("(server dry run)") for line in created), result.stdout
    assert "helm test kubellm" in cluster.helm("install", "kubellm", str(CHART), "-n", system, "--dry-run").stdout
    rejected = cluster.helm("install", "kubellm", str(CHART), "-n", system, "--set", "watchNamespaces={Bad_Name}",
                            check=False)
    assert rejected.returncode != 0 and "watchNamespaces" in rejected.stderr


def test_install(cluster, system):
    out = cluster.helm("install", "kubellm", str(CHART), "-n", system, "--wait", "--timeout", "90s").stdout
    assert "watching all namespaces" in out and "kubectl get llmd" in out and "keeps the CRD" in out, out
    deploy = get(cluster, "deployment", "kubellm", namespace=system)
    assert deploy["status"].get("readyReplicas") == 1  # KWOK ran the pod: it passed `restricted` admission
    crd = get(cluster, "crd", CRD_NAME)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "kubellm"
    assert cluster.kubectl("get", "llmd", "-A").returncode == 0


def test_helm_test(cluster, system):
    result = cluster.helm("test", "kubellm", "-n", system, "--timeout", "120s")
    assert "kubellm-test" in result.stdout and "Succeeded" in result.stdout, result.stdout
    # hook-succeeded: the Job is gone again
    cluster.wait_for(lambda: not get(cluster, "jobs", namespace=system)["items"], "test Job deleted", 30)


def test_operator_with_the_chart_token_reconciles_the_readme_example(cluster, system, tmp_path):
    """The chart's RBAC suffices: the README example (TP=2, 2 replicas, REST + Ingress) becomes
    Ready, has a group restarted, is rolled to a new spec and scaled down by an operator holding the
    chart's token;
    its worker and router pods are admitted under `restricted`; the API server denied it nothing.
    The test Job's check passes against this operator and fails against a dead address."""
    kubeconfig = service_account_kubeconfig(cluster, system, "kubellm", tmp_path / "sa.kubeconfig")
    health, metrics_port = f"http://127.0.0.1:{free_port()}/healthz", free_port()
    cluster.create_namespace("team-x", RESTRICTED)
    with cluster.operator(tmp_path / "operator.log", KUBECONFIG=str(kubeconfig), KUBELLM_OPERATOR_HEALTH=health,
                          KUBELLM_OPERATOR_METRICS_PORT=str(metrics_port)) as op:
        cluster.kubectl("apply", "-n", "team-x", "-f", str(EXAMPLE))
        status = wait_phase(cluster, op, "team-x", "mistral")
        assert status["readyReplicas"] == 2
        pods = get(cluster, "pods", "-l", "app.kubernetes.io/instance=mistral", namespace="team-x")["items"]
        assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == [
            "router", "worker", "worker"]
        assert all(c["ready"] for p in pods for c in p["status"]["containerStatuses"])

        check = [sys.executable, "-m", "kubellm.operator.check", "--server", cluster.server, "--token-file", str(tmp_path / f"kubellm.{system}.token"), "--ca-file", str(cluster.pki.ca_crt)]
        ok = subprocess.run([*check, "--health-url", health], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        dead = subprocess.run([*check, "--health-url", f"http://127.0.0.1:{free_port()}/healthz", "--timeout", "1"],
                              capture_output=True, text=True, timeout=60)
        assert dead.returncode == 1 and "operator health" in dead.stderr

        # Exercise the rest of what the operator does: restart a group, remove one.
        cluster.wait_for(lambda: all(s["metadata"].get("annotations", {}).get("kubellm.io/ready-pods") for s in get(
            cluster, "statefulsets", namespace="team-x")["items"]), "groups recorded", 30)
        cluster.kubectl("delete", "pod", "-n", "team-x", "mistral-g1-0", "--wait=false")
        cluster.wait_for(lambda: "GroupRestarted" in {e["reason"] for e in get(cluster, "events", namespace="team-x")[
            "items"]}, "GroupRestarted event", 60)
        wait_phase(cluster, op, "team-x", "mistral")
        # A one-pod group heals by itself; a rollout is what deletes pods: roll both groups.
        cluster.kubectl("patch", "llmd", "mistral", "-n", "team-x", "--type=merge",
                        "-p", json.dumps({"spec": {"generation": {"maxNewTokens": 99}}}))
        cluster.wait_for(lambda: (get(cluster, "llmd", "mistral", namespace="team-x").get("status") or {}).get(
            "updatedReplicas") == 2 and operator_metrics(metrics_port).get(
            'kubellm_operator_group_restarts_total{cause="rollout"}', 0) >= 2, "both groups rolled", 90)
        wait_phase(cluster, op, "team-x", "mistral")
        # The InferencePool: created once its (real) CRD is there, deleted when the spec turns it off.
        if sys.modules["kubellm_e2e_cluster"].inference_pool_crd(cluster.bin_dir) is None:
            pytest.fail("the InferencePool CRD is not fetched; run: bash e2e/build-control-plane.sh")
        cluster.install_inference_pool_crd()
        try:
            for enabled in (True, False):
                cluster.kubectl("patch", "llmd", "mistral", "-n", "team-x", "--type=merge",
                                "-p", json.dumps({"spec": {"inferencePool": {"enabled": enabled}}}))
                cluster.wait_for(lambda: bool(get(cluster, "inferencepools", namespace="team-x")["items"]) == enabled,
                                 f"the InferencePool {'created' if enabled else 'deleted'}", 60)
        finally:
            cluster.remove_inference_pool_crd()
        cluster.kubectl("scale", "llmd", "mistral", "-n", "team-x", "--replicas=1")
        cluster.wait_for(lambda: len(get(cluster, "statefulsets", namespace="team-x")["items"]) == 1,
                         "group 1 removed", 60)
        wait_phase(cluster, op, "team-x", "mistral")
        # The built-in autoscaler sets replicas through /scale (here the floor: kwok's router pods answer no
        # metrics, and an unknown load scales nothing).
        cluster.kubectl("patch", "llmd", "mistral", "-n", "team-x", "--type=json", "-p", json.dumps([
            {"op": "remove", "path": "/spec/replicas"},
            {"op": "add", "path": "/spec/autoscaling", "value": {"minReplicas": 1, "maxReplicas": 2}}]))
        cluster.wait_for(lambda: get(cluster, "llmd", "mistral", namespace="team-x")["spec"].get("replicas") == 1,
                         "replicas written by the autoscaler", 60)

        metrics = operator_metrics(metrics_port)
        assert metrics['kubellm_operator_llmdeployments{phase="Ready"}'] == 1
        assert metrics['kubellm_operator_reconciles_total{reason="create"}'] == 1
        assert metrics['kubellm_operator_group_restarts_total{cause="failure"}'] >= 1
        assert metrics["kubellm_operator_writes_total"] >= 10
        cluster.kubectl("delete", "llmd", "mistral", "-n", "team-x")
        cluster.wait_for(lambda: operator_metrics(metrics_port)['kubellm_operator_llmdeployments{phase="Ready"}'] == 0,
                         "a deleted LLMDeployment leaves the metrics", 30)
        _, denied = audited(cluster, SA_USER)
        assert not denied, [(e["verb"], e["objectRef"]) for e in denied]
        assert SA_USER not in op.tail(2000)


def test_cluster_role_grants_nothing_the_operator_never_uses(cluster, system):
    """Compare the chart's grants with the API server's audit log of the previous test."""
    seen, _ = audited(cluster, SA_USER)
    granted = granted_to(cluster, system, "kubellm")
    assert set(granted) == {"*"}, "cluster-wide by default"
    unused = granted["*"] - seen - IMPLIED - ON_FAILURE
    assert not unused, f"granted but never used by the operator: {sorted(unused)}"
    assert not seen - granted["*"]
    assert ("", "nodes", "list") in seen and ("kubellm.io", "llmdeployments/status", "patch") in seen


def test_namespaced_release_watches_only_its_namespaces(cluster, system, tmp_path):
    """A second release (the first owns the CRD) watching team-y only: its operator reconciles a CPU
    LLMDeployment (no GPU asked) there, leaves team-x alone, and has no cluster-wide grant but nodes."""
    cluster.create_namespace("team-y", RESTRICTED)
    cluster.create_namespace("kubellm-team", RESTRICTED)
    notes = cluster.helm("install", "kubellm-team", str(CHART), "-n", "kubellm-team", "--wait", "--timeout", "90s",
                         "--set", "crds.install=false", "--set", "watchNamespaces={team-y}").stdout
    assert "watching team-y only" in notes and "kubectl apply -n team-y -f -" in notes, notes
    granted = granted_to(cluster, "kubellm-team", "kubellm-team")
    assert set(granted) == {"*", "team-y"} and granted["*"] == {("", "nodes", "list")}
    deploy = get(cluster, "deployment", "kubellm-team", namespace="kubellm-team")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["args"] == ["--namespace=team-y"]

    kubeconfig = service_account_kubeconfig(cluster, "kubellm-team", "kubellm-team", tmp_path / "team.kubeconfig")
    cpu = yaml.safe_load(CPU_EXAMPLE.read_text())
    cpu["spec"].pop("image", None)  # the operator's runtime image applies
    with cluster.operator(tmp_path / "team.log", "--namespace=team-y", KUBECONFIG=str(kubeconfig),
                          KUBELLM_RUNTIME_IMAGE="ghcr.io/kubellm/runtime:0.1.0-cpu") as op:
        cluster.kubectl("apply", "-n", "team-y", "-f", "-", input=yaml.safe_dump(cpu))
        cluster.kubectl("apply", "-n", "team-x", "-f", "-", input=yaml.safe_dump({**cpu, "metadata": {"name": "other"}}))
        status = wait_phase(cluster, op, "team-y", cpu["metadata"]["name"])
        assert status["readyReplicas"] == 2
        pods = get(cluster, "pods", "-l", "app.kubernetes.io/component=worker", namespace="team-y")["items"]
        assert len(pods) == 2
        for pod in pods:
            [container] = pod["spec"]["containers"]
            assert container["image"] == "ghcr.io/kubellm/runtime:0.1.0-cpu"
            assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and "--device" in container["command"]
        time.sleep(2)
        assert not get(cluster, "llmd", "other", namespace="team-x").get("status"), "team-x is not watched"
        user = "system:serviceaccount:kubellm-team:kubellm-team"
        seen, denied = audited(cluster, user)
        assert not denied, [(e["verb"], e["objectRef"]) for e in denied]
        assert all(e["objectRef"].get("namespace") in (None, "team-y") for e in cluster.audit_events(user)
                   if e.get("objectRef")), "requests outside the watched namespace"
    cluster.kubectl("delete", "llmd", "other", "-n", "team-x")
    cluster.helm("uninstall", "kubellm-team", "-n", "kubellm-team", "--wait")
    assert not get(cluster, "rolebindings", "-n", "team-y", "-l", "app.kubernetes.io/instance=kubellm-team")["items"]


def test_upgrade_upgrades_the_crd(cluster, system, tmp_path):
    """`helm upgrade` to a chart whose CRD has a new field: the field is accepted afterwards."""
    body = {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "newer"},
            "spec": {"model": {"source": "/models/tiny"}, "replicas": 0, "e2eNewField": "hello"}}
    before = cluster.kubectl("apply", "-n", "team-x", "-f", "-", input=yaml.safe_dump(body), check=False)
    assert before.returncode != 0 and "e2eNewField" in before.stderr

    newer = tmp_path / "kubellm"
    shutil.copytree(CHART, newer)
    crd_file = newer / "files" / f"{CRD_NAME}.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["e2eNewField"] = {
        "type": "string"}
    crd_file.write_text(yaml.safe_dump(crd))
    chart = yaml.safe_load((newer / "Chart.yaml").read_text())
    chart["version"] = "0.1.1"
    (newer / "Chart.yaml").write_text(yaml.safe_dump(chart))

    cluster.helm("upgrade", "kubellm", str(newer), "-n", system, "--wait", "--timeout", "90s")
    assert "kubellm-0.1.1" in cluster.helm("list", "-n", system).stdout
    cluster.wait_for(lambda: "e2eNewField" in json.dumps(get(cluster, "crd", CRD_NAME)["spec"]), "CRD upgraded", 30)
    cluster.kubectl("apply", "-n", "team-x", "-f", "-", input=yaml.safe_dump(body))
    assert get(cluster, "llmd", "newer", namespace="team-x")["spec"]["e2eNewField"] == "hello"
    assert get(cluster, "deployment", "kubellm", namespace=system)["status"].get("readyReplicas") == 1


def ours(cluster, release: str) -> list[str]:
    """Everything labelled as the release's, in every namespace and cluster-wide, pods included."""
    kinds = "deployments,replicasets,pods,services,serviceaccounts,jobs,configmaps,rolebindings,roles"
    found = get(cluster, kinds, "-A", "-l", f"app.kubernetes.io/instance={release}")["items"]
    found += get(cluster, "clusterroles,clusterrolebindings,crd", "-l", f"app.kubernetes.io/instance={release}")["items"]
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in found)


def test_uninstall_leaves_only_the_kept_crd(cluster, system, tmp_path):
    assert ours(cluster, "kubellm")
    out = cluster.helm("uninstall", "kubellm", "-n", system, "--wait").stdout
    assert "kept due to the resource policy" in out and CRD_NAME in out, out
    cluster.wait_for(lambda: ours(cluster, "kubellm") == [f"CustomResourceDefinition/{CRD_NAME}"],
                     "only the CRD left", 60)
    assert not get(cluster, "secrets", "-l", "owner=helm,name=kubellm", namespace=system)["items"], "release records"
    # the user's LLMDeployments survive with it
    assert get(cluster, "llmd", "newer", namespace="team-x")["metadata"]["name"] == "newer"

    # crds.keep=false: nothing at all is left, even with LLMDeployments that an operator (no longer
    # running, as after any uninstall) reconciled: it put no finalizer on them.
    cluster.kubectl("delete", "crd", CRD_NAME, "--wait=true", "--timeout=60s")
    notes = cluster.helm("install", "kubellm", str(CHART), "-n", system, "--set", "crds.keep=false", "--wait",
                         "--timeout", "90s").stdout
    assert "DELETES the CRD and every LLMDeployment" in notes, notes
    assert f"CustomResourceDefinition/{CRD_NAME}" in ours(cluster, "kubellm")
    kubeconfig = service_account_kubeconfig(cluster, system, "kubellm", tmp_path / "sa.kubeconfig")
    with cluster.operator(tmp_path / "operator.log", KUBECONFIG=str(kubeconfig)) as op:
        cluster.kubectl("apply", "-n", "team-x", "-f", "-", input=yaml.safe_dump(
            {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "last"},
             "spec": {"model": {"source": "/models/tiny"}}}))
        wait_phase(cluster, op, "team-x", "last")
        time.sleep(2)  # a few timer ticks
    assert not get(cluster, "llmd", "last", namespace="team-x")["metadata"].get("finalizers")
    cluster.helm("uninstall", "kubellm", "-n", system, "--wait")
    cluster.wait_for(lambda: not ours(cluster, "kubellm"), "nothing of the release left", 60)
    cluster.wait_for(lambda: cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0, "CRD gone", 60)

"""Autoscaling an LLMDeployment through its scale subresource, against a real API server (fake GPU nodes):

- docs/operations.md's HorizontalPodAutoscaler and KEDA ScaledObject, taken from the doc's YAML blocks (so
  the doc is what is tested), pass `kubectl apply --dry-run=server`: the built-in HPA API, and KEDA's own
  CRDs from its Go module (e2e/build-control-plane.sh, KEDA_VERSION); broken variants are refused;
- the scale subresource: its selector selects exactly the leader (rank-0) pods, `kubectl scale` changes
  spec.replicas and the operator adds the group;
- the kube-controller-manager's real HPA controller, with the doc's HPA, scales an LLMDeployment through it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import pytest
import test_operator
import yaml
from test_operator import ROOT, apply, deployment, get, wait_status

# test_operator's fixtures: the LLMDeployment CRD and `kubellm operator` (module scope), a namespace per test.
operator = test_operator.operator
ns = test_operator.ns

DOC = ROOT / "docs" / "operations.md"
LEADER_LABELS = {"app.kubernetes.io/component": "worker", "apps.kubernetes.io/pod-index": "0"}


def unavailable(reason: str):
    """Skip, or fail where KUBELLM_E2E_REQUIRED is set (as e2e/conftest.py does for the binaries)."""
    if os.environ.get("KUBELLM_E2E_REQUIRED", "") not in ("", "0"):
        pytest.fail(f"KUBELLM_E2E_REQUIRED is set but {reason}", pytrace=False)
    pytest.skip(reason)


def doc_manifest(kind: str) -> dict:
    """The one `kind` object among the YAML blocks of docs/operations.md's "Autoscaling" section."""
    text = DOC.read_text()
    start = text.index("\n## Autoscaling\n")
    section = text[start:text.index("\n## ", start + 1)]
    found = [d for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
             for d in yaml.safe_load_all(block) if isinstance(d, dict) and d.get("kind") == kind]
    assert len(found) == 1, f"docs/operations.md#autoscaling should hold one {kind}, holds {len(found)}"
    return found[0]


def dry_run(cluster, namespace, manifest: dict, check: bool = True):
    return cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest),
                           check=check)


def scale_of(cluster, namespace, name) -> dict:
    return json.loads(cluster.kubectl(
        "get", "--raw", f"/apis/kubellm.io/v1alpha1/namespaces/{namespace}/llmdeployments/{name}/scale").stdout)


def selected_pods(cluster, namespace, selector: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in get(cluster, namespace, "pods", "-l", selector)["items"])


@pytest.fixture(scope="module")
def keda(cluster):
    """KEDA's real CRDs (ScaledObject, TriggerAuthentication, ClusterTriggerAuthentication); not its operator."""
    if sys.modules["kubellm_e2e_cluster"].keda_crds(cluster.bin_dir) is None:
        unavailable("the KEDA CRDs are not fetched; run: bash e2e/build-control-plane.sh")
    cluster.install_keda_crds()
    yield
    cluster.remove_keda_crds()


def with_change(manifest: dict, path: str, value) -> dict:
    """A copy of `manifest` with the dotted `path` (list indices as numbers) set to `value`."""
    out = copy.deepcopy(manifest)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def test_the_documented_scaled_object_is_valid_for_kedas_crd_and_broken_ones_are_refused(cluster, keda, ns):
    so = doc_manifest("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    target = so["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("kubellm.io/v1alpha1", "LLMDeployment")
    [trigger] = so["spec"]["triggers"]
    # The workers' model_name label is the LLMDeployment's name (docs/metrics.md): the query must say the target's.
    assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting{" in trigger["metadata"]["query"]
    assert f'model_name="{target["name"]}"' in trigger["metadata"]["query"], trigger

    out = dry_run(cluster, ns, so).stdout
    assert "scaledobject.keda.sh/mistral created (server dry run)" in out, out

    broken = {  # what a user gets wrong -> what KEDA's CRD answers
        "spec.triggers.0.metadata.threshold": (4, ("spec.triggers[0].metadata.threshold: Invalid value: "
                                                   "\"integer\": spec.triggers[0].metadata.threshold in body "
                                                   "must be of type string")),
        "spec.minReplicaCount": (9, "minReplicaCount must be less than or equal to maxReplicaCount"),
        "spec.minReplicas": (1, 'unknown field "spec.minReplicas"'),           # the HPA's name for it
        "spec.scaleTargetRef": ({"kind": "LLMDeployment"}, "spec.scaleTargetRef.name: Required value"),
    }
    for path, (value, error) in broken.items():
        proc = dry_run(cluster, ns, with_change(so, path, value), check=False)
        assert proc.returncode != 0 and error in proc.stderr, (path, proc.stdout, proc.stderr)
    assert not get(cluster, ns, "scaledobjects")["items"]   # a dry run stores nothing


def test_the_documented_trigger_authentication_is_valid_for_kedas_crd(cluster, keda, ns):
    auth = doc_manifest("TriggerAuthentication")
    out = dry_run(cluster, ns, auth).stdout
    assert "triggerauthentication.keda.sh/prometheus-token created (server dry run)" in out, out
    # The ScaledObject with the doc's authenticationRef and authModes, as the text says to add them.
    so = doc_manifest("ScaledObject")
    so["spec"]["triggers"][0]["authenticationRef"] = {"name": auth["metadata"]["name"]}
    so["spec"]["triggers"][0]["metadata"]["authModes"] = "bearer"
    assert "created (server dry run)" in dry_run(cluster, ns, so).stdout
    proc = dry_run(cluster, ns, with_change(so, "spec.triggers.0.authenticationRef.kind", "Secret"), check=False)
    assert proc.returncode != 0 and 'Unsupported value: "Secret"' in proc.stderr, proc.stderr
    proc = dry_run(cluster, ns, with_change(auth, "spec.secretTargetRef.0", {"parameter": "bearerToken",
                                                                             "name": "prometheus-token"}), check=False)
    assert proc.returncode != 0 and "spec.secretTargetRef[0].key: Required value" in proc.stderr, proc.stderr


def test_the_documented_hpa_is_valid_and_broken_ones_are_refused(cluster, ns):
    hpa = doc_manifest("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("kubellm.io/v1alpha1", "LLMDeployment")
    out = dry_run(cluster, ns, hpa).stdout
    assert "horizontalpodautoscaler.autoscaling/mistral created (server dry run)" in out, out

    broken = {
        "spec.maxReplicas": ("four", ("cannot unmarshal string into Go struct field HorizontalPodAutoscalerSpec."
                                      "spec.maxReplicas of type int32")),
        "spec.minReplicas": (0, "spec.minReplicas: Invalid value: 0: must be greater than or equal to 1"),
        "spec.metrics.0.pods.target.averageValue": ("four", "quantities must match the regular expression"),
        "spec.metrics.0.pods.target.type": ("Percent", ('spec.metrics[0].pods.target.type: Invalid value: "Percent": '
                                                        "must be either Utilization, Value, or AverageValue")),
    }
    for path, (value, error) in broken.items():
        proc = dry_run(cluster, ns, with_change(hpa, path, value), check=False)
        assert proc.returncode != 0 and error in proc.stderr, (path, proc.stdout, proc.stderr)
    assert not get(cluster, ns, "hpa")["items"]


def test_the_scale_subresource_selects_the_leaders_and_kubectl_scale_adds_a_group(cluster, operator, ns):
    apply(cluster, ns, deployment("scaled", tensorParallel=2, gpusPerPod=1, replicas=1))   # 2 pods per group
    apply(cluster, ns, deployment("other", replicas=1))   # a neighbour whose leader must not be selected
    wait_status(cluster, operator, ns, "scaled", lambda s: s.get("phase") == "Ready" and s.get("selector"), "Ready")
    wait_status(cluster, operator, ns, "other", lambda s: s.get("phase") == "Ready", "other Ready")

    scale = scale_of(cluster, ns, "scaled")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1 and scale["status"]["replicas"] == 1, scale
    selector = scale["status"]["selector"]
    assert dict(kv.split("=", 1) for kv in selector.split(",")) == {
        "app.kubernetes.io/instance": "scaled", **LEADER_LABELS}, selector
    assert selected_pods(cluster, ns, selector) == ["scaled-g0-0"]
    every = selected_pods(cluster, ns, "app.kubernetes.io/component=worker")
    assert every == ["other-g0-0", "scaled-g0-0", "scaled-g0-1"], every   # rank 1 and the neighbour: unselected

    cluster.kubectl("scale", "llmd/scaled", "-n", ns, "--replicas=2")
    assert get(cluster, ns, "llmd", "scaled")["spec"]["replicas"] == 2
    wait_status(cluster, operator, ns, "scaled", lambda s: s.get("readyReplicas") == 2 and s.get("phase") == "Ready",
                "2 ready replicas")
    scale = scale_of(cluster, ns, "scaled")
    assert scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2, scale
    assert scale["status"]["selector"] == selector
    assert selected_pods(cluster, ns, selector) == ["scaled-g0-0", "scaled-g1-0"]
    assert len(selected_pods(cluster, ns, "app.kubernetes.io/instance=scaled")) > 4   # 4 ranks + the router


def test_a_deployment_that_leaves_replicas_out_has_a_scale_subresource(cluster, operator, ns):
    """What HPA, KEDA and `kubectl scale --current-replicas` read first: an LLMDeployment without spec.replicas
    (the usual minimal spec, which runs 1 group) answers /scale with 1, not an error: the operator writes the
    replicas it runs (the API server answers GET /scale of an object without the field with a 500)."""
    apply(cluster, ns, deployment("plain"))
    cluster.wait_for(lambda: get(cluster, ns, "llmd", "plain")["spec"].get("replicas") == 1, "replicas written", 30)
    scale = scale_of(cluster, ns, "plain")
    assert scale["spec"]["replicas"] == 1, scale
    cluster.kubectl("scale", "llmd/plain", "-n", ns, "--current-replicas=1", "--replicas=2")
    assert get(cluster, ns, "llmd", "plain")["spec"]["replicas"] == 2


def test_the_hpa_controller_scales_an_llmdeployment_with_the_documented_hpa(cluster, operator, ns):
    """The controller manager's own HPA controller (its default RBAC on */scale) drives the deployment: the
    doc's HPA with minReplicas 2 over a deployment at 1 scales it up without any metrics API (a target below
    minReplicas is raised whatever the metrics say); at replicas 0 it leaves the target alone."""
    apply(cluster, ns, deployment("mistral", replicas=1))
    wait_status(cluster, operator, ns, "mistral", lambda s: s.get("phase") == "Ready", "Ready")
    hpa = with_change(doc_manifest("HorizontalPodAutoscaler"), "spec.minReplicas", 2)
    apply(cluster, ns, hpa)
    status = wait_status(cluster, operator, ns, "mistral", lambda s: s.get("readyReplicas") == 2, "the HPA's 2 groups",
                         timeout=150)
    assert status["replicas"] == 2 and get(cluster, ns, "llmd", "mistral")["spec"]["replicas"] == 2
    events = [e["message"] for e in get(cluster, ns, "events", "--field-selector",
                                        "involvedObject.kind=HorizontalPodAutoscaler")["items"]]
    assert any("New size: 2; reason: Current number of replicas below Spec.MinReplicas" in m for m in events), events

    cluster.kubectl("scale", "llmd/mistral", "-n", ns, "--replicas=0")   # pauses the HPA: scaling is disabled
    cluster.wait_for(lambda: any(c["type"] == "ScalingActive" and c["reason"] == "ScalingDisabled"
                                 for c in get(cluster, ns, "hpa", "mistral").get("status", {}).get("conditions", [])),
                     "the HPA's ScalingDisabled", timeout=90, interval=1)
    assert get(cluster, ns, "llmd", "mistral")["spec"]["replicas"] == 0

"""The Helm chart (charts/kubellm): CRD copy, values schema, and — when a helm binary is around —
`helm lint` and `helm template` with the rendered RBAC and Deployment checked.

helm is looked up on PATH, then in the e2e cache (`e2e/build-control-plane.sh` builds it under
${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/<k8s version>/bin); without one the helm tests skip.
The e2e suite installs the chart on a real control plane.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kubellm.operator import crd
from kubellm.operator import resources as R
from kubellm.operator.spec import LLMDeploymentSpec

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubellm"


def find_helm() -> str | None:
    if shutil.which("helm"):
        return shutil.which("helm")
    cache = os.environ.get("KUBELLM_E2E_CACHE", os.path.expanduser("~/.cache/kubellm/e2e"))
    found = [path for path in sorted(glob.glob(os.path.join(cache, "*", "bin", "helm"))) if os.access(path, os.X_OK)]
    return found[-1] if found else None


HELM = find_helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (on PATH or built by e2e/build-control-plane.sh); "
                                                     "the e2e suite runs helm for real")


# -- without helm ------------------------------------------------------------------------------
def test_chart_crd_is_the_generated_crd():
    chart_copy = CHART / "crds" / crd.CRD_FILE
    assert chart_copy.read_text(encoding="utf-8") == (ROOT / "crds" / crd.CRD_FILE).read_text(encoding="utf-8"), (
        f"the chart's CRD differs from crds/; run: {crd.REGENERATE}")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [crd.CRD_FILE]


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"], str(chart["appVersion"])) == ("v2", "kubellm", "0.1.0", "0.1.0")


def test_values_follow_their_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    for bad in ({"watchNamespace": "Not_A_Namespace"}, {"replicaCount": 2}, {"runAsUser": 0},
                {"image": {"repository": "x", "pullPolicy": "Sometimes"}}):
        assert list(jsonschema.Draft7Validator(schema).iter_errors({**values, **bad})), bad


# -- with helm ---------------------------------------------------------------------------------
def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/kubellm-helm/cache", "HELM_CONFIG_HOME": "/tmp/kubellm-helm/config",
           "HELM_DATA_HOME": "/tmp/kubellm-helm/data"}
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def render(*values: str) -> list[dict]:
    out = helm("template", "kubellm", str(CHART), "--namespace", "kubellm-system", "--include-crds",
               *[arg for value in values for arg in ("--set", value)]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in objects if o["kind"] == kind])
    return found[0]


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


PLURALS = {"StatefulSet": "statefulsets", "Deployment": "deployments", "Service": "services",
           "ConfigMap": "configmaps", "PodDisruptionBudget": "poddisruptionbudgets", "Ingress": "ingresses"}
APPLY = {"get", "list", "watch", "create", "patch", "delete"}  # server-side apply, observe, scale down


def needed_permissions() -> set[tuple[str, str, str]]:
    """What the operator does: apply every kind of child the builders produce, and the rest."""
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "hf://org/name"}, "tensorParallel": 2, "replicas": 2,
                                             "restApi": {"enabled": True, "ingress": {"host": "llm.example.com"}}})
    kinds = {(child["apiVersion"].rpartition("/")[0], child["kind"])
             for child in R.children(R.Owner("demo", "default", "uid"), spec)}
    assert {kind for _, kind in kinds} == set(PLURALS), "a new kind of child: grant it in charts/kubellm/templates/rbac.yaml"
    needed = {(group, PLURALS[kind], verb) for group, kind in kinds for verb in APPLY}
    needed |= {("kubellm.io", "llmdeployments", verb) for verb in ("get", "list", "watch", "patch")}
    needed |= {("kubellm.io", "llmdeployments/status", "patch"), ("kubellm.io", "llmdeployments/finalizers", "update")}
    needed |= {("", "pods", verb) for verb in ("get", "list", "watch", "delete")}
    needed |= {("", "events", "create")}
    return needed


@needs_helm
def test_helm_lint():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


@needs_helm
def test_rendered_objects():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "ClusterRoleBinding", "Deployment"])
    assert one(objects, "CustomResourceDefinition") == crd.crd_manifest()
    for o in objects:
        if o["kind"] in ("ServiceAccount", "Deployment"):
            assert o["metadata"]["namespace"] == "kubellm-system"


@needs_helm
def test_rbac_covers_what_the_operator_does():
    objects = render()
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    rules: set[tuple[str, str, str]] = set()
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kubellm-system"}]
        rules |= granted(one(objects, "ClusterRole", binding["roleRef"]["name"]))
    missing = needed_permissions() - rules
    assert not missing, f"the operator's ServiceAccount lacks {sorted(missing)}"
    assert {("", "nodes", verb) for verb in ("get", "list", "watch")} <= rules
    assert not {r for r in rules if r[1] == "secrets"}, "the operator never reads Secrets"
    assert not {r for r in rules if r[1] == "nodes" and r[2] not in ("get", "list", "watch")}
    assert not {r for r in rules if "*" in r}


@needs_helm
def test_watch_namespace_binds_in_that_namespace_only():
    objects = render("watchNamespace=team-a")
    binding = one(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "team-a"
    role = one(objects, "ClusterRole", binding["roleRef"]["name"])
    assert needed_permissions() <= granted(role)
    # cluster-wide, only the reads the cluster-scoped role grants
    cluster_wide = set()
    for b in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        cluster_wide |= granted(one(objects, "ClusterRole", b["roleRef"]["name"]))
    assert {verb for _, _, verb in cluster_wide} <= {"get", "list", "watch"}
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in container["args"]


@needs_helm
def test_operator_deployment_is_restricted():
    deployment = one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    [container] = pod["containers"]
    assert container["command"] == ["kubellm", "operator"]
    assert container["image"] == "ghcr.io/kubellm/kubellm:0.1.0"
    assert "args" not in container  # the whole cluster by default
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True and not context.get("privileged")
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(render(), "ServiceAccount")["metadata"]["name"]


@needs_helm
def test_values_schema_is_enforced():
    result = helm("template", "kubellm", str(CHART), "--set", "watchNamespace=Not_A_Namespace", check=False)
    assert result.returncode != 0 and "watchNamespace" in result.stderr
    result = helm("template", "kubellm", str(CHART), "--set", "replicaCount=2", check=False)
    assert result.returncode != 0

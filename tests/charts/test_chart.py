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
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from processes import e2e_binary

from kubellm.operator import crd
from kubellm.operator import resources as R
from kubellm.api.spec import LLMDeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubellm"


HELM = e2e_binary("helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary (on PATH or built by e2e/build-control-plane.sh); "
                                                     "the e2e suite runs helm for real")


# -- what the operator calls --------------------------------------------------------------------
PLURALS = {"StatefulSet": "statefulsets", "Deployment": "deployments", "Service": "services",
           "ConfigMap": "configmaps", "PodDisruptionBudget": "poddisruptionbudgets", "Ingress": "ingresses",
           "Pod": "pods", "InferencePool": "inferencepools", "NetworkPolicy": "networkpolicies"}
APPLY = ("get", "create", "patch")  # Kube.apply: read the live object; server-side apply (create when new)

# Every permission the operator needs, with the call behind it; the chart's RBAC must grant exactly
# these. Tied to the code below (statically) and by e2e/test_helm.py to the API server's audit log.
FRAMEWORK = {  # kopf and Kubernetes, not our code
    ("kubellm.io", "llmdeployments", "list"): "kopf: initial listing of the watched resource",
    ("kubellm.io", "llmdeployments", "watch"): "kopf: the watch stream",
    ("kubellm.io", "llmdeployments", "patch"): "kopf: progress and diff-base annotations",
    ("kubellm.io", "llmdeployments/status", "patch"): "handlers: patch.status",
    ("kubellm.io", "llmdeployments/finalizers", "update"):
        "children's ownerReferences set blockOwnerDeletion (OwnerReferencesPermissionEnforcement)",
    ("", "events", "create"): "kopf.event",
}


def operator_calls() -> dict[tuple[str, str, str], str]:
    """(group, resource, verb) of every API call in the operator's own code, and where it is."""
    calls: dict[tuple[str, str, str], str] = {}
    owner, spec = R.Owner("demo", "default", "uid"), LLMDeploymentSpec.model_validate(
        {"model": {"source": "hf://org/name"}, "tensorParallel": 2, "replicas": 2,
         "restApi": {"enabled": True, "ingress": {"host": "llm.example.com"}}, "inferencePool": {"enabled": True}})
    for child in [*R.children(owner, spec), R.inference_pool(owner, spec)]:  # the pool: handlers.sync_inference_pool
        for verb in APPLY:
            calls[(child["apiVersion"].rpartition("/")[0], PLURALS[child["kind"]], verb)] = "Kube.apply (children)"
    source = (ROOT / "operator" / "handlers.py").read_text()
    for method, api_version, kind in re.findall(r'\bk\.(list|get|delete)\("([^"]+)", "(\w+)"', source):
        calls[(api_version.rpartition("/")[0], PLURALS[kind], method)] = f"handlers.py: k.{method}({kind})"
    for api_version, kind in re.findall(r'k\.resource\("([^"]+)", "(\w+)"\)\.patch\(', source):
        calls[(api_version.rpartition("/")[0], PLURALS[kind], "patch")] = f"handlers.py: patch {kind}"
    if "k.max_node_gpus()" in source and "list_node()" in (ROOT / "operator" / "kube.py").read_text():
        calls[("", "nodes", "list")] = "Kube.max_node_gpus"
    if "k.scale(" in source and "patch_namespaced_custom_object_scale(" in (ROOT / "operator" / "kube.py").read_text():
        calls[("kubellm.io", "llmdeployments/scale", "patch")] = "Kube.scale (the built-in autoscaler)"
    if "k.pod_log(" in source and "read_namespaced_pod_log(" in (ROOT / "operator" / "kube.py").read_text():
        calls[("", "pods/log", "get")] = "Kube.pod_log (a failed rank's log, for the GroupFailed condition)"
    return calls


def needed_permissions() -> set[tuple[str, str, str]]:
    return set(operator_calls()) | set(FRAMEWORK)


def test_operator_calls_are_found():
    calls = operator_calls()
    # A few calls the regexes must keep finding, or this test proves nothing.
    for call in [("apps", "statefulsets", "delete"), ("", "pods", "delete"), ("", "pods", "list"),
                 ("apps", "statefulsets", "patch"), ("", "nodes", "list"), ("apps", "deployments", "get"),
                 ("networking.k8s.io", "ingresses", "create"), ("", "pods/log", "get"),
                 ("networking.k8s.io", "networkpolicies", "create"), ("networking.k8s.io", "networkpolicies", "delete")]:
        assert call in calls, call
    # Every way handlers.py talks to the API server is one the regexes understand.
    source = (ROOT / "operator" / "handlers.py").read_text()
    assert len(re.findall(r"\bk\.(?:list|get|delete)\(", source)) == len(
        re.findall(r'\bk\.(?:list|get|delete)\("[^"]+", "\w+"', source))
    assert not re.search(r"\bkube\(\)\.(?!apply)", source), "call the API through `k = kube()` so it is counted here"


# -- without helm ------------------------------------------------------------------------------
def test_operator_puts_no_finalizer_on_llmdeployments():
    """Else deleting one (or uninstalling with crds.keep=false) hangs while the operator is down."""
    import kopf

    from kubellm.operator import handlers  # noqa: F401 (registers the handlers)

    registry = kopf.get_default_registry()
    spawning = registry._spawning.get_all_handlers()
    assert spawning and not any(h.requires_finalizer for h in spawning)
    assert not any(getattr(h, "requires_finalizer", None) for h in registry._changing.get_all_handlers())


def test_operator_namespace_flag_takes_the_charts_list():
    from kubellm.operator.handlers import watched_namespaces

    assert watched_namespaces("team-a,team-b") == ["team-a", "team-b"]
    assert watched_namespaces("team-a") == ["team-a"] and watched_namespaces(None) == watched_namespaces("") == []


# -- without helm ------------------------------------------------------------------------------
def test_chart_crd_is_the_generated_crd():
    chart_copy = CHART / "files" / crd.CRD_FILE
    assert chart_copy.read_text(encoding="utf-8") == (ROOT / "crds" / crd.CRD_FILE).read_text(encoding="utf-8"), (
        f"the chart's CRD differs from crds/; run: {crd.REGENERATE}")
    assert sorted(p.name for p in (CHART / "files").iterdir()) == [crd.CRD_FILE]
    assert not (CHART / "crds").exists(), "crds/ is never upgraded by helm; the CRD is templates/crd.yaml"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"], str(chart["appVersion"])) == ("v2", "kubellm", "0.1.0", "0.1.0")


def test_values_follow_their_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    for bad in ({"watchNamespaces": ["Not_A_Namespace"]}, {"watchNamespace": "a"}, {"replicaCount": 2},
                {"runAsUser": 0}, {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
                {"crds": {"kep": False}}, {"metrics": {"podMonitor": {"enabled": True, "intervall": "1m"}}},
                {"refreshIntervalSeconds": 0}):
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


@needs_helm
def test_helm_lint():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


@needs_helm
def test_rendered_objects():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "ClusterRoleBinding", "Deployment", "Service", "Job"])
    rendered_crd, generated = one(objects, "CustomResourceDefinition"), crd.crd_manifest()
    assert rendered_crd["spec"] == generated["spec"] and rendered_crd["metadata"]["name"] == generated["metadata"]["name"]
    assert rendered_crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    for o in objects:
        if o["kind"] in ("ServiceAccount", "Deployment", "Service", "Job"):
            assert o["metadata"]["namespace"] == "kubellm-system"
    assert "annotations" not in one(render("crds.keep=false"), "CustomResourceDefinition")["metadata"]
    assert not [o for o in render("crds.install=false", "tests.enabled=false")
                if o["kind"] in ("CustomResourceDefinition", "Job")]


@needs_helm
def test_rbac_is_exactly_what_the_operator_does():
    objects = render()
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    rules: set[tuple[str, str, str]] = set()
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kubellm-system"}]
        rules |= granted(one(objects, "ClusterRole", binding["roleRef"]["name"]))
    missing, unused = needed_permissions() - rules, rules - needed_permissions()
    assert not missing, f"the operator's ServiceAccount lacks {sorted(missing)}"
    assert not unused, f"the chart grants what the operator never does: {sorted(unused)}"
    assert not {r for r in rules if "*" in r}


@needs_helm
def test_watch_namespaces_binds_in_those_namespaces_only():
    objects = render("watchNamespaces={team-a,team-b}")
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert needed_permissions() - {("", "nodes", "list")} == granted(one(objects, "ClusterRole",
                                                                              binding["roleRef"]["name"]))
    # cluster-wide, only listing nodes
    cluster_wide = set()
    for b in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        cluster_wide |= granted(one(objects, "ClusterRole", b["roleRef"]["name"]))
    assert cluster_wide == {("", "nodes", "list")}
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--namespace=team-a,team-b"]


@needs_helm
def test_operator_deployment_is_restricted_and_probed():
    objects = render()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    [container] = pod["containers"]
    assert container["command"] == ["kubellm", "operator"]
    assert container["image"] == "ghcr.io/kubellm/operator:0.1.0"
    assert "args" not in container  # the whole cluster by default
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBELLM_RUNTIME_IMAGE"] == "ghcr.io/kubellm/runtime:0.1.0"
    assert env["KUBELLM_ROUTER_IMAGE"] == "ghcr.io/kubellm/router:0.1.0"
    assert env["KUBELLM_OPERATOR_HEALTH"] == "http://0.0.0.0:8080/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert env["KUBELLM_OPERATOR_METRICS_PORT"] == "9090" and env["KUBELLM_OPERATOR_INTERVAL"] == "5"
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True and not context.get("privileged")
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    service = one(objects, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"health": "health", "metrics": "metrics"}
    env = {e["name"]: e.get("value") for e in one(render(
        "runtimeImage.tag=0.1.0-cpu", "image.tag=dev", "routerImage.repository=registry.example/router"),
        "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBELLM_RUNTIME_IMAGE"] == "ghcr.io/kubellm/runtime:0.1.0-cpu"
    assert env["KUBELLM_ROUTER_IMAGE"] == "registry.example/router:0.1.0"


@needs_helm
@pytest.mark.parametrize("values", [(), ("fullnameOverride=ops", "podLabels.team=a")])
def test_operator_learns_where_its_pods_are(values):
    """POD_NAMESPACE (downward API) and KUBELLM_OPERATOR_POD_LABELS, which the LLMDeployments' NetworkPolicies
    admit to the pods' /metrics: labels the operator's pod really carries, and that no other pod of the chart's does."""
    from kubellm.operator.network_policy import OperatorPods

    objects = render(*values)
    deployment = one(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    pods = OperatorPods.from_env({"POD_NAMESPACE": "kubellm-system",
                                  "KUBELLM_OPERATOR_POD_LABELS": env["KUBELLM_OPERATOR_POD_LABELS"]["value"]})
    assert pods is not None and pods.labels == deployment["spec"]["selector"]["matchLabels"]
    assert pods.labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    job = one(objects, "Job")["spec"]["template"]["metadata"].get("labels") or {}
    assert not pods.labels.items() <= job.items(), "the helm test Job's pod would be admitted as the operator"


@needs_helm
def test_helm_test_hook_checks_the_api_and_the_operator():
    objects = render()
    job = one(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "kubellm.operator.check"]
    service = one(objects, "Service")
    assert f"--health-url=http://{service['metadata']['name']}.kubellm-system.svc:8080/healthz" in container["command"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["allowPrivilegeEscalation"] is False


@needs_helm
@pytest.mark.parametrize("values", [(), ("watchNamespaces={team-a}", "verbose=true"),
                                    ("metrics.podMonitor.enabled=true", "metrics.serviceMonitor.enabled=true")])
def test_every_container_is_restricted_with_a_read_only_root(values):
    """The `restricted` Pod Security Standard for every pod the chart makes (operator, helm test), and a
    read-only root filesystem in every container, with HOME on a writable emptyDir."""
    pods = [(o["kind"], o["spec"]["template"]["spec"]) for o in render(*values) if o["kind"] in ("Deployment", "Job")]
    assert sorted(kind for kind, _ in pods) == ["Deployment", "Job"]
    for kind, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, kind
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values())
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, (kind, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), (kind, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (kind, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (kind, c["name"])
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])
                        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("HOME") in writable, (kind, c["name"], env.get("HOME"), writable)


@needs_helm
def test_monitors_scrape_the_operator_workers_and_routers():
    assert not [o for o in render() if o["kind"] in ("PodMonitor", "ServiceMonitor")]
    objects = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
    service_monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert service_monitor["metadata"]["labels"]["release"] == "prom"
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubellm-system"]}
    monitor = one(render("metrics.podMonitor.enabled=true", "metrics.podMonitor.labels.release=prom",
                         "watchNamespaces={a}"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["a"]}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == R.METRICS_PORT_NAME
    components = next(e for e in monitor["spec"]["selector"]["matchExpressions"]
                      if e["key"] == "app.kubernetes.io/component")["values"]
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}})
    owner = R.Owner("x", "a", "uid")
    for built in (R.worker_statefulset(owner, spec, 0), R.router_deployment(owner, spec)):
        labels = built["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "kubellm" and labels["app.kubernetes.io/component"] in components


@needs_helm
def test_values_schema_is_enforced():
    for value, named in (("watchNamespaces={Not_A_Namespace}", "watchNamespaces"), ("replicaCount=2", "replicaCount"),
                         ("crds.kep=false", "kep"), ("image.pullPolicy=Sometimes", "pullPolicy")):
        result = helm("template", "kubellm", str(CHART), "--set", value, check=False)
        assert result.returncode != 0 and named in result.stderr, (value, result.stderr)


# -- images (docker/; built by e2e/images.py on the real node, by e2e/kind/run.sh where Docker exists) ----
DOCKERFILES = {"operator": ROOT / "docker" / "operator.Dockerfile", "runtime": ROOT / "docker" / "runtime.Dockerfile",
               "runtime-cpu": ROOT / "docker" / "runtime-cpu.Dockerfile", "router": ROOT / "docker" / "router.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    steps = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    # RUN's own flags (--mount=...) are not part of the command.
    return [(op, re.sub(r"^(--\S+\s+)+", "", arg) if op == "RUN" else arg) for op, arg in steps]


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)


def base_image(steps: list[tuple[str, str]]) -> str:
    """The FROM image, with ${ARG}s before it replaced by their defaults (what `docker build` uses)."""
    [base] = [arg for op, arg in steps if op == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults(steps)[m.group(1)], base)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_are_pinned_and_run_as_non_root(name):
    steps = instructions(DOCKERFILES[name])
    base = base_image(steps)
    image, _, tag = base.partition(":")
    assert re.fullmatch(r"\d+\.\d+\.\d+-[a-z0-9.-]+", tag), f"{name}: pin the base image to an exact version: {base}"
    users = [arg for op, arg in steps if op == "USER"]
    assert users == ["1000:1000"], "numeric, so that runAsNonRoot can verify it; uid 1000 as the pods run"
    assert ("ENTRYPOINT", '["kubellm"]') in steps
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    commands = [c.strip() for op, arg in steps if op == "RUN" for c in arg.split("&&")]
    installs = " ".join(c for c in commands if c.startswith("pip install") or c.startswith("kubellm "))
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env, "no pip cache in the image"
    if name == "operator":
        assert "[operator]" in installs and "torch" not in installs and "[runtime]" not in installs
    elif name == "router":
        assert '"/src[router]"' in installs and "torch" not in installs and "[runtime]" not in installs
        # What the router never imports is deleted (the benchmarks with it), and the image proves it runs.
        assert re.search(r'drop="[^"]*\bbench\b[^"]*"', runs) and "runtime/engine" in runs and "kernels" in runs
        assert "kubellm router --help" in installs and "import kubellm.runtime.serving.router" in runs
    elif name == "runtime":
        assert "/src[runtime]" in installs and "torch==${TORCH_VERSION}" in installs
    else:  # runtime-cpu: the dependencies of [runtime] first (a layer source changes do not rebuild), then kubellm
        assert "['optional-dependencies']['runtime']" in runs and "pip install --no-deps /src" in installs
        assert "torch==${TORCH_VERSION}" in installs
    if name.startswith("runtime"):
        assert "kubellm models pull smollm2-135m" in installs, "the embedded model the kind test serves"
        assert re.fullmatch(r"\d+\.\d+\.\d+", arg_defaults(steps)["TORCH_VERSION"])
    if name == "runtime":
        assert image == "nvidia/cuda"
    else:
        # One Dockerfile for docker (python:slim) and for e2e/images.py (Debian's python3, PEP 668): a venv.
        assert "BASE_IMAGE" in arg_defaults(steps) and image == "python"
        assert "VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH" in env and "python3 -m venv $VIRTUAL_ENV" in runs
        assert {"PIP_FIND_LINKS", "PIP_NO_INDEX"} <= {arg for op, arg in steps if op == "ARG"}, "e2e/images.py: offline pip"
    if name == "runtime-cpu":
        assert "download.pytorch.org" not in runs, "torch comes from PyPI (the CPU-only index is not reachable everywhere)"


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_cpu_image_drops_only_what_import_torch_never_loads():
    """runtime-cpu.Dockerfile slims PyPI's CUDA torch: nothing it uninstalls or deletes may be a
    library that `import torch` loads (torch/_C and libtorch_global_deps, and what they link,
    transitively), checked on the torch installed here with readelf."""
    import importlib.metadata as md

    torch_dir = Path(md.distribution("torch").locate_file("torch"))
    site = torch_dir.parent
    if not (site / "nvidia").is_dir():
        pytest.skip("this torch is not PyPI's CUDA build (no nvidia/ wheels next to it)")
    steps = instructions(DOCKERFILES["runtime-cpu"])
    commands = [c.strip() for op, arg in steps if op == "RUN" for c in arg.split("&&")]
    [uninstall] = [c for c in commands if c.startswith("pip uninstall -y triton")]
    removed: set[Path] = set()
    for dist in uninstall.split()[3:]:
        removed |= {Path(dist_file.locate_file(f)).resolve() for dist_file in [md.distribution(dist)]
                    for f in dist_file.files or []}
    [rm] = [c for c in commands if c.startswith("rm -rf $nvidia/")]
    for pattern in rm.split()[2:]:
        for hit in glob.glob(pattern.replace("$nvidia", str(site / "nvidia"))):
            hit = Path(hit)
            removed |= {p.resolve() for p in hit.rglob("*")} if hit.is_dir() else {hit.resolve()}
    assert any(p.name.startswith("libcudnn_") for p in removed) and any(p.name.startswith("libcusolver") for p in removed)

    libraries = {p.name: p for d in [torch_dir / "lib", *site.glob("nvidia/*/lib")] for p in d.glob("*.so*")}
    todo = [*torch_dir.glob("_C*.so"), torch_dir / "lib" / "libtorch_global_deps.so"]
    loaded: set[Path] = set()
    while todo:
        lib = todo.pop()
        if lib.resolve() in loaded:
            continue
        loaded.add(lib.resolve())
        todo += [libraries[soname] for soname in _needed(lib) if soname in libraries]
    assert any(p.name == "libtorch_cpu.so" for p in loaded) and any(p.name.startswith("libcublas") for p in loaded)
    assert not loaded & removed, sorted(p.name for p in loaded & removed)
    kept_libs = [p for p in loaded if p.name.startswith("lib") and "nvidia" in p.parts]
    assert kept_libs, "the CUDA libraries torch links stay: the dynamic loader needs them"


def test_image_names_agree():
    """The chart, the operator's default and the Dockerfiles' build lines name the same images."""
    from kubellm.api.spec import DEFAULT_IMAGE

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    operator_image = f"{values['image']['repository']}:{chart['appVersion']}"
    runtime_image = f"{values['runtimeImage']['repository']}:{chart['appVersion']}"
    router_image = f"{values['routerImage']['repository']}:{chart['appVersion']}"
    assert DEFAULT_IMAGE == runtime_image
    for name, image in (("operator", operator_image), ("runtime", runtime_image), ("runtime-cpu", runtime_image + "-cpu"),
                        ("router", router_image)):
        assert f"-t {image} ." in DOCKERFILES[name].read_text(), (name, image)
    assert set(DOCKERFILES) == {path.name.removesuffix(".Dockerfile") for path in (ROOT / "docker").glob("*.Dockerfile")}
    cpu = yaml.safe_load((ROOT / "e2e" / "kind" / "smollm2-cpu.yaml").read_text())
    assert cpu["spec"]["image"] == runtime_image + "-cpu" and cpu["spec"]["device"] == "cpu"


def test_kind_script_uses_what_is_tested_elsewhere():
    """e2e/kind/run.sh cannot run here: its pieces must be the ones the other tests exercise."""
    script = (ROOT / "e2e" / "kind" / "run.sh").read_text()
    for path in re.findall(r"(?<![\w/])(?:docker|e2e/kind|charts)/[\w./-]+", script):
        assert (ROOT / path.rstrip(".")).exists(), path
    manifest = yaml.safe_load((ROOT / "e2e" / "kind" / "smollm2-cpu.yaml").read_text())
    spec = LLMDeploymentSpec.model_validate(manifest["spec"])
    assert spec.device == "cpu" and spec.replicas == 2 and spec.restApi.enabled and spec.model.source == "smollm2-135m"
    name = manifest["metadata"]["name"]
    assert f"svc/{name} {spec.router.port}:{spec.router.port} {spec.restApi.port}:{spec.restApi.port}" in script
    assert f"query.sh 127.0.0.1:{spec.router.port} http://127.0.0.1:{spec.restApi.port} {name} {spec.replicas}" in script
    assert "pod-security.kubernetes.io/enforce=restricted" in script
    if HELM:  # the values the script sets pass the schema
        helm("template", "kubellm", str(CHART), "--set", "runtimeImage.tag=0.1.0-cpu")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind.yaml").read_text())
    assert workflow["jobs"]["kind"]["steps"][-1]["run"] == "bash e2e/kind/run.sh"


def test_image_cache_hashes_the_build_context_dockerignore_leaves():
    """e2e/images.py keys the images by the files `COPY . /src` copies: .dockerignore applied as Docker does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kubellm_e2e_images_test", ROOT / "e2e" / "images.py")
    images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
    files = images.context_files()
    assert "pyproject.toml" in files and "runtime/hub/embedded.py" in files and "docker/runtime-cpu.Dockerfile" in files
    assert not [f for f in files if f.startswith(("tests/", "e2e/", ".git/", "charts/", "docs/"))
                or "__pycache__" in f or ".egg-info/" in f]
    rules = images.dockerignore_rules()
    assert images.is_ignored("runtime/executor/layers/__pycache__/x.pyc", rules)
    assert images.is_ignored("kubellm.egg-info/PKG-INFO", rules) and not images.is_ignored("kubellm/__init__.py", rules)
    negated = [(False, images._pattern_regex("docs")), (True, images._pattern_regex("docs/keep.md"))]
    assert images.is_ignored("docs/a.md", negated) and not images.is_ignored("docs/keep.md", negated)
    assert set(images.IMAGE_REFS) == {"operator", "runtime-cpu", "router", "pause"}
    assert images.ROUTER_REF == f"ghcr.io/kubellm/router:{images.APP_VERSION}"
    assert images.RUNTIME_CPU_REF.endswith("-cpu") and images.OPERATOR_REF.startswith("ghcr.io/kubellm/operator:")

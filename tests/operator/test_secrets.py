"""Secrets stay secret: the operator only ever names a Secret. Its value reaches a container through a
secretKeyRef or a secret volume, never through the command line (`ps`, `kubectl describe`) or a literal env
value, and only the container that needs it gets it: the HF token the download init container, the API keys
and the TLS pair the router. The operator itself cannot read a Secret: the chart grants it no access to them,
so no Secret value can reach its logs, Events or the status."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import resources as R

ROOT = Path(__file__).resolve().parents[2]
OWNER = R.Owner("llm", "team", "uid-1")
SECRETS = {"token": "hf-token", "keys": "llm-api-keys", "tls": "llm-router-tls", "ingress": "llm-ingress-tls"}
EVERY_SECRET = {
    "model": {"source": "hf://org/gated-model", "tokenSecret": SECRETS["token"], "cachePVC": "hf-cache"},
    "tensorParallel": 2, "gpusPerPod": 1, "replicas": 2,
    "restApi": {"enabled": True, "apiKeySecret": SECRETS["keys"],
                "ingress": {"host": "llm.example.com", "tlsSecretName": SECRETS["ingress"]}},
    "router": {"tlsSecretName": SECRETS["tls"]},
    "inferencePool": {"enabled": True},
    "limits": {"rateLimit": {"requestsPerSecond": 5}},
}
# What a key, a token or a certificate looks like, should one ever be written into a manifest.
KEY_MATERIAL = re.compile(r"-----BEGIN|\bhf_[A-Za-z0-9]{8,}|\bsk-[A-Za-z0-9]{8,}|Bearer\s", re.I)
SECRET_LOOKING_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.I)


def every_child() -> list[dict]:
    spec = LLMDeploymentSpec.model_validate(EVERY_SECRET)
    return [*R.children(OWNER, spec), R.inference_pool(OWNER, spec)]


def pod_specs(children) -> dict[str, dict]:
    return {c["metadata"]["name"]: c["spec"]["template"]["spec"] for c in children
            if c["kind"] in ("StatefulSet", "Deployment")}


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def where(value, needle: str, path: str = "") -> list[str]:
    """The paths in a manifest at which the string `needle` appears (whole or inside a string)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in where(v, needle, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in where(v, needle, f"{path}[{i}]")]
    return [path] if isinstance(value, str) and needle in value else []


def test_no_secret_value_or_key_material_in_args_or_env_values():
    for name, pod in pod_specs(every_child()).items():
        for c in containers(pod):
            for arg in c.get("command", []) + c.get("args", []):
                assert not KEY_MATERIAL.search(arg), (name, c["name"], arg)
                assert not any(secret in arg for secret in SECRETS.values()), (name, c["name"], arg)
            for env in c.get("env", []):
                assert "value" not in env or not KEY_MATERIAL.search(env["value"]), (name, c["name"], env)
                if SECRET_LOOKING_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, c["name"], env)
            assert "envFrom" not in c, "a whole Secret as env would show every key to every process"


def test_each_secret_reaches_only_the_container_that_needs_it():
    children = every_child()
    pods = pod_specs(children)
    reached: dict[str, set[str]] = {secret: set() for secret in SECRETS.values()}
    for name, pod in pods.items():
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for c in containers(pod):
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    reached[ref["name"]].add(f"{name}/{c['name']}:env {env['name']}")
            for mount in c.get("volumeMounts", []):
                if mount["name"] in volumes:
                    assert mount.get("readOnly") is True, (name, c["name"], mount)
                    reached[volumes[mount["name"]]].add(f"{name}/{c['name']}:{mount['mountPath']}")
    assert reached == {
        "hf-token": {"llm-g0/download-model:env HF_TOKEN", "llm-g1/download-model:env HF_TOKEN"},
        "llm-api-keys": {"llm-router/router:/etc/kubellm/api-keys"},
        "llm-router-tls": {"llm-router/router:/etc/kubellm/tls"},
        "llm-ingress-tls": set(),           # the Ingress controller's, named in the Ingress only
    }
    # Secret files readable by the pod's user and group (fsGroup) only.
    router_volumes = [v for v in pods["llm-router"]["volumes"] if "secret" in v]
    assert router_volumes and all(v["secret"]["defaultMode"] == 0o440 for v in router_volumes)


def test_secrets_are_named_only_where_kubernetes_resolves_them():
    """Every place a Secret's name appears in every child: a secretKeyRef, a secret volume, the Ingress's tls."""
    children = every_child()
    found = {secret: sorted(f"{c['kind']}/{c['metadata']['name']}{p}" for c in children for p in where(c, secret))
             for secret in SECRETS.values()}
    for secret, paths in found.items():
        assert paths, secret
        for path in paths:
            assert re.search(r"\.valueFrom\.secretKeyRef\.name$|\.volumes\[\d+\]\.secret\.secretName$"
                             r"|^Ingress/llm\.spec\.tls\[0\]\.secretName$", path), path


def test_the_worker_pods_hold_no_key_and_the_worker_no_token():
    pods = pod_specs(every_child())
    for name in ("llm-g0", "llm-g1"):
        [worker] = pods[name]["containers"]
        assert not [e for e in worker["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
        assert not [v for v in pods[name]["volumes"] if "secret" in v]
        assert pods[name]["automountServiceAccountToken"] is False
    assert pods["llm-router"]["automountServiceAccountToken"] is False


def test_the_operator_cannot_read_secrets():
    """No Secret value can reach the operator's logs, Events or the status: it has no right to read one."""
    rbac = (ROOT / "charts" / "kubellm" / "templates" / "rbac.yaml").read_text()
    resources = {r for line in rbac.splitlines() if (m := re.match(r"\s*resources: \[(.*)\]", line))
                 for r in m.group(1).replace(" ", "").split(",")}
    assert resources and "secrets" not in resources and "*" not in resources, resources
    for path in (ROOT / "operator").glob("*.py"):
        source = path.read_text()
        assert not re.search(r'"Secret"|read_namespaced_secret|list_namespaced_secret', source), path.name


def test_the_spec_holds_names_not_values():
    """Every secret field of the CRD is a Secret's name (a DNS label), so a key pasted there is refused."""
    crd = yaml.safe_load((ROOT / "crds" / "llmdeployments.kubellm.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for path in ("model.tokenSecret", "restApi.apiKeySecret", "router.tlsSecretName", "restApi.ingress.tlsSecretName"):
        node = spec
        for i, part in enumerate(path.split(".")):
            node = node[part] if i == 0 else node["properties"][part]
        assert node["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", path
    assert json.dumps(spec).count("Secret") >= 4

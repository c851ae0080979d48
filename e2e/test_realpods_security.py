"""The locked doors on the real-pod tier: the README's CPU example (SmolLM2, 2 replicas, REST on) with an API-key
Secret, a kubernetes.io/tls Secret (a self-signed certificate made here with `cryptography`) and NetworkPolicies
whose metrics peers are narrowed to one namespace, applied as a user would and reached through
`kubectl port-forward` as a user would.

In order: the router answers gRPC and REST only over TLS and only with a key (any key of the Secret, one per file
or several per line), the OpenAI client works with `api_key=`, health stays open; a rotated Secret takes effect in
the running router (the kubelet updates the volume, the router re-reads it: no pod restarts) and the removed key
stops working; no key appears in any pod's command, the router's argv, logs, Events or the status; the policies
exist, the API server holds them as built, and each selector selects exactly the pods meant, the operator's pod
among the metrics peers; and, said plainly, this tier's network plugin (the CNI bridge) enforces none of it.

Shares test_realpods.py's release (its module fixture, set up again for this module).
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_realpods import CPU_EXAMPLE, FIGURES, NS, SYSTEM, diagnose, get, port_forward, release  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]

NAME = "guarded"
KEYS_SECRET, TLS_SECRET = f"{NAME}-api-keys", f"{NAME}-tls"
# One key in one file, two in another (one per line): every one of them opens the door.
KEYS = {"team-a": "sk-kubellm-alpha-0123456789", "team-b": "sk-kubellm-beta-0123456789\nsk-kubellm-gamma-0123456789\n"}
ROTATED = {"team-b": "sk-kubellm-gamma-0123456789\n", "team-c": "sk-kubellm-delta-0123456789"}
ALL_KEYS = ["sk-kubellm-alpha-0123456789", "sk-kubellm-beta-0123456789", "sk-kubellm-gamma-0123456789",
            "sk-kubellm-delta-0123456789"]
METRICS_FROM = {"kubernetes.io/metadata.name": "monitoring"}
GRPC, REST = 50051, 28080


def secret_manifest(name: str, data: dict[str, str], type_: str = "Opaque") -> str:
    """Through stdin: a key never on a command line, not even the test's. `data`, not `stringData`: a
    `kubectl apply` that drops a stringData key leaves it in the stored data (the server merged it there)."""
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "type": type_, "metadata": {"name": name},
                           "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    from tls_certs import self_signed   # tests/tls_certs.py: for 127.0.0.1 and localhost, what port-forward gives

    return self_signed(tmp_path_factory.mktemp("tls"), NAME)


@pytest.fixture(scope="module")
def guarded(release, certificate):
    c = release
    cert, key = certificate
    c.kubectl("apply", "-n", NS, "-f", "-", input=secret_manifest(KEYS_SECRET, KEYS))
    c.kubectl("apply", "-n", NS, "-f", "-", input=secret_manifest(
        TLS_SECRET, {"tls.crt": cert.read_text(), "tls.key": key.read_text()}, "kubernetes.io/tls"))
    manifest = yaml.safe_load(CPU_EXAMPLE.read_text())
    manifest["metadata"]["name"] = NAME
    manifest["spec"]["restApi"]["apiKeySecret"] = KEYS_SECRET
    manifest["spec"]["router"] = {"tlsSecretName": TLS_SECRET}
    manifest["spec"]["networkPolicy"] = {"metricsFrom": METRICS_FROM}
    t0 = time.monotonic()
    c.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(manifest))

    def ready():
        status = get(c, "llmd", NAME).get("status") or {}
        routers = get(c, "pods", "-l", f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=router")["items"]
        return status.get("phase") == "Ready" and routers and all(
            s["ready"] for p in routers for s in p["status"].get("containerStatuses") or [{"ready": False}])
    try:
        c.wait_for(ready, f"{NAME} Ready with its router Ready (probed over HTTP on the metrics port)", timeout=600,
                   interval=1)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{diagnose(c)}") from None
    FIGURES["guarded_apply_to_ready_s"] = round(time.monotonic() - t0, 1)
    yield c
    c.kubectl("delete", "llmd", NAME, "-n", NS, "--wait", "--timeout=120s", check=False, timeout=180)
    c.kubectl("delete", "secret", KEYS_SECRET, TLS_SECRET, "-n", NS, "--ignore-not-found", check=False)


def router_pods(c) -> list[dict]:
    return get(c, "pods", "-l", f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=router")["items"]


def rest(url: str, ca: Path | None, key: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=120) as reply:
            text = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def grpc_outcome(address: str, ca: Path | None, key: str | None) -> str:
    """OK with the generated text's length, or the gRPC status code the router ended the call with."""
    from kubellm.runtime.serving.client import Client, ClientError

    try:
        with Client(address, timeout=60, api_key=key, tls=ca is not None, ca_file=str(ca) if ca else None) as client:
            [response] = client.generate("The capital of France is", max_new_tokens=3)
            return f"OK {response.generated_length}"
    except ClientError as err:
        return err.code


COMPLETION = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}


def test_only_a_key_over_tls_opens_the_router(guarded, certificate):
    c, (ca, _) = guarded, certificate
    with port_forward(c, f"svc/{NAME}", GRPC, REST) as ports:
        grpc_address, https = f"127.0.0.1:{ports[GRPC]}", f"https://127.0.0.1:{ports[REST]}"
        # gRPC: TLS and a key, each required.
        assert grpc_outcome(grpc_address, ca, "sk-kubellm-alpha-0123456789") == "OK 3"
        assert grpc_outcome(grpc_address, ca, "sk-kubellm-gamma-0123456789") == "OK 3"   # second line of a file
        assert grpc_outcome(grpc_address, ca, None) == "UNAUTHENTICATED"
        assert grpc_outcome(grpc_address, ca, "sk-not-a-key") == "UNAUTHENTICATED"
        assert grpc_outcome(grpc_address, None, "sk-kubellm-alpha-0123456789") == "UNAVAILABLE"   # plaintext to TLS

        # REST: HTTPS with the certificate, 401 in OpenAI's shape without a key, health open.
        status, body = rest(f"{https}/v1/completions", ca, "sk-kubellm-beta-0123456789", COMPLETION)
        assert status == 200 and body["usage"]["completion_tokens"] == 3, body
        status, body = rest(f"{https}/v1/completions", ca, None, COMPLETION)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        status, body = rest(f"{https}/v1/completions", ca, "sk-wrong", COMPLETION)
        assert status == 401, body
        assert rest(f"{https}/health", ca)[0] == 200
        with pytest.raises(Exception):   # plain HTTP to the HTTPS port: no answer at all
            rest(f"http://127.0.0.1:{ports[REST]}/health", None)

        # The official client, as a user would: api_key= and the CA.
        import openai

        def http_client():
            return openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca)), trust_env=False)

        client = openai.OpenAI(base_url=f"{https}/v1", api_key="sk-kubellm-alpha-0123456789", max_retries=0,
                               timeout=120, http_client=http_client())
        completion = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3)
        assert completion.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{https}/v1", api_key="sk-wrong", max_retries=0, http_client=http_client()).models.list()


def test_a_rotated_secret_takes_effect_without_a_restart(guarded, certificate):
    c, (ca, _) = guarded, certificate
    before = {p["metadata"]["uid"]: sum(s["restartCount"] for s in p["status"]["containerStatuses"])
              for p in router_pods(c)}
    t0 = time.monotonic()
    c.kubectl("apply", "-n", NS, "-f", "-", input=secret_manifest(KEYS_SECRET, ROTATED))
    stored = get(c, "secret", KEYS_SECRET)["data"]
    assert sorted(stored) == sorted(ROTATED), "the Secret itself still holds a removed key"
    with port_forward(c, f"svc/{NAME}", GRPC) as ports:
        address = f"127.0.0.1:{ports[GRPC]}"
        # The kubelet rewrites the volume within its sync period (about a minute); the router re-reads it.
        c.wait_for(lambda: grpc_outcome(address, ca, "sk-kubellm-delta-0123456789") == "OK 3", "the new key works",
                   timeout=240, interval=3)
        FIGURES["api_key_rotation_s"] = round(time.monotonic() - t0, 1)
        assert grpc_outcome(address, ca, "sk-kubellm-alpha-0123456789") == "UNAUTHENTICATED", "a removed key"
        assert grpc_outcome(address, ca, "sk-kubellm-beta-0123456789") == "UNAUTHENTICATED", "a removed line"
        assert grpc_outcome(address, ca, "sk-kubellm-gamma-0123456789") == "OK 3", "a kept key"
    after = {p["metadata"]["uid"]: sum(s["restartCount"] for s in p["status"]["containerStatuses"])
             for p in router_pods(c)}
    assert after == before, "the router pod was replaced or restarted"
    print(f"\nAPI key rotation took effect after {FIGURES['api_key_rotation_s']} s (same router pod)")


def test_no_key_in_commands_argv_logs_events_or_status(guarded):
    c = guarded
    pods = get(c, "pods", "-l", f"app.kubernetes.io/instance={NAME}")["items"]
    manifests = json.dumps(pods) + json.dumps(get(c, "llmd", NAME)) + json.dumps(get(c, "events"))
    [router] = router_pods(c)
    argv = c.kubectl("exec", "-n", NS, router["metadata"]["name"], "--", "python3", "-c",
                     "import os\nfor p in os.listdir('/proc'):\n  if p.isdigit():\n"
                     "    try: print(open(f'/proc/{p}/cmdline').read().replace(chr(0), ' '))\n"
                     "    except OSError: pass").stdout
    assert "--api-keys-dir /etc/kubellm/api-keys" in argv and "--tls-key /etc/kubellm/tls/tls.key" in argv, argv
    logs = "".join(c.kubectl("logs", "-n", namespace, *what, "--all-containers", "--tail=-1", check=False).stdout
                   for namespace, what in ((NS, ("-l", f"app.kubernetes.io/instance={NAME}")),
                                           (SYSTEM, ("deploy/kubellm",))))
    assert logs, "no logs read"
    for key in ALL_KEYS:
        for where, text in (("pods, status, events", manifests), ("router argv", argv), ("logs", logs)):
            assert key not in text, f"{key[:12]}... in {where}"
    assert "PRIVATE KEY" not in manifests + argv + logs
    # The keys and the TLS pair are mounted into the router only; the workers hold no Secret at all.
    for pod in pods:
        secrets = {v["secret"]["secretName"] for v in pod["spec"].get("volumes", []) if "secret" in v}
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        assert secrets == ({KEYS_SECRET, TLS_SECRET} if component == "router" else set()), (pod["metadata"]["name"], secrets)


def pod_names(c, namespace: str, match_labels: dict[str, str]) -> list[str]:
    selector = ",".join(f"{k}={v}" for k, v in match_labels.items())
    return sorted(p["metadata"]["name"] for p in get(c, "pods", "-l", selector, namespace=namespace)["items"]
                  if not p["metadata"].get("deletionTimestamp"))


def test_policies_select_the_right_pods_and_are_not_enforced_here(guarded):
    c = guarded
    policies = {p["metadata"]["name"]: p for p in get(c, "networkpolicies", "-l", f"app.kubernetes.io/instance={NAME}")[
        "items"]}
    assert sorted(policies) == [f"{NAME}-g0", f"{NAME}-g1", f"{NAME}-router", f"{NAME}-workers"]
    routers = [p["metadata"]["name"] for p in router_pods(c)]
    assert pod_names(c, NS, policies[f"{NAME}-g0"]["spec"]["podSelector"]["matchLabels"]) == [f"{NAME}-g0-0"]
    assert pod_names(c, NS, policies[f"{NAME}-g1"]["spec"]["podSelector"]["matchLabels"]) == [f"{NAME}-g1-0"]
    assert pod_names(c, NS, policies[f"{NAME}-workers"]["spec"]["podSelector"]["matchLabels"]) == [f"{NAME}-g0-0",
                                                                                                  f"{NAME}-g1-0"]
    assert pod_names(c, NS, policies[f"{NAME}-router"]["spec"]["podSelector"]["matchLabels"]) == sorted(routers)
    # The workers' gRPC peers: this deployment's routers and nothing else.
    [grpc_rule] = [r for r in policies[f"{NAME}-workers"]["spec"]["ingress"]
                   if {"port": GRPC, "protocol": "TCP"} in r.get("ports", [])]
    assert pod_names(c, NS, grpc_rule["from"][0]["podSelector"]["matchLabels"]) == sorted(routers)
    # The metrics peers: the namespace named, and the operator's own pod (the chart told it its labels).
    for name in (f"{NAME}-workers", f"{NAME}-router"):
        [metrics_rule] = [r for r in policies[name]["spec"]["ingress"] if r.get("ports") == [{"port": 9090, "protocol": "TCP"}]]
        named, operator = metrics_rule["from"]
        assert named == {"namespaceSelector": {"matchLabels": METRICS_FROM}}
        assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": SYSTEM}}
        operators = [p for p in get(c, "pods", "-l", "app.kubernetes.io/component=operator", namespace=SYSTEM)["items"]
                     if not p["metadata"].get("deletionTimestamp")]
        assert pod_names(c, SYSTEM, operator["podSelector"]["matchLabels"]) == [p["metadata"]["name"] for p in operators]

    # What is enforced: nothing, on this tier. The operator's pod is no peer of a worker's gRPC port, yet it
    # connects: the CNI bridge plugin does not implement NetworkPolicy (docs/network.md says so).
    leader = get(c, "pod", f"{NAME}-g0-0")
    [operator_pod] = pod_names(c, SYSTEM, {"app.kubernetes.io/component": "operator"})
    probe = c.kubectl("exec", "-n", SYSTEM, operator_pod, "--", "python3", "-c",
                      f"import socket; socket.create_connection(({leader['status']['podIP']!r}, {GRPC}), timeout=5); "
                      "print('connected')", check=False)
    enforced = "connected" not in probe.stdout
    FIGURES["network_policy_enforced"] = enforced
    assert not enforced, ("a worker's gRPC port refused a pod no policy admits: this tier's network plugin enforces "
                          "NetworkPolicy now; update docs/network.md and turn this into a test of enforcement")
    print(f"\nNetworkPolicies accepted and selecting the right pods; enforced on this tier: {enforced}")

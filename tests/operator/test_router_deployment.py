"""The router Deployment carries spec.router's policy flags, in the form `kubellm router` parses."""

import pytest

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.runtime.cli.main import build_parser

OWNER = R.Owner("llama", "team-a", "uid-123")


def router_command(**router) -> list[str]:
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "router": router})
    return R.router_deployment(OWNER, spec)["spec"]["template"]["spec"]["containers"][0]["command"]


@pytest.mark.parametrize("router, policy, prefix_length, load_factor", [
    ({}, "round_robin", 256, 1.25),                       # the spec's defaults
    ({"policy": "least_loaded"}, "least_loaded", 256, 1.25),
    ({"policy": "prefix_affinity", "prefixLength": 1024, "loadFactor": 2}, "prefix_affinity", 1024, 2.0),
])
def test_router_deployment_passes_the_policy(router, policy, prefix_length, load_factor):
    command = router_command(**router)
    assert command[:2] == ["kubellm", "router"]
    args = build_parser().parse_args(command[1:])   # what the router pod will actually run with
    assert (args.policy, args.prefix_length, args.load_factor) == (policy, prefix_length, load_factor)


def test_a_policy_change_rolls_the_router_not_the_workers():
    base = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}})
    changed = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"},
                                                "router": {"policy": "prefix_affinity"}})
    assert R.worker_spec_hash(base) == R.worker_spec_hash(changed)
    assert R.router_deployment(OWNER, base) != R.router_deployment(OWNER, changed)


@pytest.mark.parametrize("autoscaling, from_zero, hold", [
    (None, False, 30.0),                                              # the router's default hold
    ({"minReplicas": 1, "maxReplicas": 3}, False, 30.0),
    ({"minReplicas": 0, "maxReplicas": 3, "scaleFromZeroTimeoutSeconds": 120}, True, 120.0),
])
def test_scale_from_zero_keeps_the_router_ready_and_holding(autoscaling, from_zero, hold):
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "hf://org/name"},
                                             **({"autoscaling": autoscaling} if autoscaling else {})})
    args = build_parser().parse_args(R.router_deployment(OWNER, spec)["spec"]["template"]["spec"]["containers"][0][
        "command"][1:])
    assert (args.scale_from_zero, args.wait_for_replica, args.model_name) == (from_zero, hold, "org/name")


def test_autoscaling_changes_no_worker_pod():
    base = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}})
    scaled = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "autoscaling": {"maxReplicas": 5}})
    assert R.worker_spec_hash(base) == R.worker_spec_hash(scaled)


# -- API keys, TLS and limits: the flags the router parses, the files it reads them from ----------
def router_pod(body: dict) -> dict:
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, **body})
    return R.router_deployment(OWNER, spec)["spec"]["template"]["spec"]


def parsed(pod: dict):
    return build_parser().parse_args(pod["containers"][0]["command"][1:])


def test_an_api_key_secret_is_mounted_and_named_by_directory():
    pod = router_pod({"restApi": {"enabled": True, "apiKeySecret": "llm-keys"}})
    assert parsed(pod).api_keys_dir == "/etc/kubellm/api-keys"
    [volume] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    # Every key of the Secret, a file each (no `items`): a key added to the Secret is a key the router accepts.
    assert volume["secret"] == {"secretName": "llm-keys", "defaultMode": 0o440}
    [container] = pod["containers"]
    assert {"name": "api-keys", "mountPath": "/etc/kubellm/api-keys", "readOnly": True} in container["volumeMounts"]
    assert not any(m.get("subPath") for m in container["volumeMounts"]), "a subPath mount is never updated"


def test_a_rotated_key_needs_no_router_restart():
    """The kubelet updates a secret volume in place and the router re-reads it: nothing about the Secret (its
    name aside) is in the pod template, so a new key rolls no pod. A different Secret's name does."""
    base = {"restApi": {"enabled": True, "apiKeySecret": "llm-keys"}}
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, **base})
    template = R.router_deployment(OWNER, spec)["spec"]["template"]
    assert "annotations" not in template["metadata"]
    other = router_pod({"restApi": {"enabled": True, "apiKeySecret": "other-keys"}})
    assert other != template["spec"]
    # The workers never see the keys: the Secret's name does not roll them either.
    assert R.worker_spec_hash(spec) == R.worker_spec_hash(LLMDeploymentSpec.model_validate(
        {"model": {"source": "smollm2-135m"}, "restApi": {"enabled": True}}))


def test_a_tls_secret_is_mounted_and_the_probes_speak_plain_http_on_the_metrics_port():
    pod = router_pod({"restApi": {"enabled": True}, "router": {"tlsSecretName": "llm-tls"}})
    args = parsed(pod)
    assert (args.tls_cert, args.tls_key) == ("/etc/kubellm/tls/tls.crt", "/etc/kubellm/tls/tls.key")
    [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": "llm-tls", "defaultMode": 0o440}
    [container] = pod["containers"]
    metrics = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert metrics == args.metrics_port == 9090
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert "grpc" not in container["readinessProbe"] and "grpc" not in container["livenessProbe"]


def test_with_tls_the_service_and_status_say_https():
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "restApi": {"enabled": True},
                                             "router": {"tlsSecretName": "llm-tls"}})
    ports = {p["name"]: p["appProtocol"] for p in R.router_service(OWNER, spec)["spec"]["ports"]}
    assert ports == {"grpc": "grpc", "http": "https"}
    assert R.rest_endpoint(OWNER, spec) == "https://llama.team-a.svc.cluster.local:28080"
    plain = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "restApi": {"enabled": True}})
    assert R.rest_endpoint(OWNER, plain).startswith("http://")


def test_no_secret_no_flag_no_volume():
    pod = router_pod({"restApi": {"enabled": True}})
    args = parsed(pod)
    assert (args.api_keys_dir, args.tls_cert, args.tls_key) == (None, None, None)
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


@pytest.mark.parametrize("limits, request_bytes, streams, rate, burst", [
    ({}, 1_048_576, 100, None, None),                                       # the spec's defaults; no rate limit
    ({"maxRequestBytes": 4096, "maxConcurrentStreamsPerConnection": 8}, 4096, 8, None, None),
    ({"rateLimit": {"requestsPerSecond": 2.5}}, 1_048_576, 100, 2.5, 3),    # burst: one second's worth, rounded up
    ({"rateLimit": {"requestsPerSecond": 10, "burst": 40}}, 1_048_576, 100, 10.0, 40),
])
def test_the_router_gets_the_spec_limits(limits, request_bytes, streams, rate, burst):
    args = parsed(router_pod({"limits": limits}))
    assert (args.max_request_bytes, args.max_streams_per_connection) == (request_bytes, streams)
    assert (args.rate_limit, args.rate_limit_burst if rate else None) == (rate, burst)
    assert args.max_prompts_per_request == 256


def test_the_gateway_and_the_workers_refuse_the_same_prompt_count():
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "limits": {"maxPromptsPerRequest": 9}})
    router = R.router_deployment(OWNER, spec)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert build_parser().parse_args(router[1:]).max_prompts_per_request == 9
    assert spec.runtime_settings().engine["max_prompts_per_request"] == 9


def test_router_limits_roll_the_router_not_the_workers():
    base = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}})
    limited = LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, "limits": {
        "maxRequestBytes": 4096, "rateLimit": {"requestsPerSecond": 1}}})
    assert R.worker_spec_hash(base) == R.worker_spec_hash(limited)
    assert R.router_deployment(OWNER, base) != R.router_deployment(OWNER, limited)

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

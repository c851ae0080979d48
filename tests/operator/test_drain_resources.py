"""spec.drain in the pod specs: the worker and router containers' preStop sleep, the pods'
terminationGracePeriodSeconds (>= preStop + drain timeout), and --drain-timeout in the form the processes parse."""

import pytest
from pydantic import ValidationError

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.runtime.cli.main import build_parser

OWNER = R.Owner("llama", "team-a", "uid-123")


def spec(**fields) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}, **fields})


def pods(s: LLMDeploymentSpec) -> dict[str, dict]:
    """The worker (group 0) and router pod specs."""
    return {"worker": R.worker_statefulset(OWNER, s, 0)["spec"]["template"]["spec"],
            "router": R.router_deployment(OWNER, s)["spec"]["template"]["spec"]}


@pytest.mark.parametrize("drain, pre_stop, timeout", [
    ({}, 5, 30),                                         # the defaults
    ({"preStopSeconds": 15, "timeoutSeconds": 600}, 15, 600),   # long generations
    ({"timeoutSeconds": 0}, 5, 0),                       # no drain: cut at once
])
def test_pods_carry_the_prestop_sleep_and_a_grace_period_covering_it_and_the_drain(drain, pre_stop, timeout):
    for name, pod in pods(spec(drain=drain)).items():
        [container] = pod["containers"]
        assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": pre_stop}}}, name
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + timeout + 1, (name, grace)   # a margin for the exit itself
        assert grace <= pre_stop + timeout + 30, (name, grace)  # not so long that a hung pod lingers
        args = build_parser().parse_args(container["command"][1:])   # what the process will run with
        assert args.drain_timeout == timeout, name


def test_no_prestop_when_it_is_zero():
    for name, pod in pods(spec(drain={"preStopSeconds": 0, "timeoutSeconds": 10})).items():
        assert "lifecycle" not in pod["containers"][0], name   # no sleep of 0 s
        assert pod["terminationGracePeriodSeconds"] >= 10


def test_a_drain_change_rolls_workers_and_router():
    """It is in both pod templates: the workers' spec hash (the operator replaces the groups) and the router's."""
    base, changed = spec(), spec(drain={"timeoutSeconds": 120})
    assert R.worker_spec_hash(base) != R.worker_spec_hash(changed)
    assert R.router_deployment(OWNER, base)["spec"]["template"] != R.router_deployment(OWNER, changed)["spec"]["template"]


@pytest.mark.parametrize("drain, field", [
    ({"preStopSeconds": -1}, "preStopSeconds"),
    ({"timeoutSeconds": -5}, "timeoutSeconds"),
    ({"timeout": 30}, "timeout"),   # a misspelt field is refused, not ignored
])
def test_bad_drain_fields_are_refused_naming_the_field(drain, field):
    with pytest.raises(ValidationError) as err:
        spec(drain=drain)
    assert field in str(err.value)

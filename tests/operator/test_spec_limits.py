"""spec.limits' worker side reaches the engine on every path (the operator's ConfigMap and `kubellm worker`,
`kubellm serve -f`), through the one spec -> runtime translation (RUNTIME_NAMES); its router side is the
router's flags (test_router_deployment.py)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from kubellm.api.spec import RUNTIME_NAMES, WORKER_LIMITS, LimitsSpec, LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.runtime.cli.local import deployment_from_yaml
from kubellm.runtime.cli.main import build_parser
from kubellm.runtime.cli.worker import worker_configs
from kubellm.runtime.config import EngineConfig

LIMITS = {"maxPromptsPerRequest": 7, "maxLogprobs": 3}


def test_worker_limits_are_engine_config_fields_with_the_same_defaults():
    for name in WORKER_LIMITS:
        runtime = RUNTIME_NAMES[name]
        assert runtime in EngineConfig.model_fields, runtime
        assert LimitsSpec.model_fields[name].default == EngineConfig.model_fields[runtime].default, name


def test_the_operators_worker_runs_with_the_limits(tmp_path):
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "/opt/models/tiny"}, "limits": LIMITS})
    children = R.children(R.Owner("demo", "ns", "uid"), spec)
    [cm] = [c for c in children if c["kind"] == "ConfigMap"]
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    [worker] = next(c for c in children if c["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = [a.replace(R.CONFIG_MOUNT, str(tmp_path)) for a in worker["command"][1:]]
    engine, _ = worker_configs(build_parser().parse_args(args))
    assert (engine.max_prompts_per_request, engine.max_logprobs) == (7, 3)


def test_serve_file_gets_the_limits(tmp_path):
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "LLMDeployment", "metadata": {"name": "demo"},
                                        "spec": {"model": {"source": "/opt/models/tiny"}, "limits": LIMITS}}))
    _, _, options = deployment_from_yaml(str(manifest))
    assert (options["max_prompts_per_request"], options["max_logprobs"]) == (7, 3)


def test_router_limits_are_not_the_engines():
    settings = LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "limits": {
        "maxRequestBytes": 4096, "rateLimit": {"requestsPerSecond": 1}}}).runtime_settings()
    assert not {"max_request_bytes", "rate_limit", "max_concurrent_streams_per_connection"} & set(settings.engine)


@pytest.mark.parametrize("limits, field", [
    ({"maxRequestBytes": 10}, "maxRequestBytes"),
    ({"maxConcurrentStreamsPerConnection": 0}, "maxConcurrentStreamsPerConnection"),
    ({"rateLimit": {"requestsPerSecond": 0}}, "requestsPerSecond"),
    ({"rateLimit": {"burst": 5}}, "requestsPerSecond"),
    ({"rateLimit": {"requestsPerSecond": 1, "burst": 0}}, "burst"),
    ({"maxPromptsPerRequest": 0}, "maxPromptsPerRequest"),
    ({"maxLogprobs": -1}, "maxLogprobs"),
    ({"maxTokens": 5}, "maxTokens"),
])
def test_bad_limits_are_refused_naming_the_field(limits, field):
    with pytest.raises(ValidationError) as err:
        LLMDeploymentSpec.model_validate({"model": {"source": "/m"}, "limits": limits})
    assert field in str(err.value)

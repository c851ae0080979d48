"""One spec -> runtime translation: the operator's worker, `kubellm serve -f` and local deployments all get
every engine and generation setting of the spec, through `LLMDeploymentSpec.runtime_settings()`.

Each path ends where the worker reads its settings: the real `kubellm worker` parser and `worker_configs`.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

from kubellm.api.runtime_settings import RuntimeSettings
from kubellm.api.spec import RUNTIME_NAMES, EngineSpec, GenerationSpec, LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.runtime.cli.local import deployment_from_yaml
from kubellm.runtime.cli.main import build_parser, command
from kubellm.runtime.cli.worker import worker as cmd_worker, worker_configs
from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.local.deployments import serve, split_options

# Every field off its default, so a setting dropped on any path shows as the default arriving instead.
EVERY_FIELD = {
    "model": {"source": "/opt/models/tiny"}, "device": "cpu", "tensorParallel": 2, "pipelineParallel": 3,
    "engine": {"dtype": "bfloat16", "maxBatchSize": 7, "maxNumBatchedTokens": 999, "kvCacheFraction": 0.3,
               "blockSize": 8, "sessionLen": 321, "enablePrefixCaching": False, "modelImpl": "transformers",
               "eviction": "copy", "numCpuBlocks": 12, "ropeScalingFactor": 2.5, "useLognAttn": True,
               "maxLoraRank": 16, "quantization": "int8", "kvCacheDtype": "int8", "compile": True},
    "generation": {"maxNewTokens": 11, "temperature": 0.6, "topP": 0.8, "topK": 5, "repetitionPenalty": 1.2},
}


def test_every_spec_field_has_a_runtime_name_and_every_example_sets_it():
    for section, config in ((EngineSpec, EngineConfig), (GenerationSpec, GenerationConfig)):
        for name, info in section.model_fields.items():
            assert RUNTIME_NAMES[name] in config.model_fields, f"{name} -> {RUNTIME_NAMES[name]} is no {config.__name__} field"
        example = EVERY_FIELD["engine" if section is EngineSpec else "generation"]
        assert set(example) == set(section.model_fields), "EVERY_FIELD must set every field"
        assert all(example[n] != info.default for n, info in section.model_fields.items())


def worker_settings(args: list[str], files: dict[str, str], tmp_path) -> tuple[EngineConfig, dict]:
    """What `kubellm worker ARGS` runs with, its config files written where ARGS say they are."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    parsed = build_parser().parse_args(args)
    assert command(parsed) is cmd_worker
    return worker_configs(parsed)


def expected(spec: LLMDeploymentSpec) -> tuple[dict, dict]:
    engine = {RUNTIME_NAMES[k]: v for k, v in spec.engine.model_dump().items()}
    generation = {RUNTIME_NAMES[k]: v for k, v in spec.generation.model_dump().items()}
    return engine, generation


def check(engine: EngineConfig, defaults: dict, spec: LLMDeploymentSpec, path: str) -> None:
    want_engine, want_generation = expected(spec)
    for key, value in want_engine.items():
        assert getattr(engine, key) == value, f"{path}: {key}"
    assert (engine.tensor_parallel, engine.pipeline_parallel, engine.device) == (2, 3, "cpu"), path
    assert defaults == want_generation, path


def test_the_operators_worker_gets_every_setting(tmp_path):
    spec = LLMDeploymentSpec.model_validate(EVERY_FIELD)
    children = R.children(R.Owner("demo", "ns", "uid"), spec)
    [cm] = [c for c in children if c["kind"] == "ConfigMap"]
    sts = next(c for c in children if c["kind"] == "StatefulSet")
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "kubellm"
    args = [a.replace(R.CONFIG_MOUNT, str(tmp_path)) for a in command[1:]]
    check(*worker_settings(args, cm["data"], tmp_path), spec, "operator")


def test_serve_file_and_local_deployments_get_every_setting(tmp_path):
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment",
                                        "metadata": {"name": "demo"}, "spec": EVERY_FIELD}))
    name, model, options = deployment_from_yaml(str(manifest))
    assert (name, model) == ("demo", "/opt/models/tiny")
    # What serve(**options) hands its workers (local deployments write the same files and arguments).
    named = set(inspect.signature(serve).parameters) - {"tensor_parallel", "options"}  # serve()'s own parameters
    assert {"replica_num", "enable_restful_api", "restful_api_port"} <= set(options)
    settings = RuntimeSettings(*split_options({k: v for k, v in options.items() if k not in named}))
    args = settings.worker_args(model, str(tmp_path), host="127.0.0.1", port=1234, replica="demo-0",
                                allow_terminate=True)
    spec = LLMDeploymentSpec.model_validate(EVERY_FIELD)
    check(*worker_settings(args, settings.files(), tmp_path), spec, "serve -f")


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_command_shows_the_layout_and_a_cpu_device(device):
    engine = {**EVERY_FIELD["engine"], "compile": device == "cpu"}   # compile is a CPU option
    spec = LLMDeploymentSpec.model_validate({**EVERY_FIELD, "device": device, "engine": engine})
    args = spec.runtime_settings().worker_args("/m", "/etc/kubellm", port=1)
    assert args[args.index("--tensor-parallel") + 1] == "2" and args[args.index("--pipeline-parallel") + 1] == "3"
    assert ("--device" in args) == (device == "cpu")

"""The runtime side of a deployment: the engine options and generation defaults a worker runs with, as the
files and the command line `kubellm worker` reads.

An `LLMDeploymentSpec` becomes `RuntimeSettings` in one place (`LLMDeploymentSpec.runtime_settings`), and
`serve()`'s keyword options become them in `kubellm.runtime.local`. The operator's ConfigMap and worker
command, `kubellm serve -f` and local deployments all write them through here, so a setting reaches the
worker on every path or on none (the Kubernetes path once lost `spec.generation`).

Keys are the runtime's own field names (`EngineConfig` / `GenerationConfig`, snake_case); nothing here
imports the runtime, so the operator stays free of torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ENGINE_FILE, GENERATION_FILE = "engine.json", "generation.json"
# Engine options that are also `kubellm worker` flags: shown in the command (`kubectl describe`), so a
# pod's parallel layout (and a device other than auto) is visible without opening the ConfigMap.
_COMMAND_FLAGS = {"tensor_parallel": "--tensor-parallel", "pipeline_parallel": "--pipeline-parallel"}


@dataclass(frozen=True)
class RuntimeSettings:
    """EngineConfig fields and the GenerationConfig defaults of every request, by their runtime names."""

    engine: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)

    def files(self) -> dict[str, str]:
        """The worker's config files by name (the ConfigMap's data, or a local deployment's directory)."""
        return {ENGINE_FILE: json.dumps(self.engine, indent=2, sort_keys=True),
                GENERATION_FILE: json.dumps(self.generation, indent=2, sort_keys=True)}

    def worker_args(self, model: str, config_dir: str, *, port: int, host: str | None = None,
                    metrics_port: int | None = None, http_port: int | None = None,
                    served_model_name: str | None = None, replica: str | None = None,
                    allow_terminate: bool = False, drain_timeout: float | None = None,
                    adapters: dict[str, str] | None = None) -> list[str]:
        """`kubellm worker ...` arguments (after the program name) reading `files()` from `config_dir`.
        `adapters`: LoRA adapters by name -> where the worker finds them (a directory, or hf://org/name[@rev],
        which it downloads), as `--lora NAME=SOURCE` flags: visible in the command, like the model.
        `drain_timeout`: seconds the requests in flight get to finish after SIGTERM (spec.drain.timeoutSeconds).
        `http_port`: the worker's own OpenAI HTTP API and /metrics (an InferencePool's target port);
        `served_model_name`: the name requests' `model` field and the metrics' model_name label use."""
        args = ["worker", "--model", model, "--config", f"{config_dir}/{ENGINE_FILE}",
                "--generation-defaults", f"{config_dir}/{GENERATION_FILE}"]
        for key, flag in _COMMAND_FLAGS.items():
            if key in self.engine:
                args += [flag, str(self.engine[key])]
        if host is not None:
            args += ["--host", host]
        args += ["--port", str(port)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        if http_port is not None:
            args += ["--http-port", str(http_port)]
        if served_model_name is not None:
            args += ["--served-model-name", served_model_name]
        if replica is not None:
            args += ["--replica", replica]
        if allow_terminate:
            args.append("--allow-terminate")
        if drain_timeout is not None:
            args += ["--drain-timeout", f"{drain_timeout:g}"]
        if self.engine.get("device", "auto") != "auto":
            args += ["--device", str(self.engine["device"])]
        for name, source in (adapters or {}).items():
            args += ["--lora", f"{name}={source}"]
        return args

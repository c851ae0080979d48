"""DeepSpeed-MII's options, mapped onto kubellm's: `ModelConfig` / `MIIConfig` fields of `mii.serve()` and
`mii.pipeline()` (as `model_config={...}`, `mii_config={...}` or keywords), and the `GenerateParamsConfig`
fields of a generate call that are not GenerationConfig's (`return_full_text`, `prompt_length`, `stream`).

Each field is mapped (onto an EngineConfig field or a serve() argument), accepted with a warning saying why
it has no meaning here, or refused naming it and why: `MODEL_CONFIG`, `MII_CONFIG` and `GENERATE_PARAMS` say
which, and docs/seeds.md holds the same tables. Pure decisions (no torch, no processes): table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.runtime.config import ConfigError

MODEL_CONFIG = {
    "model_name_or_path": "mapped: the model",
    "tokenizer": "refused unless the model itself (the tokenizer is read from the model's directory)",
    "task": "mapped: 'text-generation' only",
    "tensor_parallel": "mapped: tensor_parallel",
    "quantization_mode": "refused: weight quantization (wf6af16) is not implemented",
    "inference_engine_config": "mapped: tensor_parallel.tp_size, state_manager.max_ragged_sequence_count "
                               "(max_batch_size), .max_ragged_batch_size (max_num_batched_tokens), .max_context "
                               "(session_len), .max_tracked_sequences (max_queue_size); the rest refused",
    "torch_dist_port": "accepted: a replica's ranks join on a free port chosen at start",
    "zmq_port_number": "accepted: rank 0 sends each step to the others itself (no ZMQ)",
    "replica_num": "mapped: serve(replica_num=)",
    "replica_configs": "refused: replicas are placed by kubellm (local) or Kubernetes",
    "device_map": "mapped: 'auto' only; explicit GPU maps refused",
    "max_length": "mapped: session_len",
    "all_rank_output": "refused: True (ranks other than 0 follow rank 0 inside pipeline() and hold no results)",
    "sync_debug": "accepted: no extra synchronization points exist to insert",
    "profile_model_time": "accepted: step times are always exported (/metrics: vllm:* histograms)",
}

MII_CONFIG = {
    "deployment_name": "mapped: serve(deployment_name=)",
    "deployment_type": "mapped: 'local' only (non-persistent: pipeline(); AML refused)",
    "model_config": "mapped: the ModelConfig fields above",
    "port_number": "mapped: the router's gRPC port",
    "enable_restful_api": "mapped: serve(enable_restful_api=)",
    "restful_api_host": "mapped: serve(host=), the address the router listens on",
    "restful_api_port": "mapped: serve(restful_api_port=)",
    "restful_processes": "accepted: the REST gateway is one asynchronous process in the router",
    "hostfile": "refused: a local deployment runs on this host (several hosts: an LLMDeployment on Kubernetes)",
    "version": "refused: AML deployments only",
    "instance_type": "refused: AML deployments only",
}

GENERATE_PARAMS = {
    "prompt_length": "refused: set from the prompt",
    "max_length": "mapped: GenerationConfig.max_length (prompt + generated tokens)",
    "max_new_tokens": "mapped: max_new_tokens",
    "min_new_tokens": "mapped: min_new_tokens",
    "stream": "refused: pass streaming_fn= (or use stream())",
    "ignore_eos": "mapped: ignore_eos",
    "return_full_text": "mapped: the prompt before the generated text (text prompts)",
    "do_sample": "mapped: False is greedy (temperature 0); True samples (temperature 1 unless set)",
    "top_p": "mapped: top_p",
    "top_k": "mapped: top_k",
    "temperature": "mapped: temperature",
    "stop": "mapped: stop_words",
}

_ENGINE_STATE = {"max_ragged_sequence_count": "max_batch_size", "max_ragged_batch_size": "max_num_batched_tokens",
                 "max_context": "session_len", "max_tracked_sequences": "max_queue_size"}


@dataclass
class MiiOptions:
    """What MII's ModelConfig / MIIConfig ask: EngineConfig fields, serve() arguments, and notes (accepted
    without effect: one warning each)."""

    engine: dict = field(default_factory=dict)
    serve: dict = field(default_factory=dict)
    model: str | None = None
    notes: list[str] = field(default_factory=list)


def _dict(value, what: str) -> dict:
    if value is None:
        return {}
    if hasattr(value, "model_dump"):   # an object of MII's own config classes
        value = value.model_dump(exclude_unset=True)
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a dict of its fields, got {type(value).__name__}")
    return value


def model_config_options(model_config, out: MiiOptions | None = None) -> MiiOptions:
    """MII's ModelConfig fields -> kubellm's; errors name `model_config.<field>`."""
    out = out or MiiOptions()
    for name, value in _dict(model_config, "model_config").items():
        where = f"model_config.{name}"
        if name == "model_name_or_path":
            out.model = value
        elif name == "tokenizer":
            model = out.model
            if value is not None and (model is None or str(value) != str(model)):
                raise ConfigError(f"{where}: {value!r}; kubellm reads the tokenizer from the model's own directory "
                                  "(tokenizer.json / tokenizer.model there): leave tokenizer unset")
        elif name == "task":
            if value not in (None, "text-generation"):
                raise ConfigError(f"{where}: {value!r}; kubellm serves text generation only: task='text-generation'")
        elif name == "tensor_parallel":
            out.engine["tensor_parallel"] = value
        elif name == "max_length":
            if value is not None:
                out.engine["session_len"] = value
        elif name == "replica_num":
            out.serve["replica_num"] = value
        elif name == "quantization_mode":
            if value is not None:
                raise ConfigError(f"{where}: {value!r}; weight quantization is not implemented: the weights run "
                                  "in the dtype option (auto, bfloat16, float16, float32)")
        elif name == "inference_engine_config":
            _inference_engine(_dict(value, where), where, out)
        elif name == "replica_configs":
            if value:
                raise ConfigError(f"{where}: replicas are placed by kubellm (local deployments: a free port "
                                  "each) or by Kubernetes; give replica_num instead")
        elif name == "device_map":
            if value not in (None, "auto"):
                raise ConfigError(f"{where}: {value!r}; explicit GPU maps are not supported: each local replica "
                                  "uses the device option (auto: cuda if there is one); on Kubernetes the "
                                  "scheduler places the pods. Use device_map='auto'")
        elif name == "all_rank_output":
            if value:
                raise ConfigError(f"{where}: under torchrun rank 0 runs the pipeline and the other ranks follow "
                                  "it inside pipeline(), holding no results; gather them from rank 0 yourself")
        elif name in ("torch_dist_port", "zmq_port_number", "sync_debug", "profile_model_time"):
            out.notes.append(f"{where}={value!r} has no effect in kubellm: {MODEL_CONFIG[name].split(': ', 1)[1]}")
        else:
            raise ConfigError(f"{where}: unknown ModelConfig field; MII's ModelConfig fields are: "
                              f"{', '.join(MODEL_CONFIG)}")
    return out


def _inference_engine(config: dict, where: str, out: MiiOptions) -> None:
    for section, values in config.items():
        values = _dict(values, f"{where}.{section}")
        for name, value in values.items():
            here = f"{where}.{section}.{name}"
            if section == "tensor_parallel" and name == "tp_size":
                out.engine["tensor_parallel"] = value
            elif section == "state_manager" and name in _ENGINE_STATE:
                out.engine[_ENGINE_STATE[name]] = value
            else:
                raise ConfigError(f"{here}: not mapped onto kubellm's engine; mapped are tensor_parallel.tp_size "
                                  "and state_manager." + ", state_manager.".join(_ENGINE_STATE) +
                                  " (the KV cache: kv_cache_fraction or num_kv_blocks)")


def mii_config_options(mii_config, out: MiiOptions | None = None) -> MiiOptions:
    """MII's MIIConfig fields -> serve() arguments (and its nested model_config); errors name `mii_config.<field>`."""
    out = out or MiiOptions()
    for name, value in _dict(mii_config, "mii_config").items():
        where = f"mii_config.{name}"
        if name in ("deployment_name", "enable_restful_api", "restful_api_port"):
            out.serve[name] = value
        elif name == "restful_api_host":
            out.serve["host"] = "127.0.0.1" if value == "localhost" else value
        elif name == "port_number":
            out.serve["port_number"] = value
        elif name == "model_config":
            model_config_options(value, out)
        elif name == "deployment_type":
            kind = str(getattr(value, "value", value)).lower()
            if kind not in ("local",):
                why = ("a non-persistent deployment is kubellm.pipeline()" if "non" in kind else
                       "AML is not supported; on Kubernetes, an LLMDeployment")
                raise ConfigError(f"{where}: {value!r}; serve() makes local deployments ('local'): {why}")
        elif name == "restful_processes":
            out.notes.append(f"{where}={value!r} has no effect in kubellm: {MII_CONFIG[name].split(': ', 1)[1]}")
        elif name == "hostfile":
            if value:
                raise ConfigError(f"{where}: {value!r}; a local deployment runs on this host; several hosts are an "
                                  "LLMDeployment on Kubernetes (or `kubellm worker` under torchrun)")
        elif name in ("version", "instance_type"):
            raise ConfigError(f"{where}: an AML deployment's field; serve() makes local deployments")
        else:
            raise ConfigError(f"{where}: unknown MIIConfig field; MII's MIIConfig fields are: {', '.join(MII_CONFIG)}")
    return out


def split_keywords(options: dict, own: set[str]) -> tuple[dict, dict, dict]:
    """MII routes serve()'s keywords to ModelConfig or MIIConfig by name: -> (model_config fields,
    mii_config fields, the rest). `own`: names the caller handles itself (they stay in the rest)."""
    model, mii, rest = {}, {}, {}
    for key, value in options.items():
        if key in own:
            rest[key] = value
        elif key in MODEL_CONFIG:
            model[key] = value
        elif key in MII_CONFIG:
            mii[key] = value
        else:
            rest[key] = value
    return model, mii, rest


def merge(target: dict, extra: dict, source: str) -> dict:
    """`extra` into `target`; an option given twice with different values is an error naming both places."""
    for key, value in extra.items():
        if key in target and target[key] != value:
            raise ConfigError(f"{key}: given as {target[key]!r} and as {value!r} (from {source}); give it once")
        target[key] = value
    return target


# -- a generate call's MII-only fields ----------------------------------------------------------------------
def generate_options(options: dict) -> tuple[dict, bool]:
    """A generate call's keywords -> (GenerationConfig options, return_full_text)."""
    options = dict(options)
    if "prompt_length" in options:
        raise ConfigError("prompt_length: set from the prompt (DeepSpeed-MII ignores a given one); remove it")
    if "stream" in options:
        raise ConfigError("stream: pass streaming_fn=callback to generate() (DeepSpeed-MII's way), or iterate "
                          "stream() for the deltas")
    full = options.pop("return_full_text", False)
    if not isinstance(full, bool):
        raise ConfigError(f"return_full_text: expected True or False, got {full!r}")
    return options, full


def full_text(prompt, text: str, index: int) -> str:
    """MII's return_full_text: the prompt, then the generated text (text prompts only)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"return_full_text: prompts[{index}] is not a text prompt (chat messages or token ids), "
                          "so there is no prompt text to prepend; pass text prompts or drop return_full_text")
    return prompt + text

"""The config ↔ proto mapping of the worker's gRPC API (kubellm.v1.LLM).

Requests in: prompts and the fields a request set → engine prompts and GenerationConfigs.
Replies out: the engine thread's events → GenerateResponse / GenerateStreamResponse; an engine's
settings → ModelInfoResponse; an exception → the gRPC status a caller sees.
"""

from __future__ import annotations

import grpc

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.config import ConfigError, EngineConfig, generation_config, prompt_count_problem
from kubellm.runtime.errors import EngineFullError, RequestError
from kubellm.runtime.serving.engine_loop import CallFailed, TokenEvent

_GEN_SCALARS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                "ignore_eos", "random_seed", "skip_special_tokens", "logprobs", "max_length")
_GEN_LISTS = ("stop_words", "bad_words")


# -- requests in ---------------------------------------------------------------------------------------
def prompt_from_proto(prompt: llm_pb2.Prompt, i: int):
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    raise RequestError(f"prompts[{i}]: empty prompt; set one of text, chat or token_ids")


def gen_options_from_proto(config: llm_pb2.GenerationConfig) -> dict:
    """The fields a request set (proto3 optional), as GenerationConfig options."""
    options = {name: getattr(config, name) for name in _GEN_SCALARS if config.HasField(name)}
    for name in _GEN_LISTS:
        values = list(getattr(config, name))
        if values:
            options[name] = values
    return options


def prompts_and_configs(request: llm_pb2.GenerateRequest, generation_defaults: dict,
                        limits: EngineConfig | None = None) -> tuple[list, list]:
    """A request's prompts and one GenerationConfig each (the deployment's defaults under the request's fields).
    `limits`: the engine's, for the prompt count (checked before any prompt is copied out of the request)."""
    if not request.prompts:
        raise RequestError("prompts: empty list; pass at least one prompt")
    if limits is not None and (problem := prompt_count_problem(len(request.prompts), limits)):
        raise RequestError(problem)
    prompts = [prompt_from_proto(p, i) for i, p in enumerate(request.prompts)]
    options = gen_options_from_proto(request.config) if request.HasField("config") else {}
    if request.adapter:
        options["adapter"] = request.adapter
    gen = generation_config(generation_defaults, options)
    if "max_new_tokens" in options:
        # The caller's ask, refused where it does not fit beside the prompt (vLLM's server refuses prompt +
        # max_tokens > max_model_len); the deployment's default, like vLLM's, is cut to what session_len leaves.
        gen = gen.with_max_new_tokens_required()
    return prompts, [gen] * len(prompts)


# -- replies out ---------------------------------------------------------------------------------------
def generate_response(replica: str, results: list[TokenEvent]) -> llm_pb2.GenerateResponse:
    """One reply for a whole batch, from each prompt's last event (in prompt order)."""
    return llm_pb2.GenerateResponse(replica=replica, responses=[
        llm_pb2.Response(text=r.full_text, prompt_length=r.prompt_length,
                         generated_length=r.generated_length, finish_reason=r.finish_reason,
                         index=r.index, token_ids=r.all_token_ids, logprobs=r.logprobs)
        for r in results])


def stream_response(replica: str, event: TokenEvent) -> llm_pb2.GenerateStreamResponse:
    return llm_pb2.GenerateStreamResponse(
        index=event.index, text=event.text, token_ids=event.token_ids,
        finish_reason=event.finish_reason, prompt_length=event.prompt_length,
        generated_length=event.generated_length, replica=replica)


def model_info_response(model_name: str, replica: str, engine) -> llm_pb2.ModelInfoResponse:
    cfg = engine.config
    archs = getattr(engine.hf_config, "architectures", None) or [getattr(engine.hf_config, "model_type", "")]
    return llm_pb2.ModelInfoResponse(
        model=str(model_name or engine.model_path), architecture=str(archs[0] or ""),
        tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel,
        max_batch_size=cfg.max_batch_size, session_len=engine.session_len,
        replica=replica, version=_version(), adapters=sorted(cfg.adapters))


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed call ends with."""
    if isinstance(exc, CallFailed):
        return exc.code, exc.message
    if isinstance(exc, EngineFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (RequestError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); the worker keeps serving"


def _version() -> str:
    from kubellm import __version__

    return __version__

"""The config ↔ proto mapping of the worker's gRPC API (kubellm.v1.LLM).

Requests in: prompts and the fields a request set → engine prompts and GenerationConfigs.
Replies out: the engine thread's events → GenerateResponse / GenerateStreamResponse; an engine's
settings → ModelInfoResponse; an exception → the gRPC status a caller sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field as _field

import grpc

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.config import (ConfigError, EngineConfig, GenerationConfig, best_choices, choice_configs,
                                    generation_config, prompt_count_problem)
from kubellm.runtime.errors import EngineFullError, RequestError
from kubellm.runtime.serving.engine_loop import CallFailed, TokenEvent

_GEN_SCALARS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                "ignore_eos", "random_seed", "skip_special_tokens", "logprobs", "max_length", "presence_penalty",
                "frequency_penalty", "prompt_logprobs", "n", "best_of", "guided_json", "guided_json_object",
                "guided_regex", "guided_grammar", "guided_whitespace_pattern")
_GEN_LISTS = ("stop_words", "bad_words", "guided_choice")


# -- requests in ---------------------------------------------------------------------------------------
def prompt_from_proto(prompt: llm_pb2.Prompt, i: int):
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        messages = [_message_from_proto(m, f"prompts[{i}].chat.messages[{j}]") for j, m in enumerate(prompt.chat.messages)]
        if not prompt.chat.tools_json:
            return messages
        tools = _json_field(prompt.chat.tools_json, f"prompts[{i}].chat.tools_json")
        if not isinstance(tools, list):
            raise RequestError(f"prompts[{i}].chat.tools_json: expected a JSON list of OpenAI tools, "
                               f"got {type(tools).__name__}")
        return {"messages": messages, "tools": tools}   # a conversation with tools (Tokenizer.encode_prompt)
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    raise RequestError(f"prompts[{i}]: empty prompt; set one of text, chat or token_ids")


def _message_from_proto(m: llm_pb2.ChatMessage, field: str) -> dict:
    """A chat message as OpenAI's dict: tool calls (an assistant's), tool_call_id and name (a tool's) when set."""
    message = {"role": m.role, "content": m.content}
    if m.tool_calls_json:
        calls = _json_field(m.tool_calls_json, f"{field}.tool_calls_json")
        if not isinstance(calls, list):
            raise RequestError(f"{field}.tool_calls_json: expected a JSON list of tool calls, got {type(calls).__name__}")
        message["tool_calls"] = calls
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.name:
        message["name"] = m.name
    return message


def _json_field(text: str, field: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise RequestError(f"{field}: not valid JSON ({err})") from None


def gen_options_from_proto(config: llm_pb2.GenerationConfig) -> dict:
    """The fields a request set (proto3 optional), as GenerationConfig options."""
    options = {name: getattr(config, name) for name in _GEN_SCALARS if config.HasField(name)}
    for name in _GEN_LISTS:
        values = list(getattr(config, name))
        if values:
            options[name] = values
    if config.logit_bias:
        options["logit_bias"] = dict(config.logit_bias)
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


@dataclass
class Choices:
    """A request's prompts expanded into its engine requests: n (or best_of) per prompt (config.choice_configs)."""

    prompts: list            # one per engine request, prompt-major
    gens: list               # their one-choice configs
    groups: list[tuple[int, GenerationConfig, list[int]]]   # per prompt: its index, its config, its engine requests
    indices: list[tuple[int, int]] = _field(default_factory=list)   # per engine request: (choice index, prompt index)

    @classmethod
    def of(cls, prompts: list, gens: list, stream: bool) -> "Choices":
        out = cls([], [], [], [])
        for i, (prompt, gen) in enumerate(zip(prompts, gens)):
            if stream and gen.best_of is not None and gen.best_of > gen.n:
                raise RequestError(f"best_of: {gen.best_of} choices of which the best {gen.n} are returned cannot "
                                   "be streamed (which are best is known only at the end); leave best_of unset "
                                   "or equal to n when streaming")
            one = choice_configs(gen)
            out.groups.append((i, gen, list(range(len(out.prompts), len(out.prompts) + len(one)))))
            first = out.indices[-1][0] + 1 if out.indices else 0   # i * n + j when every prompt has the same n
            out.indices += [(first + j, i) for j in range(len(one))]   # (best_of > n is not streamed)
            out.prompts += [prompt] * len(one)
            out.gens += one
        return out

    def stream_index(self, position: int) -> tuple[int, int]:
        """(choice index, prompt index) of engine request `position` when streaming (best_of is refused there)."""
        return self.indices[position]


# -- replies out ---------------------------------------------------------------------------------------
def generate_response(replica: str, results: list[TokenEvent], choices: Choices | None = None,
                      tokenizer=None) -> llm_pb2.GenerateResponse:
    """One reply for a whole batch, from each engine request's last event: per prompt its n choices (the best n
    of best_of by cumulative logprob), prompt-major, index = their position (prompt index * n + choice)."""
    if choices is None:
        return llm_pb2.GenerateResponse(replica=replica, responses=[
            _response(r, r.index, r.index, tokenizer) for r in results])
    responses = []
    for i, gen, positions in choices.groups:
        picked = best_choices(gen, [results[p].cumulative_logprob for p in positions])
        responses += [_response(results[positions[k]], len(responses) + j, i, tokenizer) for j, k in enumerate(picked)]
    return llm_pb2.GenerateResponse(replica=replica, responses=responses)


def _response(r: TokenEvent, index: int, prompt_index: int, tokenizer) -> llm_pb2.Response:
    seq = r.seq
    return llm_pb2.Response(
        text=r.full_text, prompt_length=r.prompt_length, generated_length=r.generated_length,
        finish_reason=r.finish_reason, index=index, prompt_index=prompt_index, token_ids=r.all_token_ids,
        logprobs=r.logprobs, cumulative_logprob=r.cumulative_logprob,
        token_logprobs=token_logprobs(seq, 0, r.generated_length, tokenizer),
        prompt_logprobs=prompt_logprobs(seq, tokenizer))


def token_logprobs(seq, start: int, end: int, tokenizer) -> list[llm_pb2.TokenLogprobs]:
    """Generated tokens start .. end - 1 of `seq` with their logprobs and top alternatives (config.logprobs)."""
    if seq is None or seq.gen.logprobs is None or tokenizer is None:
        return []
    generated = seq.token_ids[seq.num_prompt_tokens:]
    tops = seq.top_logprobs
    return [llm_pb2.TokenLogprobs(chosen=_token(tokenizer, generated[k], seq.logprobs[k]),
                                  top=[_token(tokenizer, t, lp) for t, lp in tops[k].items()] if k < len(tops) else [])
            for k in range(start, min(end, len(seq.logprobs)))]


def prompt_logprobs(seq, tokenizer) -> list[llm_pb2.TokenLogprobs]:
    """Prompt positions 1.. with their logprobs and top alternatives (config.prompt_logprobs)."""
    if seq is None or not getattr(seq, "prompt_logprobs", None) or tokenizer is None:
        return []
    ids = seq.token_ids
    return [llm_pb2.TokenLogprobs(chosen=_token(tokenizer, ids[p + 1], lp),
                                  top=[_token(tokenizer, t, v) for t, v in top.items()])
            for p, (lp, top) in enumerate(seq.prompt_logprobs)]


def _token(tokenizer, token_id: int, logprob: float) -> llm_pb2.TokenLogprob:
    return llm_pb2.TokenLogprob(token_id=token_id, token=tokenizer.token_text(token_id), logprob=logprob)


def stream_response(replica: str, event: TokenEvent, choices: Choices | None = None, position: int | None = None,
                    tokenizer=None) -> llm_pb2.GenerateStreamResponse:
    index = prompt_index = event.index
    if choices is not None:
        index, prompt_index = choices.stream_index(event.index if position is None else position)
    seq, end = event.seq, event.generated_length
    first = seq is not None and end == len(event.token_ids)   # the prompt's first message
    return llm_pb2.GenerateStreamResponse(
        index=index, prompt_index=prompt_index, text=event.text, token_ids=event.token_ids,
        finish_reason=event.finish_reason, prompt_length=event.prompt_length,
        generated_length=event.generated_length, replica=replica,
        token_logprobs=token_logprobs(seq, end - len(event.token_ids), end, tokenizer),
        prompt_logprobs=prompt_logprobs(seq, tokenizer) if first else [],
        cumulative_logprob=event.cumulative_logprob)


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

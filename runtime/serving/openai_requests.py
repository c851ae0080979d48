"""OpenAI's /v1/completions and /v1/chat/completions bodies -> the GenerateRequest the gateway sends upstream and
how it is to answer (pure, no torch). Every field either lands in the request or is refused naming it, with
the fix: a field neither API takes, or one this server does not serve (`suffix`, `functions`, ...), is 400,
never silently ignored (OpenAI's own API refuses unknown fields too).

    req = completion_request(body, session_len=2048, max_prompts=256)   # or chat_request(body, ...)
    req.generate (llm_pb2.GenerateRequest), req.n, req.echo, req.logprobs, req.tools, req.stream, ...

Structured outputs: `response_format` (OpenAI's `json_object` / `json_schema`), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and its newer `structured_outputs` object, and a tool_choice
that requires a call, all become the worker's one constraint (GenerationConfig.guided_*); two at once are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.config import guided_size
from kubellm.runtime.serving.openai_chat import conversation
from kubellm.runtime.serving.openai_tools import ToolPlan, tool_plan
from kubellm.runtime.serving.rest_fields import (
    BadRequest,
    check,
    check_prompt_count,
    field,
    words,
)

_NUM = (int, float)
MAX_N = 128            # choices per prompt (the worker's GenerationConfig.n bound)
MAX_LOGIT_BIAS = 1024  # tokens in one logit_bias
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound)
OPENAI_MAX_TOKENS_DEFAULT = 16   # /v1/completions' default max_tokens

# Sampling and stopping options both routes take: body key -> (GenerationConfig field, type, lo, hi).
SAMPLING = {
    "min_tokens": ("min_new_tokens", int, 0, None), "min_new_tokens": ("min_new_tokens", int, 0, None),
    "temperature": ("temperature", _NUM, 0, None), "top_p": ("top_p", _NUM, 0, 1),
    "top_k": ("top_k", int, 0, None), "repetition_penalty": ("repetition_penalty", _NUM, 0, None),
    "presence_penalty": ("presence_penalty", _NUM, -2, 2), "frequency_penalty": ("frequency_penalty", _NUM, -2, 2),
    "ignore_eos": ("ignore_eos", bool, None, None), "seed": ("random_seed", int, None, None),
    "random_seed": ("random_seed", int, None, None), "skip_special_tokens": ("skip_special_tokens", bool, None, None),
}
# vLLM's extra fields for structured outputs -> GenerationConfig's; and its newer structured_outputs' keys.
GUIDED = {"guided_json": "guided_json", "guided_regex": "guided_regex", "guided_choice": "guided_choice",
          "guided_grammar": "guided_grammar"}
STRUCTURED_OUTPUTS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                      "grammar": "guided_grammar", "json_object": "guided_json_object",
                      "whitespace_pattern": "guided_whitespace_pattern"}
COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "stop", "user",
                 "logit_bias", "response_format", "guided_whitespace_pattern", "guided_decoding_backend",
                 "structured_outputs", *SAMPLING, *GUIDED}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "tools",
                               "tool_choice", "parallel_tool_calls"}
# Fields of OpenAI's or vLLM's APIs that this server does not serve, and what to do instead.
NOT_SERVED = {
    "suffix": "insertion (suffix) is not served; put all the text in 'prompt'",
    "functions": "the deprecated 'functions' is not served; send them as 'tools'",
    "function_call": "the deprecated 'function_call' is not served; use 'tool_choice'",
    "audio": "audio output is not served", "modalities": "only text output is served; remove 'modalities'",
    "prediction": "predicted outputs are not served; remove 'prediction'",
    "web_search_options": "web search is not served; remove 'web_search_options'",
    "min_p": "min_p sampling is not served; use top_p or top_k",
    "use_beam_search": "beam search is not served; use best_of (completions) or n",
    "length_penalty": "length_penalty (beam search) is not served",
    "include_stop_str_in_output": "stop strings are always cut from the output",
    "truncate_prompt_tokens": "prompts are never truncated; shorten the prompt",
    "prompt_logprobs": "ask for the prompt's logprobs with echo and logprobs (completions)",
    "chat_template": "the model's own chat template is used; a per-request one is not served",
    "chat_template_kwargs": "the model's own chat template is used, without extra arguments",
    "add_generation_prompt": "the generation prompt is always added", "continue_final_message":
    "continuing the final message is not served", "documents": "documents (RAG) are not served",
    "store": "stored completions are not served; remove 'store'",
    "metadata": "stored completions' metadata is not served; remove 'metadata'",
    "reasoning_effort": "reasoning effort is not served; remove 'reasoning_effort'",
    "service_tier": "service tiers are not served; remove 'service_tier'",
    "priority": "request priorities are not served", "bad_words": "bad_words is DeepSpeed-MII's route's",
}


@dataclass
class OpenAIRequest:
    """A checked OpenAI request: what goes upstream, and how the reply is built."""
    generate: llm_pb2.GenerateRequest
    chat: bool
    n: int = 1
    echo: bool = False
    prompt_only: bool = False         # echo with max_tokens 0: the prompt (and its logprobs), no completion
    logprobs: int | None = None       # top alternatives per token (0: the chosen token's only); None: none
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False    # stream_options.continuous_usage_stats (vLLM's): usage on every chunk
    tools: ToolPlan | None = None
    parser: str = "auto"              # tool_choice auto: the format the reply's calls are parsed in
    prompt_texts: tuple = ()          # echo: each prompt's text, in prompt order
    user: str | None = None
    json_output: bool = False         # the reply is constrained JSON (for a parse check in tests)


def text_prompts(value, param: str, most: int) -> list[llm_pb2.Prompt]:
    """A completions prompt: a string, strings, token ids, or lists of token ids (at most `most` prompts)."""
    if isinstance(value, list) and value and not isinstance(value[0], int):   # a batch (not one prompt's ids)
        check_prompt_count(len(value), param, most)   # before any Prompt is built
    try:
        return _text_prompts(value, param)
    except (ValueError, TypeError, OverflowError) as err:
        if isinstance(err, BadRequest):
            raise
        raise BadRequest(f"'{param}': token ids must be 32-bit integers", param) from None


def _text_prompts(value, param: str) -> list[llm_pb2.Prompt]:
    if isinstance(value, str):
        return [llm_pb2.Prompt(text=value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [llm_pb2.Prompt(text=p) for p in value]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=value))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return [llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=p)) for p in value]
    raise BadRequest(f"'{param}' must be a string, a non-empty list of strings, or token ids", param)


def _refuse_unknown(body: dict, allowed: set, route: str) -> None:
    for key in body:
        if key in allowed:
            continue
        if key in NOT_SERVED:
            raise BadRequest(f"'{key}': {NOT_SERVED[key]}", key)
        raise BadRequest(f"'{key}' is not a field of {route} that this server takes; remove it (GET /openapi.json "
                         "lists every field served)", key)


def _put(cfg: llm_pb2.GenerationConfig, name: str, value, param: str) -> None:
    """cfg.<name> = value, whatever the field's kind (scalar, repeated, map; a JSON schema as its text)."""
    fd = cfg.DESCRIPTOR.fields_by_name[name]
    try:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            getattr(cfg, name).update(value)
        elif fd.is_repeated:
            getattr(cfg, name).extend(value)
        elif fd.type == fd.TYPE_STRING and not isinstance(value, str):
            setattr(cfg, name, json.dumps(value, ensure_ascii=False))
        else:
            setattr(cfg, name, value)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"'{param}' is out of range, got {value!r}", param) from None


def _max_tokens(body: dict, chat: bool, session_len: int, echo: bool) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    lo = 0 if echo else 1   # echo with max_tokens 0: the prompt only (how evaluation harnesses score text)
    value = field(body, key, int, lo=lo)
    if value is None:
        return None
    if value >= 2**31:
        raise BadRequest(f"'{key}' is out of range, got {value!r}", key)
    if session_len and value >= session_len:
        raise BadRequest(f"'{key}' is {value}, but the model's session_len is {session_len} tokens (prompt + {key}); "
                         f"ask for at most {session_len - 1} (fewer, by the prompt's length), or leave it unset", key)
    return value


def _logit_bias(body: dict) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must be an object mapping token ids (as strings) to a bias in [-100, 100]",
                         "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' has {len(bias)} tokens, more than {MAX_LOGIT_BIAS}", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequest(f"'logit_bias': key {key[:40]!r} is not a token id; keys are token ids such as "
                             "\"50256\"", "logit_bias") from None
        if not 0 <= token < 2**31:
            raise BadRequest(f"'logit_bias': token id {token} is out of range", "logit_bias")
        check(value, f"logit_bias.{key}", _NUM, lo=-100, hi=100)
        out[token] = float(value)
    return out


def _constraints(body: dict, tools: ToolPlan | None) -> list[tuple[str, str, object]]:
    """Every structured-output constraint the request asks for: (the field asking, GenerationConfig field, value)."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise BadRequest("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                             "response_format")
        kind = fmt["type"]
        if kind == "json_object":
            found.append(("response_format", "guided_json_object", True))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise BadRequest("'response_format.json_schema' must be an object {\"name\", \"schema\", \"strict\"}",
                                 "response_format.json_schema")
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("'response_format.json_schema.schema' must be a JSON schema (an object)",
                                 "response_format.json_schema.schema")
            if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
                raise BadRequest("'response_format.json_schema.strict' must be a boolean",
                                 "response_format.json_schema.strict")
            found.append(("response_format", "guided_json", schema))   # always strict: a token mask enforces it
        elif kind != "text":
            raise BadRequest(f"'response_format.type' must be \"text\", \"json_object\" or \"json_schema\", got "
                             f"{kind!r}", "response_format.type")
    for key, name in GUIDED.items():
        value = body.get(key)
        if value is not None:
            found.append((key, name, _guided_value(key, name, value)))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise BadRequest("'structured_outputs' must be an object such as {\"json\": {...}} or {\"regex\": \"...\"}",
                             "structured_outputs")
        for key, value in so.items():
            if key not in STRUCTURED_OUTPUTS:
                raise BadRequest(f"'structured_outputs.{key}' is not served; it takes "
                                 f"{', '.join(STRUCTURED_OUTPUTS)}", f"structured_outputs.{key}")
            if value is None or key == "whitespace_pattern" or (key == "json_object" and value is False):
                continue
            found.append((f"structured_outputs.{key}", STRUCTURED_OUTPUTS[key],
                          _guided_value(f"structured_outputs.{key}", STRUCTURED_OUTPUTS[key], value)))
    if tools is not None and tools.guided_json is not None:
        found.append(("tool_choice", "guided_json", tools.guided_json))
    for param, name, value in found:
        _check_size(param, name, value)
    if len(found) > 1:
        raise BadRequest(f"'{found[1][0]}' is set together with '{found[0][0]}'; ask for one structured output "
                         "(response_format, guided_json, guided_regex, guided_choice, guided_grammar, "
                         "structured_outputs, or a tool_choice that requires a call)", found[1][0])
    return found


def _check_size(param: str, name: str, value) -> None:
    """Refused here already (the workers refuse it too: config.generation_problem), before a call is made."""
    if (size := guided_size(name, value)) is None:
        return
    size, most, what = size
    if size > most:
        raise BadRequest(f"'{param}': a {what} of {size} characters, more than {most} (one this large takes the "
                         "workers seconds to compile); send a smaller one", param)


def _guided_value(param: str, name: str, value):
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise BadRequest(f"'{param}' must be a JSON schema (an object, or its JSON text)", param) from None
        if not isinstance(value, dict):
            raise BadRequest(f"'{param}' must be a JSON schema (an object, or its JSON text)", param)
        return value
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise BadRequest(f"'{param}' must be a non-empty list of non-empty strings", param)
        return value
    if name == "guided_json_object":
        return check(value, param, bool)
    return check(value, param, str)


def _config(body: dict, *, chat: bool, session_len: int, echo: bool) -> tuple[llm_pb2.GenerationConfig, int | None]:
    cfg = llm_pb2.GenerationConfig()
    max_new = _max_tokens(body, chat, session_len, echo)
    if max_new is not None:
        cfg.max_new_tokens = max(max_new, 1)   # 0 (echo): one token, dropped from the reply
    elif not chat:
        cfg.max_new_tokens = OPENAI_MAX_TOKENS_DEFAULT
    for key, (name, typ, lo, hi) in SAMPLING.items():
        value = field(body, key, typ, lo=lo, hi=hi)
        if value is not None:
            _put(cfg, name, value, key)
    cfg.stop_words.extend(words(body, "stop"))
    bias = _logit_bias(body)
    if bias:
        _put(cfg, "logit_bias", bias, "logit_bias")
    return cfg, max_new


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    opts = body.get("stream_options")
    if opts is None or not stream:   # meaningless without stream (the openai client never sends it so)
        return False, False
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object {\"include_usage\": true}", "stream_options")
    for key in opts:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise BadRequest(f"'stream_options.{key}' is not served; it takes include_usage and "
                             "continuous_usage_stats", f"stream_options.{key}")
    include = field(opts, "include_usage", bool, name="stream_options.include_usage")
    continuous = field(opts, "continuous_usage_stats", bool, name="stream_options.continuous_usage_stats")
    return bool(include), bool(continuous)


def _common(body: dict, req: OpenAIRequest, cfg: llm_pb2.GenerationConfig, tools: ToolPlan | None) -> None:
    n = field(body, "n", int, lo=1, hi=MAX_N)
    req.n = n or 1
    if n is not None and n > 1:
        _put(cfg, "n", n, "n")
    req.stream = bool(field(body, "stream", bool))
    req.include_usage, req.continuous_usage = _stream_options(body, req.stream)
    req.user = field(body, "user", str)
    field(body, "guided_decoding_backend", str)   # vLLM's choice of library: the workers have theirs
    pattern = field(body, "guided_whitespace_pattern", str)
    so = body.get("structured_outputs")
    if isinstance(so, dict) and so.get("whitespace_pattern") is not None:
        pattern = check(so["whitespace_pattern"], "structured_outputs.whitespace_pattern", str)
    constraints = _constraints(body, tools)
    for param, name, value in constraints:
        _put(cfg, name, value, param)
    if pattern is not None:
        if not any(name in ("guided_json", "guided_json_object") for _, name, _ in constraints):
            raise BadRequest("'guided_whitespace_pattern' applies to JSON output only; give it with guided_json "
                             "or a JSON response_format", "guided_whitespace_pattern")
        _put(cfg, "guided_whitespace_pattern", pattern, "guided_whitespace_pattern")
    req.json_output = any(name in ("guided_json", "guided_json_object") for _, name, _ in constraints)


def completion_request(body: dict, *, session_len: int = 0, max_prompts: int = 256) -> OpenAIRequest:
    """/v1/completions' body -> an OpenAIRequest (BadRequest naming the field otherwise)."""
    _refuse_unknown(body, COMPLETION_FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise BadRequest("'prompt' is required", "prompt")
    echo = bool(field(body, "echo", bool))
    prompts = text_prompts(body["prompt"], "prompt", max_prompts)
    cfg, max_new = _config(body, chat=False, session_len=session_len, echo=echo)
    req = OpenAIRequest(llm_pb2.GenerateRequest(prompts=prompts, config=cfg), chat=False, echo=echo,
                        prompt_only=echo and max_new == 0)
    cfg = req.generate.config   # the request's own (a message given to a constructor is copied)
    _common(body, req, cfg, None)
    best_of = field(body, "best_of", int, lo=1, hi=MAX_N)
    if best_of is not None:
        if best_of < req.n:
            raise BadRequest(f"'best_of' ({best_of}) must be at least n ({req.n})", "best_of")
        if req.stream and best_of > req.n:
            raise BadRequest("'best_of' above n cannot stream (the best choices are known only at the end); "
                             "drop stream or best_of", "best_of")
        if best_of > 1:
            _put(cfg, "best_of", best_of, "best_of")
    samples = best_of or req.n
    if samples > 1 and len(prompts) * samples > max_prompts:   # each choice is a sequence of its own
        name = "best_of" if best_of and best_of > req.n else "n"
        raise BadRequest(f"'{name}': {len(prompts)} prompts x {samples} choices = {len(prompts) * samples} sequences "
                         f"in one request, more than max_prompts_per_request ({max_prompts}); ask for fewer or "
                         "split the prompts over several requests", name)
    req.logprobs = field(body, "logprobs", int, lo=0, hi=2**31 - 1)
    if req.logprobs is not None:
        cfg.logprobs = req.logprobs
        if echo:
            _put(cfg, "prompt_logprobs", req.logprobs, "echo")
    if echo:
        if any(p.WhichOneof("kind") != "text" for p in prompts):
            raise BadRequest("'echo' with a prompt of token ids is not served (the gateway has no tokenizer to "
                             "write them back); send the prompt as text", "echo")
        req.prompt_texts = tuple(p.text for p in prompts)
    return req


def chat_request(body: dict, *, session_len: int = 0) -> OpenAIRequest:
    """/v1/chat/completions' body -> an OpenAIRequest (BadRequest naming the field otherwise)."""
    _refuse_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
    tools = tool_plan(body)
    prompt = conversation(body.get("messages"), tools)
    cfg, _ = _config(body, chat=True, session_len=session_len, echo=False)
    req = OpenAIRequest(llm_pb2.GenerateRequest(prompts=[prompt], config=cfg), chat=True, tools=tools)
    cfg = req.generate.config   # the request's own (a message given to a constructor is copied)
    _common(body, req, cfg, tools)
    wants = field(body, "logprobs", bool)
    top = field(body, "top_logprobs", int, lo=0, hi=MAX_TOP_LOGPROBS)
    if top is not None and not wants:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if wants:
        req.logprobs = top or 0
        cfg.logprobs = req.logprobs
    return req

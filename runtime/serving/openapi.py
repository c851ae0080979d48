"""The REST gateway's OpenAPI 3.1 document (`GET /openapi.json`), written by hand (no torch).

The request schemas say what serving/gateway.py accepts, field by field, with the bounds that hold end to
end (the gateway's own, and the workers' where those are tighter: `top_p` above 0, `seed` 0 or more). On the
OpenAI routes a field not listed is refused naming it (`additionalProperties: false`, as OpenAI's API does);
DeepSpeed-MII's route ignores the others, as MII does. A field's `examples` are values valid whatever else
the body holds (what `kubellm bench fuzz` draws for a valid body); the combinations refused (two structured
outputs, top_logprobs without logprobs, echo of token ids, best_of below n or with stream) are in the fields'
descriptions. tests/runtime/serving/test_openapi.py checks the document against the gateway: every documented
field is accepted and reaches the request, an undocumented one is refused naming it.
"""

from __future__ import annotations

import copy

from kubellm.runtime.serving.limits import DEFAULT_MAX_PROMPTS_PER_REQUEST

_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STOP = {"oneOf": [{"type": "string", "minLength": 1},
                   {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 256}],
         "description": "generation stops at any of these (at most 256 words of 256 characters: the workers' "
                        "max_stop_words, max_word_chars); the text is cut before it"}

# Sampling and stopping options both APIs take (the gateway's _config), by their names on the wire.
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "description": "0 is greedy"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0, "description": "0 keeps every token; past the vocabulary, clamped"},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "description": "1 is none"},
    "ignore_eos": _BOOL,
    "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
    "random_seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1, "description": "LMDeploy's name for seed"},
    "skip_special_tokens": _BOOL,
    "min_new_tokens": {"type": "integer", "minimum": 0},
    "stop": _STOP,
}
_MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": 2 ** 31 - 1,
               "description": "most tokens to generate; prompt + max_tokens must fit in the model's session_len "
                              "(else 400 naming it)"}
_NULL = {"type": "null"}
_JSON_SCHEMA = {"type": "object", "description": "a JSON schema (2020-12)",
                "examples": [{"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}},
                              "required": ["answer"]}]}
_ONE_CONSTRAINT = ("; one structured output per request (response_format, guided_json, guided_regex, "
                   "guided_choice, guided_grammar, structured_outputs, or a tool_choice that requires a call): "
                   "two are refused")
_STRUCTURED = {
    "response_format": {
        "oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
            {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {"type": "object", "required": ["schema"], "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"}, "schema": _JSON_SCHEMA,
                    "strict": {"type": "boolean", "description": "always enforced (a token mask)"}}}}}],
        "examples": [{"type": "text"}, {"type": "json_object"},
                     {"type": "json_schema", "json_schema": {"name": "answer", "schema": _JSON_SCHEMA["examples"][0],
                                                             "strict": True}}],
        "description": "json_object: the output is a JSON object; json_schema: it matches the schema (both "
                       "enforced by the workers' token masks)" + _ONE_CONSTRAINT},
    "guided_json": {"oneOf": [_JSON_SCHEMA, {"type": "string", "maxLength": 65536,
                                             "description": "the schema's JSON text"}, _NULL],
                    "examples": [None], "description": "vLLM's: the output matches this JSON schema (at most 65 536 "
                                                       "characters as JSON text)" + _ONE_CONSTRAINT},
    "guided_regex": {"type": ["string", "null"], "maxLength": 32768, "examples": [None],
                     "description": "vLLM's: the whole output matches this regular expression" + _ONE_CONSTRAINT},
    "guided_choice": {"oneOf": [{"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                _NULL], "examples": [None],
                      "description": "vLLM's: the output is exactly one of these (32 768 characters together at "
                                     "most)" + _ONE_CONSTRAINT},
    "guided_grammar": {"type": ["string", "null"], "maxLength": 32768, "examples": [None],
                       "description": "vLLM's: an EBNF (GBNF) grammar the output follows, start rule root"
                                      + _ONE_CONSTRAINT},
    "guided_whitespace_pattern": {"type": ["string", "null"], "examples": [None],
                                  "description": "JSON output only: a regex of the whitespace allowed between tokens"},
    "guided_decoding_backend": {"type": ["string", "null"], "examples": [None],
                                "description": "vLLM's choice of library: accepted, the workers use their own"},
    "structured_outputs": {
        "type": ["object", "null"], "examples": [None],
        "properties": {"json": {"oneOf": [_JSON_SCHEMA, {"type": "string"}]}, "regex": {"type": "string"},
                       "choice": {"type": "array", "items": {"type": "string"}}, "grammar": {"type": "string"},
                       "json_object": {"type": "boolean"}, "whitespace_pattern": {"type": "string"}},
        "additionalProperties": False,
        "description": "vLLM's newer form of the guided_* fields, one of them" + _ONE_CONSTRAINT},
}
_OPENAI = {
    "model": {"type": "string", "description": "a router accepts any name and echoes it; a worker's port only "
                                               "the model it serves (else 404 model_not_found); a LoRA adapter's "
                                               "name (GET /v1/models) generates with that adapter"},
    "max_tokens": {**_MAX_TOKENS, "description": _MAX_TOKENS["description"] + "; /v1/completions' default 16"},
    "max_completion_tokens": {**_MAX_TOKENS, "description": "max_tokens' newer name (it wins over max_tokens)"},
    "min_tokens": {"type": "integer", "minimum": 0, "description": "vLLM's name for min_new_tokens"},
    **_SAMPLING,
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2,
                         "description": "subtracted from the logit of every token already generated"},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2,
                          "description": "subtracted from a token's logit once per time it was generated"},
    "logit_bias": {"type": "object", "maxProperties": 1024, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "examples": [{}, {"1": -100}, {"2": 5.5}],
                   "description": "token id (as a string) -> a bias added to its logit; -100 bans the token"},
    "n": {"type": "integer", "minimum": 1, "maximum": 128, "examples": [1, 2, 3],
          "description": "choices per prompt, each with its own seed (seed, seed+1, ... where seed is set); "
                         "choice index = prompt index * n + j"},
    "user": {"type": "string", "description": "the end user's id: logged with the request id, nothing else"},
    "stream": {"type": "boolean", "description": "server-sent events, then `data: [DONE]`"},
    "stream_options": {"type": "object", "additionalProperties": False, "properties": {
        "include_usage": {"type": "boolean", "description": "a last chunk with no choices and the whole usage"},
        "continuous_usage_stats": {"type": "boolean", "description": "vLLM's: the usage so far on every chunk"}},
        "description": "with stream only (ignored without)"},
    **_STRUCTURED,
}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1}}
_BATCH = {"maxItems": DEFAULT_MAX_PROMPTS_PER_REQUEST}

_COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        "prompt": {"oneOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, **_BATCH, "items": {"type": "string"}},
                             _TOKEN_IDS,
                             {"type": "array", "minItems": 1, **_BATCH, "items": _TOKEN_IDS}],
                   "description": "a string, a batch of strings, token ids, or a batch of token-id lists (at most "
                                  "max_prompts_per_request, 256 by default)"},
        **_OPENAI,
        "max_tokens": {**_MAX_TOKENS, "description": _MAX_TOKENS["description"] + "; default 16; 0 is taken "
                       "with echo: the prompt only (with logprobs, its tokens' logprobs: how harnesses score text)"},
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": 128, "examples": [None],
                    "description": "sample this many per prompt and return the n of highest cumulative logprob; "
                                   "at least n, and not with stream"},
        "echo": {"type": "boolean", "examples": [False],
                 "description": "the prompt before the completion (with logprobs: the prompt tokens' too, the "
                                "first one's null); text prompts only"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                     "description": "each token's logprob and this many top alternatives (tokens, token_logprobs, "
                                    "top_logprobs, text_offset); at most the workers' max_logprobs"},
    },
}
_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string", "description": "a JSON object's text",
                                                 "examples": ['{"city": "Paris"}', "{}"]}}}}}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "description": "system, developer, user, assistant, tool, ...: what the model's "
                                                  "chat template takes"},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                              {"type": "array", "items": {
                                  "type": "object", "required": ["type", "text"],
                                  "properties": {"type": {"type": "string", "enum": ["text"]},
                                                 "text": {"type": "string"}}}}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL, "description": "an assistant's earlier calls"},
        "tool_call_id": {"type": "string", "description": "a tool message: the call it answers"},
    },
    "additionalProperties": False,
}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object", "description": "a JSON schema of the arguments"},
        "strict": {"type": "boolean", "description": "calls are always parsed; required / named calls are "
                                                     "constrained to the schema"}}}}}
_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 12}},
                                                 "required": ["city"]}}}
_CHAT_REQUEST = {
    "type": "object", "required": ["messages"], "additionalProperties": False,
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE}, **_OPENAI,
        "logprobs": {"type": "boolean", "description": "each generated token's logprob (choices[].logprobs.content)"},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20, "examples": [None],
                         "description": "this many top alternatives per token; needs logprobs: true"},
        "tools": {"type": "array", "maxItems": 128, "items": _TOOL, "examples": [[_WEATHER]],
                  "description": "functions the model may call, rendered by its chat template; its calls come "
                                 "back as message.tool_calls (finish_reason tool_calls)"},
        "tool_choice": {
            "oneOf": [{"enum": ["none", "auto", "required"]},
                      {"type": "object", "required": ["type", "function"], "properties": {
                          "type": {"const": "function"},
                          "function": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}}}}}],
            "examples": ["auto", "none"],
            "description": "auto (the default with tools): calls parsed from the reply (the model's format, "
                           "--tool-call-parser); none: tools not rendered; required / a named function: the reply "
                           "is constrained to a valid call (always parses), needs tools" + _ONE_CONSTRAINT},
        "parallel_tool_calls": {"type": "boolean", "description": "false: at most one call"},
    },
}
_MII_REQUEST = {
    "type": "object", "additionalProperties": True,
    "description": "give `prompts` or `prompt`",
    "anyOf": [{"required": ["prompts"]}, {"required": ["prompt"]}],
    "properties": {
        "prompts": {"oneOf": [{"type": "string"},
                              {"type": "array", "minItems": 1, **_BATCH, "items": {"type": "string"}}]},
        "prompt": {"oneOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, **_BATCH, "items": {"type": "string"}}]},
        "max_new_tokens": _MAX_TOKENS,
        "max_length": {"type": "integer", "minimum": 2, "examples": [64, 96],
                       "description": "DeepSpeed-MII's limit on prompt + generated tokens: more than the prompt's "
                                      "length (else 400), the tighter of it and max_new_tokens wins"},
        **_SAMPLING,
        "do_sample": {"type": "boolean", "description": "false: greedy"},
        "stop_words": _STOP,
        "bad_words": {"type": "array", "maxItems": 64, "items": {"type": "string", "minLength": 1},
                      "description": "never generated (at most 64: the workers' max_bad_words)"},
        "return_full_text": _BOOL,
    },
}

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_USAGE = {"type": "object", "properties": {n: _INT for n in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_COMPLETION = {
    "type": "object", "properties": {
        "id": {"type": "string"}, "object": {"type": "string"}, "created": _INT, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": _INT, "text": {"type": "string"},
            "message": {"type": "object", "properties": {
                "role": {"type": "string"}, "content": {"type": ["string", "null"]},
                "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
            "logprobs": {"type": ["object", "null"], "description": "completions: tokens, token_logprobs, "
                         "top_logprobs, text_offset; chat: content [{token, logprob, bytes, top_logprobs}]"},
            "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]}}}},
        "usage": _USAGE},
}
_MII_REPLY = {"type": "array", "items": {"type": "object", "properties": {
    "generated_text": {"type": "string"}, "prompt_length": _INT, "generated_length": _INT,
    "finish_reason": {"type": "string"}}}}
_MODELS = {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
    "type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                     "root": {"type": "string"}, "max_model_len": {"type": ["integer", "null"]},
                                     "parent": {"type": ["string", "null"],
                                                "description": "a LoRA adapter's base model; null for the base"}}}}}}


def _errors(*statuses: int) -> dict:
    why = {400: "the request is invalid (the message names the field and the fix)",
           401: "a missing or wrong API key", 404: "an unknown deployment or model",
           413: "the body is larger than max_request_bytes", 429: "past the rate limit (Retry-After) or the "
           "engine's queue is full", 503: "no healthy replica (or the router is draining): retry after Retry-After"}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": why[s], "content": ref} for s in statuses}


def _post(summary: str, request: str, reply: dict, *, stream: bool) -> dict:
    content = {"application/json": {"schema": reply}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "with stream: true, "
                                                   "`data: {chunk}` events, then `data: [DONE]`"}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": {"description": "the generated text", "content": content},
                      **_errors(400, 401, 404, 413, 429, 503)}}}


def _get(summary: str, reply: dict, content_type: str = "application/json", errors=()) -> dict:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": summary, "content": {content_type: {"schema": reply}}}, **_errors(*errors)}}}


def openapi_document(deployment_name: str, *, mii: bool = True) -> dict:
    """The document of a gateway serving `deployment_name` (`mii`: with DeepSpeed-MII's route, a router's)."""
    paths = {}
    if mii:
        paths["/mii/{deployment_name}"] = _post("DeepSpeed-MII: generate for one or more prompts", "MIIRequest",
                                                _MII_REPLY, stream=False)
        paths["/mii/{deployment_name}"]["parameters"] = [{
            "name": "deployment_name", "in": "path", "required": True,
            "schema": {"type": "string", "enum": [deployment_name]}}]
    paths["/v1/completions"] = _post("OpenAI completions", "CompletionRequest", _COMPLETION, stream=True)
    paths["/v1/chat/completions"] = _post("OpenAI chat completions", "ChatCompletionRequest", _COMPLETION,
                                          stream=True)
    paths["/v1/models"] = _get("the deployment, its model and its LoRA adapters", _MODELS, errors=(401,))
    paths["/health"] = _get("200 while a replica can answer (or a scale-from-zero router holds requests)",
                            {"type": "object"}, errors=(503,))
    paths["/metrics"] = _get("Prometheus metrics", {"type": "string"}, "text/plain")
    paths["/openapi.json"] = _get("this document", {"type": "object"})
    schemas = {"CompletionRequest": _COMPLETION_REQUEST, "ChatCompletionRequest": _CHAT_REQUEST, "Error": _ERROR}
    if mii:
        schemas["MIIRequest"] = _MII_REQUEST
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": f"kubellm REST gateway: {deployment_name}", "version": "v1",
                 "description": "OpenAI's completions and chat completions and DeepSpeed-MII's route, in front "
                                "of the deployment's replicas. Limits: docs/limits.md."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "where the deployment has API keys"}}},
    })

"""The REST gateway's OpenAPI 3.1 document (`GET /openapi.json`), written by hand (no torch).

The request schemas say what serving/gateway.py accepts, field by field, with the bounds that hold end to
end (the gateway's own, and the workers' where those are tighter: `top_p` above 0, `seed` 0 or more). Fields
not listed are ignored, as vLLM's server ignores them (`additionalProperties: true`); the few the gateway
refuses when set otherwise are listed with the only value it takes (`n`, `best_of`: 1; `echo`: false).
tests/runtime/serving/test_openapi.py checks the document against the gateway: every documented field is
accepted and reaches the request, an undocumented one is ignored; `kubellm bench fuzz` generates its bodies
from these schemas.
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
_OPENAI = {
    "model": {"type": "string", "description": "a router accepts any name and echoes it; a worker's port only "
                                               "the model it serves (else 404 model_not_found)"},
    "max_tokens": {**_MAX_TOKENS, "description": _MAX_TOKENS["description"] + "; /v1/completions' default 16"},
    "max_completion_tokens": {**_MAX_TOKENS, "description": "max_tokens' newer name (max_tokens wins)"},
    "min_tokens": {"type": "integer", "minimum": 0, "description": "vLLM's name for min_new_tokens"},
    **_SAMPLING,
    "n": {"type": "integer", "enum": [1], "description": "one choice per prompt (n > 1 is refused)"},
    "stream": {"type": "boolean", "description": "server-sent events, then `data: [DONE]`"},
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1}}
_BATCH = {"maxItems": DEFAULT_MAX_PROMPTS_PER_REQUEST}

_COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"], "additionalProperties": True,
    "properties": {
        "prompt": {"oneOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, **_BATCH, "items": {"type": "string"}},
                             _TOKEN_IDS,
                             {"type": "array", "minItems": 1, **_BATCH, "items": _TOKEN_IDS}],
                   "description": "a string, a batch of strings, token ids, or a batch of token-id lists (at most "
                                  "max_prompts_per_request, 256 by default)"},
        **_OPENAI,
        "best_of": {"type": "integer", "enum": [1]},
        "echo": {"type": "boolean", "enum": [False]},
    },
}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "description": "system, user, assistant, ...: what the model's chat template "
                                                  "takes"},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                              {"type": "array", "items": {
                                  "type": "object", "required": ["type", "text"],
                                  "properties": {"type": {"type": "string", "enum": ["text"]},
                                                 "text": {"type": "string"}}}}]},
    },
}
_CHAT_REQUEST = {
    "type": "object", "required": ["messages"], "additionalProperties": True,
    "properties": {"messages": {"type": "array", "minItems": 1, "items": _MESSAGE}, **_OPENAI},
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
            "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}},
            "finish_reason": {"type": "string", "enum": ["stop", "length"]}}}},
        "usage": _USAGE},
}
_MII_REPLY = {"type": "array", "items": {"type": "object", "properties": {
    "generated_text": {"type": "string"}, "prompt_length": _INT, "generated_length": _INT,
    "finish_reason": {"type": "string"}}}}
_MODELS = {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
    "type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"}}}}}}


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
    paths["/v1/models"] = _get("the deployment and its model", _MODELS, errors=(401,))
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

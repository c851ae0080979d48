"""GET /openapi.json (serving/openapi.py) against the gateway that serves it: a valid OpenAPI 3.1 document naming
every route; every documented request field is accepted and reaches the request sent upstream; a field of the
wrong type is refused naming it, or ignored exactly as if absent; an undocumented field is refused naming it on
the OpenAI routes (ignored on MII's), and so are OpenAI's fields that are not served. Over real HTTP on loopback,
the upstream an in-process recorder."""

from __future__ import annotations

import asyncio
import json
import math
import random

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubellm.bench.fuzz_inputs import SchemaValues, request_schemas
from kubellm.runtime.serving.gateway import build_app
from kubellm.runtime.serving.openapi import openapi_document
from openapi_spec_validator import validate
from test_limits import Recording

DOC = openapi_document("limits")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)   # float fields are float32 on the wire


def _cfg(name):
    return lambda req, value: _close(getattr(req.config, name), value) if isinstance(value, float) \
        else getattr(req.config, name) == value


def _words(name):
    return lambda req, value: list(getattr(req.config, name)) == ([value] if isinstance(value, str) else value)


def _prompts(req, value):
    texts = [value] if isinstance(value, str) else value
    if texts and isinstance(texts[0], int):
        return [list(p.token_ids.ids) for p in req.prompts] == [texts]
    if texts and isinstance(texts[0], list):
        return [list(p.token_ids.ids) for p in req.prompts] == texts
    return [p.text for p in req.prompts] == texts


def _messages(req, value):
    def text(content):
        return "".join(p["text"] for p in content) if isinstance(content, list) else (content or "")
    got = [(m.role, m.content) for m in req.prompts[0].chat.messages]
    return got == [(m["role"], text(m.get("content"))) for m in value]


def _optional(name):   # a field drawn as null (its examples): not set at all
    return lambda req, value: (value is None and not req.config.HasField(name)) or getattr(req.config, name) == value


def _response_format(req, value):
    kind = value["type"]
    if kind == "json_object":
        return req.config.guided_json_object
    if kind == "json_schema":
        return json.loads(req.config.guided_json) == value["json_schema"]["schema"]
    return not req.config.HasField("guided_json") and not req.config.HasField("guided_json_object")


def _tools(req, value):
    rendered = json.loads(req.prompts[0].chat.tools_json)
    return [t["function"]["name"] for t in rendered] == [t["function"]["name"] for t in value]


def _logprobs(req, value):
    if isinstance(value, bool):   # chat: logprobs true asks for the chosen tokens' (top_logprobs: alternatives)
        return req.config.HasField("logprobs") == value
    return req.config.logprobs == value


def _nothing_guided(req, value):
    return value is None and not any(req.config.HasField(f) for f in (
        "guided_json", "guided_regex", "guided_grammar", "guided_json_object")) and not req.config.guided_choice


# Where each documented field lands in the GenerateRequest (None: in the reply, not the request).
LANDS = {
    "max_tokens": _cfg("max_new_tokens"), "max_completion_tokens": _cfg("max_new_tokens"),
    "max_new_tokens": _cfg("max_new_tokens"), "max_length": _cfg("max_length"),
    "min_tokens": _cfg("min_new_tokens"), "min_new_tokens": _cfg("min_new_tokens"),
    "temperature": _cfg("temperature"), "top_p": _cfg("top_p"), "top_k": _cfg("top_k"),
    "repetition_penalty": _cfg("repetition_penalty"), "ignore_eos": _cfg("ignore_eos"),
    "skip_special_tokens": _cfg("skip_special_tokens"), "seed": _cfg("random_seed"),
    "random_seed": _cfg("random_seed"), "stop": _words("stop_words"), "stop_words": _words("stop_words"),
    "bad_words": _words("bad_words"), "prompt": _prompts, "prompts": _prompts, "messages": _messages,
    "do_sample": lambda req, value: value or _close(req.config.temperature, 0.0),
    "model": None, "stream": None, "stream_options": None, "echo": None, "user": None,
    "return_full_text": None, "top_logprobs": None, "tool_choice": None, "parallel_tool_calls": None,
    "presence_penalty": _cfg("presence_penalty"), "frequency_penalty": _cfg("frequency_penalty"),
    "logit_bias": lambda req, value: dict(req.config.logit_bias) == {int(k): v for k, v in value.items()},
    "n": lambda req, value: req.config.n == value if value > 1 else not req.config.HasField("n"),
    "best_of": _optional("best_of"), "logprobs": _logprobs, "response_format": _response_format, "tools": _tools,
    "guided_json": _nothing_guided, "guided_regex": _nothing_guided, "guided_choice": _nothing_guided,
    "guided_grammar": _nothing_guided, "structured_outputs": _nothing_guided,
    "guided_whitespace_pattern": _optional("guided_whitespace_pattern"), "guided_decoding_backend": None,
}
MINIMAL = {"POST /v1/completions": {"prompt": "the city"},
           "POST /v1/chat/completions": {"messages": [{"role": "user", "content": "the city"}]},
           "POST /mii/{deployment_name}": {"prompts": ["the city"]}}
# A value of another JSON type than any the field takes: the first of these that fits.
WRONG = [("object", {"x": 1}), ("string", "seven"), ("integer", 7)]


def _body(route: str, name: str, value) -> dict:
    body = {**MINIMAL[route], name: value}
    if name == "prompt" and route.startswith("POST /mii"):
        body.pop("prompts")   # MII reads prompts first
    return body


def fields():
    for route, (path, schema) in request_schemas(DOC).items():
        for name, sub in DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]["properties"].items():
            yield route, path, name, sub


def gateway(check):
    async def main():
        upstream = Recording(session_len=4096)
        async with TestClient(TestServer(build_app(upstream))) as client:
            return await check(client, upstream)
    return asyncio.run(main())


async def post(client, path, body):
    reply = await client.post(path, data=json.dumps(body))
    return reply.status, await reply.text()


def test_the_document_is_valid_openapi_3_1_and_names_every_route():
    for mii in (True, False):
        validate(openapi_document("limits", mii=mii))
    app = build_app(Recording())
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(method.upper(), path) for path, item in DOC["paths"].items()
                  for method in item if method in ("get", "post")}
    assert served == documented
    assert "/mii/{deployment_name}" not in openapi_document("x", mii=False)["paths"]


def test_the_gateway_serves_it():
    async def check(client, upstream):
        reply = await client.get("/openapi.json")
        assert reply.status == 200 and await reply.json() == DOC
    gateway(check)


@pytest.mark.parametrize("route, path, name, schema", list(fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_field_is_accepted_and_reaches_the_request(route, path, name, schema):
    assert name in LANDS, f"{route} documents {name}: say in LANDS where it lands"
    rng = random.Random(name)

    async def check(client, upstream):
        for _ in range(5):   # several valid draws: each branch of a oneOf, edge values
            value = SchemaValues(DOC, rng).value(schema)
            jsonschema.validate(value, {**schema, "$defs": {}})
            body = _body(route, name, value)
            status, text = await post(client, path, body)
            assert status == 200, (body, text)
            if LANDS[name] is not None:
                assert LANDS[name](upstream.requests[-1], value), (name, value, upstream.requests[-1])
    gateway(check)


@pytest.mark.parametrize("route, path, name, schema", list(fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_wrong_type_is_refused_naming_the_field_or_ignored_as_if_absent(route, path, name, schema):
    kinds = set()
    for branch in schema.get("oneOf", [schema]):
        kind = branch.get("type")
        kinds.update(kind if isinstance(kind, list) else [kind])
    wrong = next(v for k, v in WRONG if k not in kinds and not (k == "integer" and "number" in kinds))

    async def check(client, upstream):
        status, text = await post(client, path, _body(route, name, wrong))
        if status == 400:
            error = json.loads(text)["error"]
            assert name in error["message"] or error["param"] == name or name in (error["param"] or ""), error
            return
        assert status == 200, text
        sent = upstream.requests[-1]
        status, _ = await post(client, path, MINIMAL[route])
        assert status == 200 and upstream.requests[-1].config == sent.config and \
            upstream.requests[-1].prompts == sent.prompts, f"{name}={wrong!r} was neither refused nor ignored"
    gateway(check)


@pytest.mark.parametrize("route", list(MINIMAL))
def test_an_undocumented_field_is_refused_naming_it_on_openai_routes_and_ignored_on_miis(route):
    path = request_schemas(DOC)[route][0]

    async def check(client, upstream):
        await post(client, path, MINIMAL[route])
        plain = upstream.requests[-1]
        status, text = await post(client, path, {**MINIMAL[route], "frobnicate": [1, {"x": None}]})
        if route.startswith("POST /mii"):
            assert status == 200
            assert (upstream.requests[-1].config, upstream.requests[-1].prompts) == (plain.config, plain.prompts)
        else:
            error = json.loads(text)["error"]
            assert status == 400 and error["param"] == "frobnicate" and "GET /openapi.json" in error["message"]
    gateway(check)


@pytest.mark.parametrize("path, name, value, words", [
    ("/v1/completions", "suffix", "the end", ["put all the text in 'prompt'"]),
    ("/v1/chat/completions", "functions", [{"name": "f"}], ["send them as 'tools'"]),
    ("/v1/chat/completions", "function_call", "auto", ["use 'tool_choice'"]),
    ("/v1/completions", "min_p", 0.1, ["top_p or top_k"]),
    ("/v1/chat/completions", "store", True, ["remove 'store'"]),
    ("/v1/chat/completions", "echo", True, ["not a field of /v1/chat/completions"]),
    ("/v1/chat/completions", "best_of", 2, ["not a field of /v1/chat/completions"]),
])
def test_openais_fields_that_are_not_served_are_refused_naming_them(path, name, value, words):
    route = f"POST {path}"
    assert name not in DOC["components"]["schemas"][request_schemas(DOC)[route][1]["$ref"].rsplit("/", 1)[1]][
        "properties"]

    async def check(client, upstream):
        status, text = await post(client, path, {**MINIMAL[route], name: value})
        error = json.loads(text)["error"]
        assert status == 400 and error["param"] == name and all(w in error["message"] for w in words), error
        assert upstream.requests == []
    gateway(check)

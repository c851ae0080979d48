"""OpenAI request bodies -> the GenerateRequest sent upstream (serving/openai_requests.py, openai_tools.py,
openai_chat.py): each field lands where it should, and every bad one is refused naming it (pure tables)."""

from __future__ import annotations

import json

import pytest
from kubellm.runtime.serving.gateway import resolve_model
from kubellm.runtime.serving.openai_requests import chat_request, completion_request
from kubellm.runtime.serving.rest_fields import BadRequest

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def completion(**body):
    return completion_request({"prompt": "hi", **body}, session_len=128)


def chat(**body):
    return chat_request({"messages": USER, **body}, session_len=128)


@pytest.mark.parametrize("body, want", [
    ({}, {"max_new_tokens": 16}),
    ({"max_tokens": 5, "n": 3, "seed": 7}, {"max_new_tokens": 5, "n": 3, "random_seed": "7"}),   # int64: JSON text
    ({"max_tokens": 5, "max_completion_tokens": 9}, {"max_new_tokens": 9}),   # the newer name wins, as in vLLM
    ({"n": 1}, {"max_new_tokens": 16}),   # n = 1 is the default: not sent
    ({"best_of": 4, "n": 2}, {"max_new_tokens": 16, "n": 2, "best_of": 4}),
    ({"presence_penalty": 1.5, "frequency_penalty": -0.5},
     {"max_new_tokens": 16, "presence_penalty": 1.5, "frequency_penalty": -0.5}),
    ({"logit_bias": {"50": -100, "7": 2.5}}, {"max_new_tokens": 16, "logit_bias": {50: -100.0, 7: 2.5}}),
    ({"stop": "\n"}, {"max_new_tokens": 16, "stop_words": ["\n"]}),
    ({"stop": ["a", "b"]}, {"max_new_tokens": 16, "stop_words": ["a", "b"]}),
    ({"logprobs": 3}, {"max_new_tokens": 16, "logprobs": 3}),
    ({"logprobs": 2, "echo": True}, {"max_new_tokens": 16, "logprobs": 2, "prompt_logprobs": 2}),
    ({"echo": True, "max_tokens": 0, "logprobs": 0}, {"max_new_tokens": 1, "logprobs": 0, "prompt_logprobs": 0}),
    ({"guided_regex": "[a-z]+"}, {"max_new_tokens": 16, "guided_regex": "[a-z]+"}),
    ({"guided_choice": ["yes", "no"]}, {"max_new_tokens": 16, "guided_choice": ["yes", "no"]}),
    ({"guided_grammar": 'root ::= "a"'}, {"max_new_tokens": 16, "guided_grammar": 'root ::= "a"'}),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?"},
     {"max_new_tokens": 16, "guided_json": '{"type": "object"}', "guided_whitespace_pattern": " ?"}),
    ({"guided_json": '{"type": "integer"}'}, {"max_new_tokens": 16, "guided_json": '{"type": "integer"}'}),
    ({"response_format": {"type": "json_object"}}, {"max_new_tokens": 16, "guided_json_object": True}),
    ({"response_format": {"type": "text"}}, {"max_new_tokens": 16}),
    ({"structured_outputs": {"regex": "x+"}}, {"max_new_tokens": 16, "guided_regex": "x+"}),
    ({"structured_outputs": {"json_object": True}}, {"max_new_tokens": 16, "guided_json_object": True}),
    ({"user": "u-1", "guided_decoding_backend": "xgrammar", "stream": True, "stream_options": {"include_usage": True}},
     {"max_new_tokens": 16}),
])
def test_completion_fields_land_in_the_config(body, want):
    from google.protobuf.json_format import MessageToDict

    config = MessageToDict(completion(**body).generate.config, preserving_proto_field_name=True)
    if "logit_bias" in config:
        config["logit_bias"] = {int(k): v for k, v in config["logit_bias"].items()}
    assert config == want


def test_the_reply_plan_of_a_completion():
    req = completion(prompt=["a b", "c"], echo=True, logprobs=1, max_tokens=0, n=2, stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True}, user="u")
    assert (req.echo, req.prompt_only, req.logprobs, req.n, req.stream) == (True, True, 1, 2, True)
    assert (req.include_usage, req.continuous_usage, req.user, req.prompt_texts) == (True, True, "u", ("a b", "c"))
    plain = completion(stream_options={"include_usage": True})   # without stream: meaningless, not sent
    assert (plain.include_usage, plain.echo, plain.logprobs, plain.prompt_only) == (False, False, None, False)


@pytest.mark.parametrize("body, param, words", [
    ({"n": 0}, "n", [">= 1"]), ({"n": 129}, "n", ["<= 128"]), ({"n": 10**9}, "n", ["<= 128"]),
    ({"n": "2"}, "n", ["an integer"]), ({"n": True}, "n", ["an integer"]),
    ({"best_of": 1, "n": 2}, "best_of", ["at least n (2)"]),
    ({"best_of": 3, "stream": True}, "best_of", ["cannot stream"]),
    ({"echo": "yes"}, "echo", ["a boolean"]),
    ({"echo": True, "prompt": [1, 2, 3]}, "echo", ["send the prompt as text"]),
    ({"max_tokens": 0}, "max_tokens", [">= 1"]),   # 0 is for echo only
    ({"max_tokens": 500}, "max_tokens", ["session_len is 128"]),
    ({"logprobs": -1}, "logprobs", [">= 0"]), ({"logprobs": True}, "logprobs", ["an integer"]),
    ({"presence_penalty": 3}, "presence_penalty", ["<= 2"]), ({"frequency_penalty": -2.5}, "frequency_penalty", [">= -2"]),
    ({"logit_bias": []}, "logit_bias", ["an object mapping token ids"]),
    ({"logit_bias": {"a": 1}}, "logit_bias", ["not a token id"]),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", ["<= 100"]),
    ({"logit_bias": {"5": "x"}}, "logit_bias.5", ["a number"]),
    ({"logit_bias": {"-3": 1}}, "logit_bias", ["out of range"]),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", ["more than 1024"]),
    ({"stop": 5}, "stop", ["a string or a list of strings"]),
    ({"user": 5}, "user", ["a string"]),
    ({"suffix": "x"}, "suffix", ["not served"]), ({"frobnicate": 1}, "frobnicate", ["GET /openapi.json"]),
    ({"guided_regex": 5}, "guided_regex", ["a string"]),
    ({"guided_json": "{not json"}, "guided_json", ["a JSON schema"]),
    ({"guided_json": [1]}, "guided_json", ["a JSON schema"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty list"]),
    ({"guided_choice": ["a", ""]}, "guided_choice", ["non-empty strings"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["set together with 'guided_regex'"]),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json", ["together with 'response_format'"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["\"json_schema\""]),
    ({"response_format": "json"}, "response_format", ["must be {"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["an object"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     ["a JSON schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", ["a boolean"]),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml", ["not served"]),
    ({"structured_outputs": []}, "structured_outputs", ["an object"]),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", ["JSON output only"]),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", ["a boolean"]),
    ({"stream": True, "stream_options": {"other": True}}, "stream_options.other", ["not served"]),
    ({"stream": True, "stream_options": 3}, "stream_options", ["an object"]),
    ({"prompt": [["a"]]}, "prompt", ["token ids"]),
    ({"guided_regex": "x" * 300_000}, "guided_regex", ["a regex of 300000 characters, more than 32768"]),
    ({"guided_grammar": "root ::= " + '"a" ' * 10_000}, "guided_grammar", ["more than 32768"]),
    ({"guided_choice": ["y" * 1000] * 40}, "guided_choice", ["a choice list of 40000 characters"]),
    ({"guided_json": {"enum": ["z" * 70_000]}}, "guided_json", ["a JSON schema of", "more than 65536"]),
    ({"structured_outputs": {"regex": "x" * 40_000}}, "structured_outputs.regex", ["more than 32768"]),
    ({"prompt": ["a"] * 20, "n": 20}, "n", ["20 prompts x 20 choices = 400 sequences", "max_prompts_per_request (256)"]),
    ({"prompt": ["a"] * 100, "n": 2, "best_of": 3}, "best_of", ["300 sequences"]),
])
def test_completion_refusals_name_the_field(body, param, words):
    with pytest.raises(BadRequest) as caught:
        completion(**body)
    assert caught.value.param == param and caught.value.status == 400, caught.value.message
    assert all(w in caught.value.message for w in words), caught.value.message


def test_chat_logprobs_tools_and_messages():
    req = chat(logprobs=True, top_logprobs=5, max_completion_tokens=7, n=2, tools=[WEATHER, TIME],
               messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": [
                   {"type": "text", "text": "weather "}, {"type": "text", "text": "in Paris?"}]},
                   {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                       {"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}])
    cfg = req.generate.config
    assert (req.logprobs, cfg.logprobs, cfg.max_new_tokens, cfg.n) == (5, 5, 7, 2)
    assert not cfg.HasField("guided_json")   # tool_choice auto: parsed, not constrained
    conv = req.generate.prompts[0].chat
    assert [t["function"]["name"] for t in json.loads(conv.tools_json)] == ["get_weather", "get_time"]
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool"]
    assert conv.messages[1].content == "weather in Paris?"
    # Chat templates take a call's arguments as an object (as vLLM passes them).
    assert json.loads(conv.messages[2].tool_calls_json) == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert (conv.messages[3].tool_call_id, conv.messages[3].name, conv.messages[3].content) == (
        "call_1", "get_weather", "sunny")
    assert req.tools.mode == "auto" and req.tools.parallel
    assert chat(logprobs=True).logprobs == 0 and chat().logprobs is None


def test_tool_choice_none_does_not_render_the_tools_and_required_or_named_constrain_the_reply():
    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.generate.prompts[0].chat.tools_json == "" and none.tools.mode == "none"
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.generate.config.guided_json) == WEATHER["function"]["parameters"]
    assert [(c.name, json.loads(c.arguments)) for c in named.tools.calls_from_constrained('{"city": "Oslo"}')] == [
        ("get_weather", {"city": "Oslo"})]
    required = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.generate.config.guided_json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [b["properties"]["name"]["enum"] for b in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object"}   # no parameters: any
    calls = required.tools.calls_from_constrained('[{"name": "get_time", "parameters": {}}]')
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "get_time", "{}")]
    assert required.tools.calls_from_constrained('[{"name": "get_time", "parame') is None   # cut short
    cut = required.tools.calls_from_constrained('[{"name": "get_time", "parameters": {}}, {"name": "get_w')
    assert [(c.name, c.arguments) for c in cut] == [("get_time", "{}")]   # ... after a whole call: that call


def test_the_constrained_schemas_accept_exactly_valid_calls():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(chat(tools=[WEATHER, TIME], tool_choice="required").generate.config.guided_json)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Rome"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
                [{"name": "get_time"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("body, param, words", [
    ({"top_logprobs": 2}, "top_logprobs", ["needs 'logprobs': true"]),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ["<= 20"]),
    ({"logprobs": 1}, "logprobs", ["a boolean"]),
    ({"messages": []}, "messages", ["non-empty list"]),
    ({"messages": [{"content": "x"}]}, "messages[0].role", ["string 'role'"]),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ["a string"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content",
     ["only text parts", "'image_url'"]),
    ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio", ["not served"]),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments", ["not JSON"]),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments", ["a JSON object"]),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]}, "messages[0].tool_calls[0]", ["function"]),
    ({"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}, "messages[0].tool_call_id", ["a string"]),
    ({"tools": {"a": 1}}, "tools", ["a list"]),
    ({"tools": [5]}, "tools[0]", ["an object"]),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", ["\"function\""]),
    ({"tools": [{"type": "function"}]}, "tools[0].function", ["an object"]),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", ["1 to 64"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     ["a JSON schema"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function.extra",
     ["not a field of a function"]),
    ({"tools": [TIME, TIME]}, "tools[1].function.name", ["given twice"]),
    ({"tools": [TIME] * 129}, "tools", ["more than 128"]),
    ({"tool_choice": "required"}, "tool_choice", ["has no 'tools'"]),
    ({"tools": [TIME], "tool_choice": "always"}, "tool_choice", ["named function"]),
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", ["not one of the tools (get_time)"]),
    ({"tools": [TIME], "tool_choice": {"type": "function"}}, "tool_choice", ["\"function\": {\"name\": ...}"]),
    ({"tools": [TIME], "parallel_tool_calls": "no"}, "parallel_tool_calls", ["a boolean"]),
    ({"tools": [TIME], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     ["together with 'response_format'"]),
    ({"functions": [{"name": "f"}]}, "functions", ["'tools'"]),
    ({"best_of": 2}, "best_of", ["not a field of /v1/chat/completions"]),
])
def test_chat_refusals_name_the_field(body, param, words):
    with pytest.raises(BadRequest) as caught:
        chat(**body)
    assert caught.value.param == param and caught.value.status == 400, caught.value.message
    assert all(w in caught.value.message for w in words), caught.value.message


@pytest.mark.parametrize("requested, served, adapters, want", [
    ("sql-lora", ["base"], ["sql-lora"], ("sql-lora", "sql-lora")),   # an adapter: generated with it
    ("sql-lora", None, ["sql-lora"], ("sql-lora", "sql-lora")),        # ... on a router too
    ("base", ["base"], ["sql-lora"], ("base", "")),
    (None, ["base"], ["sql-lora"], ("base", "")),
    ("anything", None, ["sql-lora"], ("anything", "")),                # a router echoes any other name
])
def test_a_model_naming_an_adapter_generates_with_it(requested, served, adapters, want):
    assert resolve_model(requested, served, "deployment", adapters) == want


def test_an_unknown_model_is_404_naming_the_models_and_adapters_served():
    with pytest.raises(BadRequest) as caught:
        resolve_model("gpt-4o", ["base"], "deployment", ["sql-lora"])
    err = caught.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "`base` or `sql-lora`" in err.message

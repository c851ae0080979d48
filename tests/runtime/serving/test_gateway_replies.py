"""The REST gateway's OpenAI replies (serving/gateway.py, openai_replies.py) driven by the real `openai` client over
loopback HTTP, in front of a scripted upstream that answers with chosen texts and logprobs: the shapes of n
choices, echo, logprobs (completions' and chat's), tool calls parsed from each model format (whole and streamed,
as the client's stream accumulator rebuilds them), finish reasons and usage. The real worker's end of the same is
in test_openai_worker.py."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.gateway import build_app

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _tok(text, logprob, top=()):
    return llm_pb2.TokenLogprobs(chosen=llm_pb2.TokenLogprob(token=text, logprob=logprob),
                                 top=[llm_pb2.TokenLogprob(token=t, logprob=lp) for t, lp in top])


class Scripted:
    """An upstream whose every choice is `texts[j]` (j = its index within the prompt), in pieces when streamed;
    each piece one token with logprob -0.5 (top: it and "x"); prompt logprobs for " b" " c" when asked."""

    deployment_name = "scripted"
    replicas = (object(),)

    def __init__(self):
        self.model_info = llm_pb2.ModelInfoResponse(session_len=4096, model="/models/base", adapters=["sql-lora"])
        self.texts: list[list[str]] = [["Hello", " world"]]
        self.requests: list[llm_pb2.GenerateRequest] = []

    def healthy_replicas(self):
        return list(self.replicas)

    def _choices(self, request):
        n = request.config.n if request.config.HasField("n") else 1
        for i, _ in enumerate(request.prompts):
            for j in range(n):
                yield i, j, i * n + j, self.texts[j % len(self.texts)]

    def _logprobs(self, request, pieces):
        if not request.config.HasField("logprobs"):
            return []
        return [_tok(p, -0.5, [(p, -0.5), ("x", -2.0)][:request.config.logprobs]) for p in pieces]

    def _prompt_logprobs(self, request):
        if not request.config.HasField("prompt_logprobs"):
            return []
        return [_tok(" b", -1.0, [(" b", -1.0)]), _tok(" c", -3.0, [(" q", -0.1)])]

    async def forward_unary(self, method, request, metadata=(), timeout=None):
        if method == "ModelInfo":
            return self.model_info
        self.requests.append(request)
        return llm_pb2.GenerateResponse(replica="r-0", responses=[
            llm_pb2.Response(text="".join(pieces), index=index, prompt_index=i, finish_reason="stop", prompt_length=3,
                             generated_length=len(pieces), token_logprobs=self._logprobs(request, pieces),
                             prompt_logprobs=self._prompt_logprobs(request))
            for i, j, index, pieces in self._choices(request)])

    async def forward_stream(self, request, metadata=(), timeout=None):
        self.requests.append(request)
        for i, j, index, pieces in self._choices(request):
            for k, piece in enumerate(pieces):
                yield llm_pb2.GenerateStreamResponse(
                    text=piece, index=index, prompt_index=i, prompt_length=3, generated_length=k + 1,
                    finish_reason="stop" if k == len(pieces) - 1 else "", token_logprobs=self._logprobs(request, [piece]),
                    prompt_logprobs=self._prompt_logprobs(request) if k == 0 else [])

    async def metrics_handler(self, request):
        return web.Response(text="")


@pytest.fixture(scope="module")
def served():
    """(the scripted upstream, an openai client of a gateway over it on a loopback port)."""
    upstream, ready, loop = Scripted(), threading.Event(), asyncio.new_event_loop()
    holder = {}

    async def start():
        runner = web.AppRunner(build_app(upstream, tool_call_parser="auto"))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"], holder["port"] = runner, runner.addresses[0][1]
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{holder['port']}/v1", api_key="-", max_retries=0, timeout=20)
    yield upstream, client
    client.close()
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def up(served):
    served[0].texts = [["Hello", " world"]]
    return served


def test_n_choices_per_prompt_each_with_its_index(up):
    upstream, client = up
    upstream.texts = [["one"], ["two"], ["three"]]
    reply = client.completions.create(model="m", prompt=["a", "b"], n=3, max_tokens=4)
    assert [(c.index, c.text) for c in reply.choices] == [(0, "one"), (1, "two"), (2, "three"),
                                                         (3, "one"), (4, "two"), (5, "three")]
    assert upstream.requests[-1].config.n == 3
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (6, 6)   # each prompt counted once
    chat = client.chat.completions.create(model="m", messages=USER, n=2)
    assert [(c.index, c.message.content) for c in chat.choices] == [(0, "one"), (1, "two")]


def test_echo_and_logprobs_in_completions_shape(up):
    upstream, client = up
    reply = client.completions.create(model="m", prompt="a b c", echo=True, logprobs=1, max_tokens=2)
    choice = reply.choices[0]
    assert choice.text == "a b cHello world"
    lp = choice.logprobs
    assert lp.tokens == ["a", " b", " c", "Hello", " world"]
    assert lp.token_logprobs == [None, -1.0, -3.0, -0.5, -0.5]   # the first prompt token has none
    assert lp.top_logprobs[0] is None and lp.top_logprobs[2] == {" q": -0.1, " c": -3.0}   # the chosen one too
    assert lp.text_offset == [0, 1, 3, 5, 10]
    assert upstream.requests[-1].config.prompt_logprobs == 1
    only = client.completions.create(model="m", prompt="a b c", echo=True, logprobs=0, max_tokens=0)
    assert only.choices[0].text == "a b c" and only.choices[0].logprobs.tokens == ["a", " b", " c"]
    assert only.usage.completion_tokens == 0 and only.choices[0].finish_reason == "length"
    plain = client.completions.create(model="m", prompt="a b c", max_tokens=2)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == "Hello world"


def test_streamed_echo_and_logprobs_match_the_unary_reply(up):
    _upstream, client = up
    chunks = list(client.completions.create(model="m", prompt="a b c", echo=True, logprobs=1, max_tokens=2,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == "a b cHello world" and texts[0].startswith("a b c")
    offsets = [o for c in chunks if c.choices for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 1, 3, 5, 10]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_chat_logprobs_in_chats_shape(up):
    upstream, client = up
    reply = client.chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [("Hello", -0.5, list(b"Hello")),
                                                                (" world", -0.5, list(b" world"))]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hello", -0.5), ("x", -2.0)]
    assert upstream.requests[-1].config.logprobs == 2
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="m", messages=USER, logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.token for lp in streamed for t in lp.content] == ["Hello", " world"]


CALLS = {
    "hermes": ['Let me check.', '<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'],
    "llama3_json": ['<|python_tag|>{"name": "get_weather", ', '"parameters": {"city": "Paris"}}'],
    "mistral": ['[TOOL_CALLS][{"name": "get_weather", ', '"arguments": {"city": "Paris"}}]'],
}


@pytest.mark.parametrize("fmt", list(CALLS))
def test_tool_calls_parsed_from_each_format(up, fmt):
    upstream, client = up
    upstream.texts = [CALLS[fmt]]
    reply = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == ("Let me check." if fmt == "hermes" else None)
    sent = upstream.requests[-1]
    assert json.loads(sent.prompts[0].chat.tools_json)[0]["function"]["name"] == "get_weather"
    assert sent.config.skip_special_tokens is False   # auto: Mistral's and Llama's markers are special tokens


@pytest.mark.parametrize("fmt", list(CALLS))
def test_streamed_tool_calls_accumulate_in_the_openai_client(up, fmt):
    upstream, client = up
    upstream.texts = [CALLS[fmt]]
    with client.chat.completions.stream(model="m", messages=USER, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert (choice.message.content or None) == ("Let me check." if fmt == "hermes" else None)


def test_tool_choice_none_sends_no_tools_and_parses_nothing(up):
    upstream, client = up
    upstream.texts = [CALLS["hermes"]]
    reply = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert "<tool_call>" in reply.choices[0].message.content
    assert upstream.requests[-1].prompts[0].chat.tools_json == ""


def test_required_and_named_calls_come_from_the_constrained_json(up):
    upstream, client = up
    upstream.texts = [['[{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}]']]
    reply = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="required")
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert reply.choices[0].message.content is None and upstream.requests[-1].config.HasField("guided_json")
    upstream.texts = [['{"city": ', '"Rome"}']]
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(model="m", messages=USER, tools=[WEATHER], tool_choice=named) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    assert json.loads(upstream.requests[-1].config.guided_json) == WEATHER["function"]["parameters"]


def test_streams_carry_every_choice_and_usage(up):
    upstream, client = up
    upstream.texts = [["a", "b"], ["c", "d"]]
    chunks = list(client.chat.completions.create(model="m", messages=USER, n=2, stream=True,
                                                 stream_options={"include_usage": True,
                                                                 "continuous_usage_stats": True}))
    text = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            text[choice.index] += choice.delta.content or ""
    assert text == {0: "ab", 1: "cd"}
    assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == [
        "stop", "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is not None for c in chunks)   # continuous_usage_stats: on every chunk


def test_models_lists_the_base_and_its_adapters_and_an_adapter_name_selects_it(up):
    upstream, client = up
    cards = client.models.list().data
    assert [(m.id, m.parent) for m in cards] == [("scripted", None), ("/models/base", None),
                                                 ("sql-lora", "scripted")]
    client.completions.create(model="sql-lora", prompt="x", max_tokens=2)
    assert upstream.requests[-1].adapter == "sql-lora"
    client.completions.create(model="anything", prompt="x", max_tokens=2)
    assert upstream.requests[-1].adapter == ""


def test_parallel_tool_calls_false_keeps_the_first_call_and_each_streamed_choice_parses_its_own(up):
    upstream, client = up
    two = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']
    upstream.texts = [two, ["plain words"]]
    reply = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], n=2)
    assert [len(c.message.tool_calls or []) for c in reply.choices] == [2, 0]
    assert [c.finish_reason for c in reply.choices] == ["tool_calls", "stop"]
    one = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], parallel_tool_calls=False)
    [call] = one.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    calls, content, finish = {0: [], 1: []}, {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], n=2, stream=True):
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            calls[choice.index] += [d.function.name for d in choice.delta.tool_calls or [] if d.function.name]
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert calls == {0: ["get_weather", "get_weather"], 1: []} and content[1] == "plain words"
    assert finish == {0: "tool_calls", 1: "stop"}


def test_logprobs_as_json_writes_them():
    from kubellm.runtime.serving.openai_replies import MIN_LOGPROB, TokenLogprob, chat_logprobs, finite

    assert finite(float("-inf")) == MIN_LOGPROB and finite(None) is None
    assert finite(-0.10000000149011612) == -0.1   # the float32 it was, shortest
    assert chat_logprobs([TokenLogprob("é", float("-inf"), (("é", -1.5),))], top=0)["content"] == [
        {"token": "é", "logprob": MIN_LOGPROB, "bytes": [195, 169], "top_logprobs": []}]

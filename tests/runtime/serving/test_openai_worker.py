"""OpenAI parity end to end (issue 18): the real `openai` client against a real worker's OpenAI port (WorkerServer,
a tiny random-weight Llama whose trained tokenizer carries a Hermes-style chat template with tools): n / best_of /
echo / logprobs shapes, stop, seed reproducibility, include_usage, structured outputs (client.beta...parse with a
pydantic model), a full tool round trip (call, tool message, answer), streamed tool_calls, a LoRA adapter as a
model, and hostile inputs answered 400 naming the field, never 500."""

from __future__ import annotations

import json
import shutil
from typing import Literal

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from lora_adapters import make_adapter  # noqa: E402

from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINE = {"num_kv_blocks": 1024, "block_size": 4, "max_batch_size": 16, "session_len": 512, "device": "cpu"}
SERVED = "tiny-tools"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}
# Qwen 2.5's layout, shortened: the tools in a system turn, calls as <tool_call> JSON, results as <tool_response>.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools> Calls: <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def tiny_tools(tiny_llama, tmp_path_factory):
    """tiny_llama with the Hermes-style template (tokenizer_config.json and chat_template.jinja)."""
    path = tmp_path_factory.mktemp("tiny_tools") / "model"
    shutil.copytree(tiny_llama, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = HERMES_TEMPLATE
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_tools, tmp_path_factory):
    return make_adapter(tiny_tools, tmp_path_factory.mktemp("lora") / "sql", rank=4, seed=3)


@pytest.fixture(scope="module")
def worker(tiny_tools, adapter):
    with WorkerServer(tiny_tools, {**ENGINE, "adapters": {"sql-lora": str(adapter)}}, http_port=0,
                      served_model_name=SERVED, replica="tools-0") as server:
        yield server.wait_ready()


@pytest.fixture(scope="module")
def oai(worker):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{worker.http_port}/v1", api_key="-", max_retries=0,
                       timeout=120) as client:
        yield client


def test_n_choices_seeded_reproducibly(oai):
    def texts(seed):
        reply = oai.completions.create(model=SERVED, prompt="Once upon a time", n=3, max_tokens=8, temperature=1.0,
                                       seed=seed)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.text for c in reply.choices]
    first = texts(11)
    assert texts(11) == first   # the same seed, the same choices
    assert len(set(first)) > 1 and texts(12) != first   # each choice its own seed (11, 12, 13)
    batch = oai.completions.create(model=SERVED, prompt=["a", "b"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text   # greedy choices agree
    chat = oai.chat.completions.create(model=SERVED, messages=USER, n=2, max_tokens=4, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_best_of_returns_the_most_likely_of_its_samples(oai):
    reply = oai.completions.create(model=SERVED, prompt="The capital of France is", n=1, best_of=4, max_tokens=6,
                                   temperature=1.0, seed=3, logprobs=0)
    [best] = reply.choices
    samples = oai.completions.create(model=SERVED, prompt="The capital of France is", n=4, max_tokens=6,
                                     temperature=1.0, seed=3, logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in samples.choices]
    assert best.text == samples.choices[max(range(4), key=sums.__getitem__)].text


def test_echo_and_generated_logprobs(oai):
    prompt = "The quick brown fox"
    reply = oai.completions.create(model=SERVED, prompt=prompt, echo=True, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    plain = oai.completions.create(model=SERVED, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True})
    assert reply.choices[0].text == prompt + plain.choices[0].text
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)   # 2 alternatives, and the chosen token
    assert all(lp.token_logprobs[k] == top[t] for k, (t, top) in enumerate(zip(lp.tokens, lp.top_logprobs)))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(5)]
    scored = oai.completions.create(model=SERVED, prompt=prompt, echo=True, max_tokens=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0


def test_echo_with_the_prompt_tokens_logprobs(oai):
    prompt = "The quick brown fox"
    reply = oai.completions.create(model=SERVED, prompt=prompt, echo=True, logprobs=2, max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
    choice, lp = reply.choices[0], reply.choices[0].logprobs
    n_prompt = reply.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    assert "".join(lp.tokens) == choice.text   # the first token's text too (the prompt's start, or a BOS's "")
    scored = oai.completions.create(model=SERVED, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt], abs=1e-4)


def test_chat_logprobs_and_top_logprobs(oai):
    reply = oai.chat.completions.create(model=SERVED, messages=USER, logprobs=True, top_logprobs=3, max_tokens=6,
                                        temperature=0)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens or reply.choices[0].finish_reason == "stop"
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    text = "".join(e.token for e in content)
    if "\ufffd" not in text:   # a token decoded alone may be part of a character (its bytes then say which)
        assert text == reply.choices[0].message.content


def test_stop_cuts_the_text_before_the_word(oai):
    base = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    word = base[len(base) // 2:len(base) // 2 + 3]
    assert word.strip()
    cut = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=24, temperature=0, stop=[word, "\x00"],
                                 extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[:base.index(word)] and cut.finish_reason == "stop"


def test_streamed_usage_for_every_choice(oai):
    chunks = list(oai.completions.create(model=SERVED, prompt="Hi there", n=2, max_tokens=5, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    usage = chunks[-1].usage
    unary = oai.completions.create(model=SERVED, prompt="Hi there", n=2, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True}).usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        unary.prompt_tokens, unary.completion_tokens) and usage.completion_tokens == 10


def test_logit_bias_forces_a_token_and_penalties_are_taken(oai):
    probe = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=1, temperature=0, logprobs=5)
    token = probe.choices[0].logprobs.tokens[0]
    # The least likely of the top 5, pushed to the top: every token generated is it.
    top = probe.choices[0].logprobs.top_logprobs[0]
    weakest = min(top, key=top.get)
    forced_id = None
    for token_id in range(448):   # find its id through a one-token bias probe
        got = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=1, temperature=0, logprobs=0,
                                     logit_bias={str(token_id): 100})
        if got.choices[0].logprobs.tokens[0] == weakest:
            forced_id = token_id
            break
    assert forced_id is not None and weakest != token
    forced = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=4, temperature=0, logprobs=0,
                                    logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].logprobs.tokens == [weakest] * 4
    penalized = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={str(forced_id): 100}, frequency_penalty=2, presence_penalty=2,
                                       extra_body={"ignore_eos": True}, user="user-7")
    assert penalized.choices[0].logprobs.tokens[0] == weakest


class Answer(pydantic.BaseModel):
    city: Literal["Paris", "Oslo"]
    sunny: bool
    note: str = pydantic.Field(max_length=6)   # bounded: a random model's string always ends in time


def test_beta_parse_with_a_pydantic_model(oai):
    for seed in range(4):
        completion = oai.beta.chat.completions.parse(model=SERVED, messages=USER, response_format=Answer,
                                                     max_tokens=120, temperature=1.0, seed=seed)
        message = completion.choices[0].message
        assert isinstance(message.parsed, Answer), message.content
    json_mode = oai.chat.completions.create(model=SERVED, messages=USER, response_format={"type": "json_object"},
                                            max_tokens=64, temperature=0)
    if json_mode.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_mode.choices[0].message.content), dict)
    choice = oai.completions.create(model=SERVED, prompt="Yes or no?", max_tokens=8,
                                    extra_body={"guided_choice": ["yes", "no"]}).choices[0]
    assert choice.text in ("yes", "no")


def test_a_full_tool_round_trip(oai):
    messages = list(USER)
    first = oai.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER], tool_choice="required",
                                        max_tokens=64, temperature=0.7, seed=1)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls[:1]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    messages.append(choice.message)   # as applications do: the reply's message object, sent back as is
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sunny": True})})
    answer = oai.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER], tool_choice="none",
                                         max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)
    plain = oai.chat.completions.create(model=SERVED, messages=USER, max_tokens=1)
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 20   # the call and its result were rendered
    assert first.usage.prompt_tokens > plain.usage.prompt_tokens + 20    # ... and the tools, asked for a call
    auto = oai.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_calls_accumulate(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with oai.chat.completions.stream(model=SERVED, messages=USER, tools=[WEATHER], tool_choice=named,
                                     max_tokens=64, temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_lora_adapter_is_a_model(oai):
    cards = {m.id: m for m in oai.models.list().data}
    assert cards["sql-lora"].parent == SERVED and SERVED in cards
    base = oai.completions.create(model=SERVED, prompt="Hello", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    tuned = oai.completions.create(model="sql-lora", prompt="Hello", max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert tuned.model == "sql-lora" and tuned.choices[0].text != base.choices[0].text
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="other-lora", prompt="Hello", max_tokens=2)
    assert "`sql-lora`" in caught.value.body["message"]


@pytest.mark.parametrize("route, body, param", [
    ("completions", {"prompt": "x", "n": 10**6}, "n"),
    ("completions", {"prompt": "x", "n": "3"}, "n"),
    ("completions", {"prompt": "x", "logprobs": 10**3}, None),   # past the workers' max_logprobs
    ("completions", {"prompt": "x", "logit_bias": {"999999": 5}}, None),   # past the vocabulary
    ("completions", {"prompt": "x", "guided_regex": "("}, None),
    ("completions", {"prompt": "x", "guided_json": {"type": "nonsense"}}, None),
    ("completions", {"prompt": "x", "guided_grammar": "root ::= ("}, None),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "best_of": 2, "n": 3}, "best_of"),
    ("chat", {"messages": USER, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ("chat", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": 7}}]},
     "tools[0].function.parameters"),
    ("chat", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "bogus"}}}}}}, None),
    ("chat", {"messages": [{"role": "user", "content": {"x": 1}}]}, "messages[0].content"),
    ("chat", {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "nope"}},
              "tools": [WEATHER]}, "tool_choice.function.name"),
])
def test_hostile_inputs_are_400_naming_the_field(oai, route, body, param):
    endpoint = oai.completions if route == "completions" else oai.chat.completions
    first = "prompt" if route == "completions" else "messages"
    extra = {k: v for k, v in body.items() if k != first}
    with pytest.raises(openai.BadRequestError) as caught:
        endpoint.create(model=SERVED, max_tokens=4, **{first: body[first]}, extra_body=extra)
    error = caught.value.body
    assert caught.value.status_code == 400, error
    if param is not None:
        assert error["param"] == param, error
    else:   # refused by the worker: its message names the field
        named = {"logprobs", "logit_bias", "guided_regex", "guided_json", "guided_grammar"}
        assert any(k in error["message"] for k in named), error

"""Issue 18's options over the real gRPC API: a worker on loopback serving a tiny random-weight model whose chat
template supports tools, called through the Python client (n, best_of, top logprobs with token texts, prompt
logprobs, penalties, logit_bias, structured outputs, tools)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

pytest.importorskip("grpc")

from kubellm.runtime.engine.tokenizer import Tokenizer  # noqa: E402
from kubellm.runtime.serving.client import Client, ClientError  # noqa: E402
from kubellm.runtime.serving.worker import WorkerServer  # noqa: E402
from test_tokenizer_tools import ROUND_TRIP, TOOLS, with_tools_template  # noqa: E402

pytestmark = pytest.mark.multiprocess

ENGINE = {"block_size": 4, "num_kv_blocks": 2048, "max_batch_size": 32, "session_len": 512, "device": "cpu"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory) -> Path:
    return with_tools_template(Path(tiny_llama), tmp_path_factory.mktemp("grpc") / "model")


@pytest.fixture(scope="module")
def client(model):
    server = WorkerServer(model, ENGINE, metrics_port=0, replica="r18").start()
    server.wait_ready()
    with Client(server.address, timeout=120) as c:
        yield c
    server.stop()


def test_n_choices_each_with_its_index_and_seed(client):
    replies = client.generate(["Hello", "Once upon a time"], n=3, temperature=1.0, random_seed=7, max_new_tokens=8,
                              ignore_eos=True)
    assert [(r.index, r.prompt_index) for r in replies] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert len({tuple(r.token_ids) for r in replies[:3]}) == 3   # seeds 7, 8, 9
    again = client.generate("Hello", temperature=1.0, random_seed=8, max_new_tokens=8, ignore_eos=True)
    assert again[0].token_ids == replies[1].token_ids
    streamed: dict[int, list[int]] = {}
    for delta in client.stream(["Hello", "Once upon a time"], n=3, temperature=1.0, random_seed=7, max_new_tokens=8,
                               ignore_eos=True):
        streamed.setdefault(delta.index, []).extend(delta.token_ids)
    assert [streamed[i] for i in range(6)] == [r.token_ids for r in replies]


def test_best_of_returns_the_n_most_likely_of_its_samples(client):
    options = {"temperature": 1.0, "random_seed": 100, "max_new_tokens": 6, "ignore_eos": True}
    every = client.generate("Hello", n=5, **options)
    best = client.generate("Hello", n=2, best_of=5, **options)
    ranked = sorted(every, key=lambda r: -r.cumulative_logprob)[:2]
    assert [r.token_ids for r in best] == [r.token_ids for r in ranked] and [r.index for r in best] == [0, 1]
    with pytest.raises(ClientError, match="best_of: 5 choices of which the best 2 are returned cannot be streamed"):
        list(client.stream("Hello", n=2, best_of=5, **options))


def test_top_logprobs_carry_token_texts_and_sum_to_the_cumulative(client, model):
    tokenizer = Tokenizer(model)
    [r] = client.generate("The capital of France is", logprobs=3, max_new_tokens=6, ignore_eos=True)
    assert len(r.token_logprobs) == len(r.token_ids) == 6
    for token, lp, pos in zip(r.token_ids, r.logprobs, r.token_logprobs):
        assert pos.chosen.token_id == token and pos.chosen.logprob == pytest.approx(lp)
        assert pos.chosen.token == tokenizer.hf.decode([token])
        assert len(pos.top) == 3 and pos.top[0].logprob >= pos.top[1].logprob >= pos.top[2].logprob
        assert pos.top[0].token_id == token   # greedy: the chosen token is the most likely
    assert r.cumulative_logprob == pytest.approx(sum(r.logprobs), abs=1e-4)
    assert r.top_logprobs == [{t.token_id: t.logprob for t in p.top} for p in r.token_logprobs]


def test_penalties_and_logit_bias_reach_the_sampler(client):
    [plain] = client.generate("Hello", max_new_tokens=4, ignore_eos=True)
    [forced] = client.generate("Hello", max_new_tokens=4, ignore_eos=True, logit_bias={42: 100})
    assert forced.token_ids == [42] * 4
    [penalised] = client.generate("Hello", max_new_tokens=4, ignore_eos=True, logit_bias={42: 100},
                                  frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.token_ids == [42] * 4   # -4 per repeat cannot outweigh +100
    assert plain.token_ids != forced.token_ids
    with pytest.raises(ClientError, match=r"logit_bias: token id 100000 is outside the vocabulary"):
        client.generate("Hello", logit_bias={100000: 1})
    with pytest.raises(ClientError, match=r"presence_penalty: Input should be less than or equal to 2"):
        client.generate("Hello", presence_penalty=3)


def test_structured_outputs_over_grpc(client):
    replies = client.generate(["Plan a trip", "Hello"], guided_json=SCHEMA, n=4, temperature=1.0, random_seed=3,
                              max_new_tokens=64)
    assert len(replies) == 8
    for r in replies:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMA)
    [choice] = client.generate("Pick", guided_choice=["red", "green"], temperature=1.0)
    assert choice.text in ("red", "green")
    [regex] = client.generate("Pick", guided_regex=r"[0-9]{3}-[a-z]{2}", temperature=1.0)
    assert len(regex.text) == 6 and regex.text[3] == "-"
    with pytest.raises(ClientError, match=r"INVALID_ARGUMENT: guided_json: cannot be compiled"):
        client.generate("Hello", guided_json={"type": "nonsense"})
    with pytest.raises(ClientError, match=r"guided_choice: set together with guided_regex"):
        client.generate("Hello", guided_regex="a", guided_choice=["a"])


def test_tools_travel_with_the_conversation(client, model):
    tokenizer = Tokenizer(model)
    conversation = {"messages": ROUND_TRIP, "tools": TOOLS}
    [r] = client.generate(conversation, max_new_tokens=2)
    assert r.prompt_length == len(tokenizer.encode_prompt(conversation))   # rendered with tools and tool calls
    assert r.prompt_length > len(tokenizer.encode_prompt(ROUND_TRIP[:1])) + 40
    two = client.generate([conversation, {"messages": ROUND_TRIP[:1]}], max_new_tokens=2)   # a batch of them
    assert [x.prompt_length for x in two] == [r.prompt_length, len(tokenizer.encode_prompt(ROUND_TRIP[:1]))]
    with pytest.raises(ClientError, match=r"tool_calls\[0\]\.function\.arguments: not valid JSON"):
        client.generate({"messages": [{**ROUND_TRIP[1], "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})


def test_prompt_logprobs(client, model):
    tokenizer = Tokenizer(model)
    prompt = "The capital of France is"
    ids = tokenizer.encode_prompt(prompt)
    [r] = client.generate(prompt, prompt_logprobs=2, max_new_tokens=1)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    for token, pos in zip(ids[1:], r.prompt_logprobs[1:]):
        assert pos.chosen.token_id == token and pos.chosen.logprob <= 0 and len(pos.top) == 2
        assert pos.top[0].logprob >= pos.chosen.logprob - 1e-5 and not math.isnan(pos.chosen.logprob)

"""Issue 18's options through pipeline(): the in-process API expands n / best_of as the servers do, and its
Responses carry the same logprobs fields; structured outputs and tools are pipeline options / prompts too."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import kubellm
from kubellm.runtime.errors import RequestError
from test_tokenizer_tools import ROUND_TRIP, TOOLS, with_tools_template

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def pipe(tiny_llama, tmp_path_factory):
    p = kubellm.pipeline(str(with_tools_template(Path(tiny_llama), tmp_path_factory.mktemp("pipe") / "model")),
                         device="cpu", session_len=512, show_progress=False)
    yield p
    p.destroy()


def test_best_of_is_the_most_likely_n_of_its_samples(pipe):
    options = {"temperature": 1.0, "random_seed": 11, "max_new_tokens": 6, "ignore_eos": True}
    every = pipe(["Hello", "Once upon a time"], n=4, **options)
    best = pipe(["Hello", "Once upon a time"], n=2, best_of=4, **options)
    assert [(r.index, r.prompt_index) for r in best] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    for i in range(2):
        ranked = sorted(every[4 * i:4 * i + 4], key=lambda r: -r.cumulative_logprob)[:2]
        assert [r.token_ids for r in best[2 * i:2 * i + 2]] == [r.token_ids for r in ranked]
    with pytest.raises(RequestError, match="best_of: 4 choices of which the best 2 are returned cannot be streamed"):
        list(pipe.stream_infer("Hello", n=2, best_of=4, **options))


def test_responses_carry_token_and_prompt_logprobs(pipe):
    [r] = pipe("The capital of France is", logprobs=2, prompt_logprobs=1, max_new_tokens=4, ignore_eos=True)
    assert [p.chosen.token_id for p in r.token_logprobs] == r.token_ids
    assert [p.chosen.logprob for p in r.token_logprobs] == r.logprobs
    assert all(p.chosen.token == pipe.engine.tokenizer.hf.decode([p.chosen.token_id]) for p in r.token_logprobs)
    assert r.cumulative_logprob == pytest.approx(sum(r.logprobs))
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == r.input_token_len
    assert all(len(p.top) == 1 for p in r.prompt_logprobs[1:])
    [plain] = pipe("Hello", max_new_tokens=2)
    assert plain.token_logprobs is None and plain.prompt_logprobs is None and plain.cumulative_logprob < 0


def test_guided_json_and_tools_through_the_pipeline(pipe):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
    replies = pipe({"messages": ROUND_TRIP, "tools": TOOLS}, guided_json=schema, n=3, temperature=1.0,
                   random_seed=5, max_new_tokens=40)
    assert len(replies) == 3
    for r in replies:
        jsonschema.validate(json.loads(r.text), schema)
    tokens = pipe.engine.tokenizer.encode_prompt({"messages": ROUND_TRIP, "tools": TOOLS})
    assert replies[0].input_token_len == len(tokens)
    # a batch of conversations with tools, and one without
    two = pipe([{"messages": ROUND_TRIP, "tools": TOOLS}, {"messages": ROUND_TRIP[:1]}], max_new_tokens=1)
    assert two[0].input_token_len == len(tokens) > two[1].input_token_len

"""prompt_logprobs (vLLM's): each prompt token's logprob and top alternatives, from the prefill's logits, against
transformers' own forward over the prompt; across chunked prefill, a prefix-cache hit and a recompute."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.errors import RequestError

pytestmark = pytest.mark.model

PROMPT = ("The capital of France is Paris, and the capital of Germany is Berlin. Once upon a time, there was a "
          "little girl who lived in a village near the forest.")


def reference(path, ids: list[int], k: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    chosen = [logprobs[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    top = logprobs[:-1].topk(k, dim=-1)
    return chosen, top.indices.tolist(), top.values.tolist()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    # 16 tokens a step: the prompt is prefilled in several chunks, each asking for its own positions
    e = LLMEngine(tiny_llama, EngineConfig(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
                                           session_len=128), show_progress=False)
    yield e
    e.destroy()


def test_prompt_logprobs_match_transformers_over_chunked_prefill(engine, tiny_llama):
    ids = engine.tokenizer.encode_prompt(PROMPT)
    assert len(ids) > 32   # at least 3 chunks
    chosen, top_ids, top_values = reference(tiny_llama, ids, 3)
    for attempt in range(2):   # the second run would hit the prefix cache: the prompt is computed again instead
        [seq] = engine.generate([PROMPT], [GenerationConfig(prompt_logprobs=3, max_new_tokens=2)])
        assert len(seq.prompt_logprobs) == len(ids) - 1, attempt
        for p, (lp, top) in enumerate(seq.prompt_logprobs):
            assert lp == pytest.approx(chosen[p], abs=1e-4), p
            assert list(top) == top_ids[p] and list(top.values()) == pytest.approx(top_values[p], abs=1e-4)
    [plain] = engine.generate([PROMPT], [GenerationConfig(max_new_tokens=2)])
    assert plain.prompt_logprobs == [] and plain.num_cached_prompt_tokens > 0   # others still use the cache


def test_a_recomputed_prompt_is_not_counted_twice(tiny_llama):
    # 6 sequences in 20 blocks of 4: preempted ones are recomputed, prompt positions included
    e = LLMEngine(tiny_llama, EngineConfig(device="cpu", dtype="float32", block_size=4, num_kv_blocks=20,
                                           max_num_batched_tokens=16, session_len=128), show_progress=False)
    try:
        gens = [GenerationConfig(prompt_logprobs=0, max_new_tokens=40, ignore_eos=True) for _ in range(6)]
        seqs = e.generate(["Hello, world! How are you today?"] * 6, gens)
        assert e.scheduler.num_preemptions > 0
        first = [lp for lp, _ in seqs[0].prompt_logprobs]
        for s in seqs:
            assert len(s.prompt_logprobs) == s.num_prompt_tokens - 1
            assert [lp for lp, top in s.prompt_logprobs] == pytest.approx(first, abs=1e-5)
            assert all(top == {} for _, top in s.prompt_logprobs)
    finally:
        e.destroy()


def test_prompt_logprobs_limits(engine):
    with pytest.raises(RequestError, match=r"prompt_logprobs: 50 top alternatives asked, more than max_logprobs"):
        engine.add_request("Hello", GenerationConfig(prompt_logprobs=50))

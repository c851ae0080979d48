"""Engine against Hugging Face transformers on the same weights: the shared prompts and the check that greedy
tokens are equal and logprobs close (used by the engine, model-family and parallel tests)."""

from __future__ import annotations

import pytest
from tiny_models import hf_greedy

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and runs into the forest",
    "Hello",
    "Once upon a time there was a small model that wanted to learn how to speak",
    "one two three",
    "The weather today is",
]
NEW_TOKENS = 24
NEAR_TIE = 1e-3      # below this top-2 logit gap, float rounding may legitimately pick the other token
LOGPROB_ATOL = 1e-4


def engine_for(path, **options) -> LLMEngine:
    # fp32 everywhere (auto is bf16 on a GPU): the 1e-4 logprob bound is an fp32 bound; bf16 on the
    # GPU is tests/runtime/engine/test_engine_gpu.py's job.
    defaults = dict(block_size=4, max_num_batched_tokens=32, num_kv_blocks=256, max_batch_size=8, dtype="float32")
    return LLMEngine(path, EngineConfig.build(**{**defaults, **options}), show_progress=False)


def assert_matches_hf(path, prompts_ids, seqs):
    """Tokens equal up to the end (or up to a near-tie in HF's logits); logprobs within LOGPROB_ATOL."""
    refs = hf_greedy(path, prompts_ids, NEW_TOKENS)
    for i, (seq, ref) in enumerate(zip(seqs, refs)):
        ties = [t for t, gap in enumerate(ref["top2_gaps"]) if gap < NEAR_TIE]
        upto = ties[0] if ties else len(ref["token_ids"])
        assert seq.generated_ids[:upto] == ref["token_ids"][:upto], f"prompt {i}"
        if not ties:
            assert seq.generated_ids == ref["token_ids"], f"prompt {i}"
        assert seq.logprobs[:upto] == pytest.approx(ref["logprobs"][:upto], abs=LOGPROB_ATOL), f"prompt {i}"


def run(engine, prompts_ids):
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0)
    return engine.generate(prompts_ids, [gen] * len(prompts_ids))


def encode(engine, prompts):
    return [engine.tokenizer.hf.encode(p) for p in prompts]

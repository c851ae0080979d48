"""The engine against Hugging Face transformers on the same weights: greedy tokens equal, logprobs close.

Each scenario forces a different engine path: chunked prefill sharing steps with decodes,
prefix-cache hits, preemption by recompute, sharded and tied checkpoints.
"""

import pytest
from parity import NEW_TOKENS, PROMPTS, assert_matches_hf, encode, engine_for, run

from kubellm.runtime.config import GenerationConfig


pytestmark = pytest.mark.model


def test_greedy_matches_hf_with_chunked_prefill_mixed_into_decodes(tiny_model):
    check_chunked_prefill_mixed_into_decodes(tiny_model)


def test_other_families_match_hf_with_chunked_prefill_mixed_into_decodes(tiny_family):
    """OPT, GPT-2, Phi, Falcon (three layouts), Mixtral: the same continuous-batching check."""
    check_chunked_prefill_mixed_into_decodes(tiny_family)


def check_chunked_prefill_mixed_into_decodes(path):
    engine = engine_for(path, max_num_batched_tokens=16)
    ids = encode(engine, PROMPTS)
    steps_with_both = 0
    original_schedule = engine.scheduler.schedule

    def spying_schedule():
        nonlocal steps_with_both
        scheduled = original_schedule()
        kinds = {item.num_tokens == 1 and item.seq.num_computed_tokens > 0 for item in scheduled}
        steps_with_both += kinds == {True, False}
        return scheduled

    engine.scheduler.schedule = spying_schedule
    # Stagger arrivals so that later prompts are prefilled in chunks while earlier ones decode.
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0)
    seqs = [engine.add_request(ids[0], gen)]
    for prompt in ids[1:]:
        engine.step()
        seqs.append(engine.add_request(prompt, gen))
    while engine.has_unfinished():
        engine.step()
    assert steps_with_both > 0, "no step mixed a prefill chunk with decodes"
    assert max(map(len, ids)) > 16, "a prompt must be longer than the step budget to be chunked"
    assert_matches_hf(path, ids, seqs)


def test_prefix_cache_hits_give_the_same_tokens(tiny_llama):
    engine = engine_for(tiny_llama)
    shared = "The quick brown fox jumps over the lazy dog and runs into the forest. "
    prompts = [shared + tail for tail in ("It was late.", "Hello there", "one two three")]
    ids = encode(engine, prompts)
    run(engine, ids[:1])
    hits_before = engine.block_manager.prefix_hits
    seqs = run(engine, ids)
    assert engine.block_manager.prefix_hits - hits_before >= 2 * 4 * 2, "the shared prefix was not reused"
    assert all(s.num_cached_prompt_tokens > 0 for s in seqs)
    assert_matches_hf(tiny_llama, ids, seqs)


def test_forced_preemption_recomputes_to_the_same_tokens(tiny_mistral):
    # 20 blocks of 4 tokens: one sequence fits, five growing at once do not.
    engine = engine_for(tiny_mistral, num_kv_blocks=20, block_size=4, max_num_batched_tokens=64)
    ids = encode(engine, PROMPTS)
    seqs = run(engine, ids)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert_matches_hf(tiny_mistral, ids, seqs)


@pytest.mark.parametrize("fixture", ["tiny_llama_sharded", "tiny_llama_tied"])
def test_sharded_and_tied_checkpoints(fixture, request):
    path = request.getfixturevalue(fixture)
    engine = engine_for(path)
    ids = encode(engine, PROMPTS)
    assert_matches_hf(path, ids, run(engine, ids))


def test_prompts_of_one_token_and_block_boundaries(tiny_qwen2):
    engine = engine_for(tiny_qwen2, block_size=4)
    ids = [[5], [5, 6, 7, 8], [9, 10, 11, 12, 13], list(range(20, 28))]
    assert_matches_hf(tiny_qwen2, ids, run(engine, ids))

"""The step contract between engine and executor: the StepBatch a follower rank is sent (pickled as
it is) makes its runner compute rank 0's logits; the runner's KV sizing API; prefill attention
metadata built once per forward pass, not once per layer."""

from __future__ import annotations

import pickle

import pytest
import torch

from kubellm.kernels import attention as reference_attention
from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.executor import LocalExecutor
from kubellm.runtime.executor.model_runner import ModelRunner
from kubellm.runtime.executor.step import SeqChunk, StepBatch

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest."]
# max_num_batched_tokens=16 chunks the longer prompts' prefill and mixes the chunks with decodes.
CONFIG = dict(device="cpu", block_size=4, num_kv_blocks=96, max_num_batched_tokens=16, session_len=128)


@pytest.fixture
def engine(tiny_llama):
    engine = LLMEngine(tiny_llama, EngineConfig(**CONFIG), show_progress=False)
    yield engine
    engine.destroy()


def _generate(engine):
    gens = [GenerationConfig(max_new_tokens=6, ignore_eos=True)] * len(PROMPTS)
    return engine.generate(PROMPTS, gens)


def test_step_batch_round_trips_through_pickle():
    batch = StepBatch([SeqChunk(7, [42], [3, 1], True), SeqChunk(0, [1, 2, 3, 4, 5], [0, 2], False)])
    copy = pickle.loads(pickle.dumps(batch))
    assert copy == batch and copy is not batch
    assert (copy.num_tokens, copy.num_samples) == (6, 1)
    assert [(c.context_len, c.is_decode) for c in copy.chunks] == [(8, True), (5, False)]


def test_a_follower_given_the_pickled_batches_computes_rank0s_logits(engine):
    """A second runner that only ever sees the pickled StepBatches (as a follower rank does) keeps
    the same KV cache and returns the same logits, step after step, prefill chunks and decodes alike."""
    assert isinstance(engine.executor, LocalExecutor)
    sent = []
    forward = engine.runner.forward

    def recording_forward(batch):
        logits = forward(batch)
        # Pickled now, as RankGroup sends it: a batch is read during its step only.
        sent.append((pickle.dumps(batch), None if logits is None else logits.clone()))
        return logits

    engine.runner.forward = recording_forward
    _generate(engine)
    batches = [pickle.loads(data) for data, _ in sent]
    assert any(c.start > 0 and not c.is_decode for b in batches for c in b.chunks), "no chunked prefill"
    assert any(c.is_decode for b in batches for c in b.chunks)

    follower = ModelRunner(engine.model_path, engine.hf_config, engine.config, engine.session_len,
                           show_progress=False)
    follower.allocate_kv_cache(engine.executor.num_kv_blocks)
    for batch, (_, expected) in zip(batches, sent):
        logits = follower.forward(batch)
        if expected is None:
            assert logits is None
        else:
            assert torch.equal(logits, expected)


def test_runner_kv_cache_sizing(engine):
    runner = engine.runner
    assert runner.max_kv_blocks() == 96 == engine.executor.num_kv_blocks == engine.block_manager.num_blocks
    cache_bytes = sum(t.numel() * t.element_size() for a in runner.attention_layers for t in (a.k_cache, a.v_cache))
    assert cache_bytes == 96 * runner.kv_block_bytes()
    runner.allocate_kv_cache(10)
    assert runner.num_blocks == 10 and all(a.k_cache.shape[0] == 10 for a in runner.attention_layers)


def test_max_kv_blocks_from_the_memory_budget(tiny_llama):
    config = EngineConfig(**{**CONFIG, "num_kv_blocks": None, "cpu_memory_gb": 0.001, "kv_cache_fraction": 0.5})
    engine = LLMEngine(tiny_llama, config, show_progress=False)
    try:
        runner = engine.runner
        budget = int(0.001 * 2 ** 30 * 0.5 // runner.kv_block_bytes())
        useful = config.max_batch_size * -(-config.session_len // config.block_size)
        assert engine.executor.num_kv_blocks == runner.max_kv_blocks() == min(budget, useful)
    finally:
        engine.destroy()


def test_prefill_masks_are_built_once_per_step_not_per_layer(engine, monkeypatch):
    builds = []
    window_mask = reference_attention._window_mask
    monkeypatch.setattr(reference_attention, "_window_mask", lambda *a: builds.append(1) or window_mask(*a))
    engine.add_request(list(range(5, 25)), GenerationConfig(max_new_tokens=2, ignore_eos=True))
    engine.step()   # the prompt's first 16 tokens: plain causal, no mask
    assert builds == []
    engine.step()   # its last 4 tokens after the cached 16: one mask, shared by every layer
    assert len(engine.runner.attention_layers) > 1 and len(builds) == 1

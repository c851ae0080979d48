"""eviction='copy' on a real model: preempted sequences' KV blocks go to host memory and come back,
and the greedy tokens equal the recompute path's and transformers'.

A tiny KV cache (20 blocks of 4 tokens: one sequence fits, five growing at once do not) forces
preemption, as test_engine_hf.py's recompute test does. Each test checks that swapping happened
(blocks out and in), and what was recomputed: the tokens each sequence ran through the model,
counted at the scheduler, are its length minus one (the last token is never fed back) minus its
prefix-cache hits when nothing was recomputed, and more when something was.
"""

from __future__ import annotations

import pytest
import torch
from parity import PROMPTS, assert_matches_hf, encode, engine_for, run

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine

PRESSURE = dict(num_kv_blocks=20, block_size=4, max_num_batched_tokens=64)


def count_computed_tokens(engine) -> dict[int, int]:
    """seq_id -> tokens run through the model, observed at Scheduler.advance (the real one runs)."""
    counts: dict[int, int] = {}
    original = engine.scheduler.advance

    def advance(scheduled):
        for item in scheduled:
            counts[item.seq.seq_id] = counts.get(item.seq.seq_id, 0) + item.num_tokens
        original(scheduled)

    engine.scheduler.advance = advance
    return counts


def recomputed_tokens(seq, counts) -> int:
    return counts[seq.seq_id] - (len(seq) - 1 - seq.num_cached_prompt_tokens)


@pytest.mark.model
def test_swapped_sequences_resume_without_recompute_and_match_hf(tiny_mistral):
    engine = engine_for(tiny_mistral, eviction="copy", num_cpu_blocks=64, **PRESSURE)
    counts = count_computed_tokens(engine)
    ids = encode(engine, PROMPTS)
    seqs = run(engine, ids)
    sched, blocks = engine.scheduler, engine.block_manager
    assert sched.num_preemptions > 0 and sched.num_swap_fallbacks == 0
    assert blocks.swapped_out_blocks > 0 and blocks.swapped_in_blocks > 0
    assert all(recomputed_tokens(s, counts) == 0 for s in seqs), "a swapped sequence was recomputed"
    assert blocks.num_free == blocks.num_blocks and blocks.num_cpu_free == blocks.num_cpu_blocks
    assert_matches_hf(tiny_mistral, ids, seqs)

    recompute = engine_for(tiny_mistral, **PRESSURE)
    recompute_counts = count_computed_tokens(recompute)
    reference = run(recompute, ids)
    assert recompute.scheduler.num_preemptions > 0
    assert sum(recomputed_tokens(s, recompute_counts) for s in reference) > 0, "the recompute path recomputes"
    assert [s.token_ids for s in seqs] == [s.token_ids for s in reference]


@pytest.mark.model
def test_host_blocks_exhausted_falls_back_to_recompute_with_equal_tokens(tiny_mistral):
    # 3 host blocks: the short sequences' K/V fit, the longer ones' do not.
    engine = engine_for(tiny_mistral, eviction="copy", num_cpu_blocks=3, **PRESSURE)
    counts = count_computed_tokens(engine)
    ids = encode(engine, PROMPTS)
    seqs = run(engine, ids)
    sched = engine.scheduler
    assert sched.num_swap_fallbacks > 0
    assert sum(recomputed_tokens(s, counts) for s in seqs) > 0
    assert engine.block_manager.num_cpu_free == 3
    assert_matches_hf(tiny_mistral, ids, seqs)


@pytest.mark.model
def test_swap_blocks_moves_kv_between_device_and_host_exactly(tiny_llama):
    """The runner's copies on their own: blocks out to host blocks, then in to other device blocks."""
    engine = engine_for(tiny_llama, eviction="copy", num_cpu_blocks=8, num_kv_blocks=16)
    runner = engine.runner
    layers = runner.attention_layers
    gen = torch.Generator().manual_seed(0)
    for attn in layers:
        attn.k_cache.copy_(torch.randn(attn.k_cache.shape, generator=gen))
        attn.v_cache.copy_(torch.randn(attn.v_cache.shape, generator=gen))
    before = [(a.k_cache.clone(), a.v_cache.clone()) for a in layers]
    addresses = [a.k_cache.data_ptr() for a in layers]
    runner.swap_blocks([(3, 5), (7, 0), (2, 6)], [])
    runner.swap_blocks([], [(5, 10), (0, 11), (6, 12)])
    for (k, v), attn in zip(before, layers):
        for src, dst in ((3, 10), (7, 11), (2, 12)):
            assert torch.equal(attn.k_cache[dst], k[src]) and torch.equal(attn.v_cache[dst], v[src])
        untouched = [b for b in range(16) if b not in (10, 11, 12)]
        assert torch.equal(attn.k_cache[untouched], k[untouched])
    assert [a.k_cache.data_ptr() for a in layers] == addresses, "caches written in place"
    assert [part.shape[:2] for part in runner.host_kv_cache] == [(len(layers), 8)] * 2   # keys, values


@pytest.mark.model
def test_recompute_engine_has_no_host_cache(tiny_llama):
    engine = engine_for(tiny_llama, num_cpu_blocks=8)
    assert engine.runner.host_kv_cache is None and engine.block_manager.num_cpu_blocks == 0
    with pytest.raises(RuntimeError, match="no host cache"):
        engine.runner.swap_blocks([(0, 0)], [])


PARALLEL_PROMPTS = PROMPTS[:4]


def _parallel_engine(path, tp=1, pp=1, **options):
    config = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", dtype="float32",
                          block_size=4, num_kv_blocks=16, max_num_batched_tokens=32, session_len=128, **options)
    return LLMEngine(path, config, show_progress=False)


def _parallel_generate(engine):
    gens = [GenerationConfig(max_new_tokens=14 + 2 * i, ignore_eos=True) for i in range(len(PARALLEL_PROMPTS))]
    return [s.token_ids for s in engine.generate(PARALLEL_PROMPTS, gens)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_group_swaps_on_every_rank_with_equal_tokens(tiny_llama, tp, pp):
    """Every rank of a gloo group copies its own shard (tp) or stage (pp): the same tokens as one
    process recomputing, and as one process swapping."""
    single = _parallel_engine(tiny_llama)
    try:
        expected = _parallel_generate(single)
        assert single.scheduler.num_preemptions > 0
    finally:
        single.destroy()
    group = _parallel_engine(tiny_llama, tp, pp, eviction="copy", num_cpu_blocks=64)
    try:
        counts = count_computed_tokens(group)
        assert _parallel_generate(group) == expected
        assert group.block_manager.swapped_out_blocks > 0 and group.block_manager.swapped_in_blocks > 0
        assert group.scheduler.num_swap_fallbacks == 0
        assert sum(counts.values()) == sum(len(t) - 1 for t in expected) - group.block_manager.prefix_hits
        assert not group.executor.broken
    finally:
        group.destroy()


@pytest.mark.multiprocess
def test_a_worker_publishes_its_swaps_on_metrics(tiny_mistral):
    """A real worker (gRPC over loopback, /metrics over HTTP): kubellm_kv_swapped_blocks_total moves."""
    import urllib.request

    pytest.importorskip("grpc")
    from kubellm.metrics import parse
    from kubellm.runtime.serving.client import Client
    from kubellm.runtime.serving.worker import WorkerServer

    options = dict(PRESSURE, device="cpu", dtype="float32", max_batch_size=8, eviction="copy", num_cpu_blocks=64)
    server = WorkerServer(tiny_mistral, options, metrics_port=0).start().wait_ready()
    try:
        with Client(server.address, timeout=120) as client:
            ids = server.call_engine(lambda engine: encode(engine, PROMPTS))
            client.generate(ids, max_new_tokens=24, ignore_eos=True)
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        samples = parse(text)
        out, in_ = (samples[f'kubellm_kv_swapped_blocks_total{{direction="{d}"}}'] for d in ("out", "in"))
        assert out > 0 and in_ > 0
        assert out == server.call_engine(lambda engine: engine.block_manager.swapped_out_blocks)
        assert samples["kubellm_swapped"] == 0 and samples["kubellm_kv_swap_fallbacks_total"] == 0
        assert "# TYPE kubellm_kv_swapped_blocks_total counter" in text
    finally:
        server.stop()

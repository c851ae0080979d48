"""`kubellm bench serve --workload shared-prefix` end to end on the tiny checkpoint: two real workers, one
real router per policy (its speed is measured by running it, not here; this checks what it reports)."""

import pytest
from kubellm.bench.shared_prefix import format_shared_prefix, shared_prefix
from kubellm.bench.workload import make_shared_prefix_workload
from kubellm.runtime.serving.balancing import POLICIES

pytestmark = pytest.mark.multiprocess


def test_shared_prefix_workload_is_seeded_and_shares_its_system_prompts():
    a = make_shared_prefix_workload(3, 20, 4, 30, seed=1)
    assert a == make_shared_prefix_workload(3, 20, 4, 30, seed=1)
    assert a != make_shared_prefix_workload(3, 20, 4, 30, seed=2)
    assert len(a.system_prompts) == 3 and len(set(a.system_prompts)) == 3
    assert all(prompt.startswith(a.system_prompts[i]) for i, prompt in a.requests)
    assert {i for i, _ in a.requests} == {0, 1, 2}          # every system prompt is used
    assert len({p for _, p in a.requests}) > 25              # user turns differ
    with pytest.raises(ValueError, match="system prompts must be >= 1"):
        make_shared_prefix_workload(0, 20, 4, 30, seed=1)


def test_shared_prefix_bench_compares_the_policies_on_two_workers(tiny_llama):
    pytest.importorskip("torch")
    engine = {"device": "cpu", "num_kv_blocks": 256, "block_size": 4, "max_batch_size": 4, "session_len": 256}
    result = shared_prefix(model=str(tiny_llama), num_system_prompts=4, system_words=24, user_words=3,
                           num_requests=16, concurrency=1, max_new_tokens=3, engine=engine, prefix_length=64,
                           worker_threads=1)
    by = {r["policy"]: r for r in result["policies"]}
    assert list(by) == list(POLICIES)
    for r in by.values():
        assert r["requests"] == 16 and r["errors"] == 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["tok_s"] > 0
        assert len(r["hit_rate"]) == len(r["prefix_cache"]) == 2 and sum(q for _, q in r["prefix_cache"]) > 0
        assert r["choose_us_p50"] < 1000      # the target: the policy's own choice within 1 ms
    # One stream at a time never reaches the bound: every system prompt stays on its replica, while round
    # robin spreads each over both, so prefix_affinity's workers hit their prefix caches more.
    assert by["prefix_affinity"]["replicas_per_prefix"] == 1.0
    assert by["round_robin"]["replicas_per_prefix"] > 1.0
    assert all(queries > 0 for _, queries in by["round_robin"]["prefix_cache"])   # both workers scraped
    rate = {p: sum(h for h, _ in r["prefix_cache"]) / sum(q for _, q in r["prefix_cache"]) for p, r in by.items()}
    assert rate["prefix_affinity"] > rate["round_robin"], rate
    text = format_shared_prefix(result)
    assert "prefix_affinity vs round_robin" in text and "prefix-cache hits per replica" in text

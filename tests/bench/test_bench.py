"""`kubellm bench offline` runs end to end (its speed is measured by running it, not here)."""

import pytest

from kubellm.bench.offline import format_result, make_workload, offline


pytestmark = pytest.mark.multiprocess


def test_offline_bench_runs_both_sides_on_the_same_workload(tiny_llama):
    result = offline(str(tiny_llama), num_prompts=6, batch_size=2, prompt_len=(4, 24), new_tokens=(2, 12), seed=1)
    assert result["generated_tokens"] > 6 * 2 - 1
    assert result["engine_tok_s"] > 0 and result["hf_tok_s"] > 0
    assert result["ratio"] == result["hf_s"] / result["engine_s"]
    text = format_result(result)
    assert "kubellm" in text and "HF generate" in text and "ratio" in text


def test_workloads_are_seeded_and_bounded(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for lengths in ("uniform", "longtail"):
        a = make_workload(tok, 20, (4, 40), (2, 30), seed=3, lengths=lengths)
        b = make_workload(tok, 20, (4, 40), (2, 30), seed=3, lengths=lengths)
        assert a == b
        assert all(2 <= m <= 30 for m in a.max_new_tokens)
        assert all(1 <= len(p) <= 40 for p in a.prompts)
        assert len(set(a.max_new_tokens)) > 3  # mixed lengths


def test_serve_bench_runs_against_a_real_worker(tiny_llama):
    from kubellm.bench.serve import run_load, sweep
    from kubellm.runtime.serving.worker import WorkerServer

    worker = WorkerServer(tiny_llama, {"num_kv_blocks": 256, "block_size": 4}).start()
    try:
        worker.wait_ready()
        result = run_load(worker.address, concurrency=3, requests_per_stream=2, max_new_tokens=5)
        assert result["requests"] == 6 and result["errors"] == 0 and result["tok_s"] > 0
        assert result["ttft_p50_ms"] > 0 and result["tpot_p50_ms"] > 0
        text = sweep(worker.address, worker.address, [2], 1, 4)
        assert "deploy / direct" in text and "added" in text
    finally:
        worker.stop()


def test_parallel_bench_runs_one_process_and_the_group_with_and_without_micro_batches(tiny_llama):
    from kubellm.bench.parallel import format_parallel, parallel

    result = parallel(str(tiny_llama), pipeline_parallel=2, num_prompts=4, batch_size=4, prompt_len=(4, 16),
                      new_tokens=(2, 6), dtype="float32", device="cpu")
    single, one_micro, micro = result["runs"]
    assert "pipeline_parallel" not in single and single["ratio"] == 1.0
    assert one_micro["pipeline_parallel"] == 2 and one_micro["pipeline_micro_batches"] == 1
    assert micro["pipeline_parallel"] == 2 and "pipeline_micro_batches" not in micro
    assert all(run["tok_s"] > 0 for run in result["runs"])
    assert "2 micro-batches" in format_parallel(result)

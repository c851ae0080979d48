"""`python -m kubellm.bench.kv_swap` runs end to end on a tiny model (its figures come from running it on a
real one: docs/benchmarks.md)."""

import pytest

from kubellm.bench.kv_swap import format_kv_swap, kv_swap, main


pytestmark = pytest.mark.model


def test_kv_swap_bench_preempts_resumes_and_compares(tiny_llama):
    result = kv_swap(str(tiny_llama), prompt_tokens=64, rounds=1, block_size=4, budget=32)
    # Preempted after generating: its computed tokens (all but the last sampled) are what is swapped.
    tokens = result["tokens_at_preemption"]
    assert tokens > 64 and result["swapped_blocks"] == -(-(tokens - 1) // 4)
    assert result["copied_back_blocks"] == result["swapped_blocks"]   # prefix caching off: every block copied
    assert result["copy_resume_s"] > 0 and result["recompute_resume_s"] > 0
    assert result["resume_ratio"] == result["recompute_resume_s"] / result["copy_resume_s"]
    text = format_kv_swap(result)
    assert "recompute / copy" in text and "64-token prompt" in text


def test_kv_swap_bench_command_line(tiny_llama, capsys):
    assert main(["--model", str(tiny_llama), "--prompt-tokens", "32", "--rounds", "1", "--block-size", "4",
                 "--budget", "16", "--prefix-caching", "--json"]) == 0
    assert '"prefix_caching": true' in capsys.readouterr().out

"""`kubellm bench kernels` and the random-weight roofline of `kubellm bench offline` run end to end.

Speed itself is measured by running them on a GPU (docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kubellm.bench import offline as bench
from kubellm.bench import kernels as bench_kernels
from kubellm.bench import roofline as bench_roofline# noqa: E402
from kubellm.runtime.cli.main import main  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.model


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the bench runs")
def test_bench_kernels_says_it_needs_a_gpu(capsys):
    assert main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_kernels_table_shows_ratios():
    rows = [{"kernel": "paged decode", "shape": "batch 1, context 1024", "triton_ms": 0.02, "torch_ms": 0.03,
             "torch": "SDPA (dense KV)", "gather_ms": 0.2, "ratio": 1.5, "triton_GBps": 2000.0}]
    text = bench_kernels.format_rows({"device": "GPU", "dtype": "bfloat16", "torch": "2.x", "rows": rows})
    assert "1.50x" in text and "gather+SDPA 0.200 ms" in text and "2000 GB/s" in text


@pytest.mark.gpu
def test_bench_kernels_measures_on_gpu():
    row = bench_kernels.bench_decode(2, 1024)
    assert row["triton_ms"] > 0 and row["ratio"] > 0
    row = bench_kernels.bench_prefill(256, 1024)
    assert row["triton_ms"] > 0 and row["ratio"] > 0


def test_weight_bytes_per_step_leave_out_the_input_embedding(tmp_path):
    """Against Hugging Face's own model of the same config: every parameter but the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    path = bench_roofline.make_random_checkpoint(tmp_path, "llama3-tiny")
    engine = LLMEngine(path, EngineConfig.build(load_format="random", num_kv_blocks=16), show_progress=False)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    expected = sum(p.numel() * 4 for n, p in hf.named_parameters() if "embed_tokens" not in n)
    assert bench_roofline.weight_bytes_per_step(engine.runner.model) == expected
    config = bench_roofline.RANDOM_MODELS["llama3-tiny"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert bench_roofline.kv_bytes_per_token(engine.runner) == (
        config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4)


def test_offline_bench_on_a_random_model_reports_the_roofline():
    result = bench.offline("unused", num_prompts=3, batch_size=2, prompt_len=(4, 16), new_tokens=(2, 6),
                           random_model="llama3-tiny")
    decode = result["decode"]
    assert result["dtype"] == "torch.bfloat16" and result["random_model"] == "llama3-tiny"
    assert decode["decode_tok_s"] > 0 and decode["bandwidth_GBps"] > 0
    assert decode["roofline_fraction"] == pytest.approx(decode["decode_tok_s"] / decode["roofline_tok_s"])
    text = bench.format_result(result)
    assert "of the memory-bandwidth roofline" in text and "nothing downloaded" in text

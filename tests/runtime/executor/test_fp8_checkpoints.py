"""transformers' FP8 checkpoints (`quant_method: fp8`: FineGrainedFP8, as DeepSeek's and Qwen's *-FP8 releases
store them: e4m3 weights, `weight_scale_inv` per block of `weight_block_size`) and AutoFP8's (one `weight_scale`
per tensor, a static `input_scale`). Served de-quantized (no FP8 kernels yet): greedy tokens equal the
de-quantized reference, and transformers, reading the same file with its own FP8 de-quantizer, gives the same
logits."""

import pytest
import torch

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.layers.quantization import QuantizationError, QuantPlan, plan_quantization
from quant_checkpoints import write_fp8

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then"]
IDS = [5, 17, 42, 100, 7]
# blocks of 16 divide every tiny projection; 48 leaves partial last blocks (64 and 128 are not multiples)
LAYOUTS = {"block16": (16, 16), "block48": (48, 48), "tensor": None}


def _engine(path, tp=1, **kw):
    config = EngineConfig(device="cpu", tensor_parallel=tp, block_size=4, num_kv_blocks=64, session_len=128, **kw)
    return LLMEngine(path, config, show_progress=False)


def _greedy(path, tp=1, **kw):
    engine = _engine(path, tp, **kw)
    try:
        gens = [GenerationConfig(max_new_tokens=12, ignore_eos=True)] * len(PROMPTS)
        return [s.token_ids for s in engine.generate(PROMPTS, gens)]
    finally:
        engine.destroy()


def _logits_and_forms(path, **kw):
    from kubellm.runtime.executor.step import SeqChunk, StepBatch

    engine = _engine(path, **kw)
    try:
        batch = StepBatch(chunks=[SeqChunk(start=0, token_ids=IDS, block_table=list(range(4)), samples=True)])
        forms = {m.form for m in engine.runner.model.modules() if type(m).__name__ == "QuantizedWeight"}
        return engine.runner.forward(batch)[0].float(), forms
    finally:
        engine.destroy()


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8")
    return {name: write_fp8(tiny_llama, out, block) for name, block in LAYOUTS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_greedy_tokens_equal_the_dequantized_reference(written, name, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = written[name]
    assert _greedy(checkpoint) == _greedy(reference)


def test_transformers_reads_the_same_checkpoint_alike(written):
    """An independent reader: transformers' FineGrainedFP8 de-quantizes on a machine without a GPU."""
    from transformers import AutoModelForCausalLM

    checkpoint, _ = written["block16"]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([IDS])).logits[0, -1]
    got, forms = _logits_and_forms(checkpoint)
    assert forms == {"float"}
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0)


def test_served_int8_on_request(written):
    checkpoint, reference = written["block48"]
    got, forms = _logits_and_forms(checkpoint, quantization="int8")
    want, _ = _logits_and_forms(reference, quantization="int8")
    assert forms == {"int8_cpu"}
    assert torch.allclose(got, want, atol=1e-5)   # int8 of the same de-quantized weights


@pytest.mark.multiprocess
def test_tp2_slices_that_cut_blocks_give_one_process_tokens(written, monkeypatch):
    """Blocks of 48 rows over a rank's 32 q rows or 64 MLP rows: a rank's slice starts inside a block."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, _ = written["block48"]
    assert _greedy(checkpoint, tp=2) == _greedy(checkpoint)


def test_a_transformers_backend_family_reads_fp8(tmp_path, monkeypatch):
    from tiny_hf_families import make_family_checkpoint

    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = write_fp8(make_family_checkpoint(tmp_path / "gemma", "gemma"), tmp_path, (16, 16))
    assert _greedy(checkpoint) == _greedy(reference)


FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}


@pytest.mark.parametrize("qc,want", [
    ({**FP8, "weight_block_size": [128, 128]},
     QuantPlan("fp8", "native", 8, 0, scheme="float-quantized", strategy="block", block=(128, 128))),
    ({"quant_method": "fp8", "activation_scheme": "static"},
     QuantPlan("fp8", "native", 8, -1, scheme="float-quantized", strategy="tensor")),
])
def test_plan(qc, want):
    assert plan_quantization(None, qc, "safetensors", "qwen2") == want


@pytest.mark.parametrize("block", [[128], [0, 128], "128x128"])
def test_a_malformed_block_size_is_refused_naming_it(block):
    with pytest.raises(QuantizationError, match=r"quantization_config.weight_block_size: .* must be \[rows, columns\]"):
        plan_quantization(None, {**FP8, "weight_block_size": block}, "safetensors", "llama")

"""Quantized weights beyond the Llama family: OPT, Phi, Qwen3 and Mixtral (kubellm's model files; Mixtral's experts
are linear layers too), GPT-2 and Falcon (int8 made on load: Conv1D and the fused query_key_value), and the
families on the transformers backend (Gemma, StableLM, Bloom), whose decoder linears become kubellm's linear
layers under a quantization plan.

Each quantized checkpoint is compared with its de-quantized float twin (quant_checkpoints.py), reference
kernels, greedy tokens equal; int8 on load with a float model holding each linear's q * scale.
"""

import pytest
import torch
from transformers import AutoConfig
from tiny_hf_families import make_family_checkpoint
from tiny_models import make_checkpoint

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.layers.quantization import (QuantizationError, QuantPlan, formats_read,
                                                          plan_quantization)
from quant_checkpoints import write_awq, write_gptq

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then"]
MODEL_FILES = ("opt", "phi", "mixtral", "qwen3", "gpt2", "falcon", "falcon_mq", "falcon_serial")
BACKEND = ("gemma", "stablelm", "bloom")

_paths: dict = {}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family name -> its tiny float checkpoint, built once."""
    def build(name):
        if name not in _paths:
            make = make_checkpoint if name in MODEL_FILES else make_family_checkpoint
            _paths[name] = make(tmp_path_factory.mktemp(name), name)
        return _paths[name]
    return build


def _run(path, **kw):
    """(greedy tokens, the model's linear layers, its model class name)."""
    from kubellm.runtime.executor.layers.linear import LinearBase

    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=64, session_len=128, **kw)
    engine = LLMEngine(path, config, show_progress=False)
    try:
        gens = [GenerationConfig(max_new_tokens=16, ignore_eos=True)] * len(PROMPTS)
        tokens = [s.token_ids for s in engine.generate(PROMPTS, gens)]
        model = engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, LinearBase) or type(m).__name__ == "FalconQKV"]
        return tokens, linears, type(model).__name__
    finally:
        engine.destroy()


def _decoder_linears(state: dict) -> list[str]:
    """The checkpoint's decoder linear weights: 2-D tensors inside a numbered layer, but Mixtral's router."""
    return [n for n, w in state.items() if w.dim() == 2 and any(p.isdigit() for p in n.split("."))
            and not n.endswith(".gate.weight")]


# -- stored formats: AWQ, GPTQ with act-order ------------------------------------------------------------
@pytest.mark.parametrize("name", ["opt", "phi", "mixtral", "qwen3", "gemma", "stablelm"])
@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order"])
def test_stored_formats_give_the_dequantized_reference_tokens(family, name, fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    src = family(name)
    write = write_awq if fmt == "awq" else lambda s, o, group_size: write_gptq(s, o, group_size, desc_act=True)
    checkpoint, reference = write(src, tmp_path, group_size=16)
    tokens, linears, cls = _run(checkpoint)
    assert tokens == _run(reference)[0]
    assert (cls == "TransformersForCausalLM") == (name in BACKEND)
    # every decoder linear holds the checkpoint's packed int4 rows; none kept a float copy
    assert linears and all(m.quant_method is not None and m.quantized.form == "int4" for m in linears)
    assert all(not hasattr(m, "weight") for m in linears)


# -- int8 made on load, every family --------------------------------------------------------------------
def _int8_reference(src, dst, conv1d: bool):
    """A float checkpoint whose decoder linears hold their int8 rows de-quantized (q * scale per output
    channel); GPT-2's Conv1D weights are [in, out], so their channels are columns."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kubellm.kernels.quant import dequantize_int8, quantize_int8

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    names = _decoder_linears(state)
    for n in names:
        w = state[n].t() if conv1d else state[n]
        w = dequantize_int8(*quantize_int8(w))
        state[n] = (w.t() if conv1d else w).contiguous()
    save_file(state, str(dst / "model.safetensors"))
    return dst, len(names)


@pytest.mark.parametrize("name", MODEL_FILES + BACKEND)
def test_int8_on_load_equals_its_dequantized_weights(family, name, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    src = family(name)
    reference, count = _int8_reference(src, tmp_path / "reference", conv1d=name == "gpt2")
    tokens, linears, _ = _run(src, quantization="int8")
    assert tokens == _run(reference)[0]
    held = [m.quantized for m in linears if getattr(m, "quantized", None) is not None]
    assert held and all(q.form == "int8" and q.qweight.dtype == torch.int8 for q in held)
    # one int8 weight per checkpoint linear, where kubellm's model files fuse q / k / v and Mixtral's w1 / w3
    fused_per_layer = {"opt": 2, "phi": 2, "qwen3": 2 + 1, "mixtral": 2 + 4}.get(name, 0)   # Mixtral: 4 experts
    layers = AutoConfig.from_pretrained(src).num_hidden_layers
    assert len(held) == count - fused_per_layer * layers


def test_int8_on_load_keeps_no_float_copy_of_falcons_fused_rows(family):
    _, linears, _ = _run(family("falcon"), quantization="int8")
    qkv = [m for m in linears if type(m).__name__ == "FalconQKV"]
    assert qkv and all(m.weight.numel() == 0 and m.quantized is not None for m in qkv)


def test_cpu_path_of_a_backend_family_holds_int4pack_and_stays_close(family, tmp_path):
    """Gemma on the transformers backend with the CPU kernels: bf16 activations into int4pack."""
    checkpoint, reference = write_awq(family("gemma"), tmp_path, group_size=32)
    from kubellm.runtime.executor.step import SeqChunk, StepBatch

    def logits(path):
        engine = LLMEngine(path, EngineConfig(device="cpu", block_size=4, num_kv_blocks=64, session_len=128),
                           show_progress=False)
        try:
            batch = StepBatch(chunks=[SeqChunk(start=0, token_ids=[5, 17, 42, 100, 7], block_table=list(range(4)),
                                               samples=True)])
            forms = {m.form for m in engine.runner.model.modules() if type(m).__name__ == "QuantizedWeight"}
            return engine.runner.forward(batch)[0].float(), forms
        finally:
            engine.destroy()

    got, forms = logits(checkpoint)
    want, _ = logits(reference)
    assert forms == {"int4_cpu"}
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


# -- what each family reads, and refusals naming the field -------------------------------------------------
@pytest.mark.parametrize("model_type,impl,reads", [
    ("llama", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8", "gguf")),
    ("qwen2", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8", "gguf")),
    ("mixtral", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8")),
    ("opt", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8")),
    ("gpt2", "auto", ("float",)),
    ("falcon", "auto", ("float",)),
    ("qwen3", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8", "gguf")),
    ("gemma", "auto", ("float", "awq", "gptq", "compressed-tensors", "fp8")),
    ("llama", "transformers", ("float", "awq", "gptq", "compressed-tensors", "fp8")),
])
def test_formats_each_family_reads(model_type, impl, reads):
    assert formats_read(model_type, impl) == reads


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def test_plans_beyond_the_llama_family():
    assert plan_quantization(None, AWQ, "safetensors", "gemma") == QuantPlan("awq", "native", 4, 128)
    assert plan_quantization("int8", None, "safetensors", "gpt2") == QuantPlan("float", "int8")
    assert plan_quantization("int8", None, "safetensors", "llama", "transformers") == QuantPlan("float", "int8")


@pytest.mark.parametrize("requested,qc,fmt,model_type,impl,message", [
    (None, AWQ, "safetensors", "gpt2", "auto", r"awq checkpoints cannot be served for 'gpt2' models; they are read "
                                               r"for llama, mistral, mixtral, opt, phi, qwen2, qwen3 models and families "
                                               r"run on the transformers backend"),
    (None, AWQ, "safetensors", "falcon", "auto", r"awq checkpoints cannot be served for 'falcon'"),
    (None, None, "gguf", "phi", "auto", r"gguf checkpoints cannot be served for 'phi' models; they are read for "
                                        r"llama, mistral, qwen2, qwen3 models: serve it in float"),
    (None, None, "gguf", "llama", "transformers", r"gguf checkpoints cannot be served on the transformers backend"),
])
def test_unreadable_family_and_format_pairs_are_refused(requested, qc, fmt, model_type, impl, message):
    with pytest.raises(QuantizationError, match=message):
        plan_quantization(requested, qc, fmt, model_type, impl)


def test_linears_the_checkpoint_keeps_float_are_served_float(family, tmp_path, monkeypatch):
    """Bloom's query_key_value, dense_h_to_4h and dense_4h_to_h are not among the test writer's linears, so
    its AWQ copy quantizes only `dense`, as AutoAWQ's modules_to_not_convert would keep the rest float: those
    layers are served float, exactly, and `dense` as int4."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    checkpoint, reference = write_awq(family("bloom"), tmp_path, group_size=16)
    tokens, linears, _ = _run(checkpoint)
    assert tokens == _run(reference)[0]
    forms = {m.quantized.form for m in linears if m.input_size == m.output_size}   # dense: 64 -> 64
    assert forms == {"int4"} and {m.quantized.form for m in linears if m.input_size != m.output_size} == {"float"}


@pytest.mark.parametrize("dropped", ["model.layers.1.self_attn.o_proj.scales", "model.layers.0.input_layernorm.weight"])
def test_a_checkpoint_missing_a_part_still_names_it(tiny_llama, tmp_path, dropped):
    """Layers complete from a float weight count as loaded; an incomplete one, or a missing float tensor, does not."""
    from safetensors.torch import load_file, save_file

    checkpoint, _ = write_awq(tiny_llama, tmp_path, group_size=16)
    state = load_file(str(checkpoint / "model.safetensors"))
    del state[dropped]
    save_file(state, str(checkpoint / "model.safetensors"))
    layer = dropped.rsplit(".", 1)[0]
    with pytest.raises(ValueError, match=rf"lacks .*{layer.replace('.', '[.]')}"):
        _run(checkpoint)

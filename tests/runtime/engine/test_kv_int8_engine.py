"""The engine on an int8 KV cache (kv_cache_dtype='int8', LMDeploy's quant_policy=8): tokens and logprobs
against transformers (float) within int8's error, the same tokens on the Triton kernels as on the references,
swapping (eviction='copy') and the prefix cache on int8 blocks, and about 4x the float32 blocks in the
same memory."""

import pytest
import torch
from parity import NEW_TOKENS, PROMPTS, encode, engine_for
from tiny_models import hf_greedy

from kubellm.runtime.config import EngineConfig, GenerationConfig

pytestmark = pytest.mark.model


def _run(engine, prompts):
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0)
    return engine.generate(prompts, [gen] * len(prompts))


def _fake_quantized_float_cache(monkeypatch):
    """The float cache holding what the int8 cache would give back: keys and values quantized and dequantized
    as they are written (and where a whole-prompt chunk attends to its own fresh ones)."""
    from kubellm.kernels import attention, kv_int8

    def round_trip(x):
        return kv_int8.dequantize(*kv_int8.quantize(x), x.dtype)

    write, prefill = attention.write_kv_cache, attention.paged_prefill_attention
    monkeypatch.setattr(attention, "write_kv_cache",
                        lambda k, v, kc, vc, slots: write(round_trip(k), round_trip(v), kc, vc, slots))
    monkeypatch.setattr(attention, "paged_prefill_attention",
                        lambda q, k, v, *rest: prefill(q, round_trip(k), round_trip(v), *rest))


@pytest.fixture(params=["llama", "qwen2", "bloom"])
def int8_model(request, tmp_path_factory):
    """A model file's families, and Bloom through the Transformers backend (its ALiBi attention reads the
    int8 cache through its own gather)."""
    if request.param == "bloom":
        from tiny_hf_families import make_family_checkpoint

        return make_family_checkpoint(tmp_path_factory.mktemp("bloom"), "bloom")
    return request.getfixturevalue(f"tiny_{request.param}")


def test_int8_cache_is_the_float_cache_of_its_dequantized_values(int8_model, monkeypatch):
    tiny_model = int8_model
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    engine = engine_for(tiny_model, kv_cache_dtype="int8")
    try:
        layer = engine.runner.attention_layers[0]
        assert layer.k_cache.dtype == torch.int8 and layer.k_scale.shape == layer.k_cache.shape[:3]
        prompts = encode(engine, PROMPTS)
        int8 = _run(engine, prompts)
    finally:
        engine.destroy()
    _fake_quantized_float_cache(monkeypatch)
    engine = engine_for(tiny_model)
    try:
        dequantized = _run(engine, prompts)
    finally:
        engine.destroy()
    for a, b in zip(int8, dequantized):
        assert a.generated_ids == b.generated_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # and int8 really differs from the float cache: the comparison above is not float against float
    float_cache = hf_greedy(tiny_model, prompts, NEW_TOKENS)
    first = [r["logprobs"][0] for r in float_cache]
    assert [s.logprobs[0] for s in int8] != pytest.approx(first, abs=1e-6)


def test_triton_kernels_give_the_references_tokens(tiny_llama, monkeypatch):
    results = {}
    for kernels in ("reference", "triton"):
        monkeypatch.setenv("KUBELLM_KERNELS", kernels)
        engine = engine_for(tiny_llama, kv_cache_dtype="int8")
        try:
            results[kernels] = [s.generated_ids for s in _run(engine, encode(engine, PROMPTS[:3]))]
        finally:
            engine.destroy()
    assert results["triton"] == results["reference"]


def test_swapped_and_prefix_cached_int8_blocks_keep_their_scales(tiny_llama):
    prompts_text = [PROMPTS[0] * 3, PROMPTS[2] * 2, PROMPTS[4] * 3]
    expected = None
    for options in ({}, {"eviction": "copy", "num_cpu_blocks": 64, "num_kv_blocks": 40}):
        engine = engine_for(tiny_llama, kv_cache_dtype="int8", max_batch_size=3, **options)
        try:
            prompts = encode(engine, prompts_text)
            gen = GenerationConfig(max_new_tokens=40, ignore_eos=True)
            tokens = [s.generated_ids for s in engine.generate(prompts, [gen] * 3)]
            if options:   # preempted and swapped back: the int8 blocks came back with their scales
                assert engine.block_manager.swapped_in_blocks > 0
            else:   # a roomy cache keeps the first prompt's blocks: served from the prefix cache
                again = engine.generate(prompts[:1], [gen])[0]
                assert again.num_cached_prompt_tokens > 0 and again.generated_ids == tokens[0]
        finally:
            engine.destroy()
        expected = expected or tokens
        assert tokens == expected


def test_int8_cache_holds_about_four_times_the_float32_blocks(tiny_llama):
    blocks = {}
    for dtype in ("auto", "int8"):
        engine = engine_for(tiny_llama, kv_cache_dtype=dtype, num_kv_blocks=None, cpu_memory_gb=0.001,
                            max_batch_size=64)
        try:
            blocks[dtype] = engine.block_manager.num_blocks
            head_dim = engine.runner.attention_layers[0].head_dim
        finally:
            engine.destroy()
    assert blocks["int8"] / blocks["auto"] == pytest.approx(4 * head_dim / (head_dim + 4), rel=0.02)


def test_lmdeploy_quant_policy_8_is_the_int8_cache():
    from kubellm import PytorchEngineConfig, TurbomindEngineConfig
    from kubellm.runtime.config import ConfigError
    from kubellm.runtime.lmdeploy_compat import backend_options

    for config_class in (PytorchEngineConfig, TurbomindEngineConfig):
        assert backend_options(config_class(quant_policy=8)).engine == {"kv_cache_dtype": "int8"}
        EngineConfig.build(**backend_options(config_class(quant_policy=8)).engine)
        with pytest.raises(ConfigError, match=r"quant_policy: 4: an int4 KV cache .*quant_policy=8"):
            backend_options(config_class(quant_policy=4))

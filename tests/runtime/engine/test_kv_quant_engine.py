"""The engine on a quantized KV cache (kv_cache_dtype='int8' / 'int4', LMDeploy's quant_policy=8 / 4): tokens
and logprobs equal to the float cache holding the dequantized values, the keys' rotation changing no float
result, the same tokens on the Triton kernels as on
the references, swapping (eviction='copy') and the prefix cache on quantized blocks, and the blocks gained in the
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


def _fake_quantized_float_cache(monkeypatch, kind):
    """The float cache holding what the int8 / int4 cache would give back: keys and values quantized and
    dequantized as they are written (and where a whole-prompt chunk attends to its own fresh ones)."""
    from kubellm.kernels import attention, kv_int4, kv_int8

    kv = {"int8": kv_int8, "int4": kv_int4}[kind]

    def round_trip(x):
        return kv.dequantize(*kv.quantize(x), x.dtype)

    write, prefill = attention.write_kv_cache, attention.paged_prefill_attention
    monkeypatch.setattr(attention, "write_kv_cache",
                        lambda k, v, kc, vc, slots: write(round_trip(k), round_trip(v), kc, vc, slots))
    monkeypatch.setattr(attention, "paged_prefill_attention",
                        lambda q, k, v, *rest: prefill(q, round_trip(k), round_trip(v), *rest))


def _rotate_keys(engine):
    """Give a float cache's layers the rotation a quantized cache's have (kernels/key_rotation.py)."""
    from kubellm.kernels import key_rotation

    for layer in engine.runner.attention_layers:
        layer.key_rotation = key_rotation.rotation(layer.head_dim)


@pytest.fixture(params=[("llama", "int8"), ("qwen2", "int8"), ("bloom", "int8"), ("llama", "int4"), ("bloom", "int4")],
                ids=lambda p: "-".join(p))
def quantized_model(request, tmp_path_factory):
    """(checkpoint, kv_cache_dtype): a model file's families, and Bloom through the Transformers backend (its
    ALiBi attention reads the quantized cache through its own gather)."""
    family, kind = request.param
    if family == "bloom":
        from tiny_hf_families import make_family_checkpoint

        return make_family_checkpoint(tmp_path_factory.mktemp("bloom"), "bloom"), kind
    return request.getfixturevalue(f"tiny_{family}"), kind


CACHE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


def test_quantized_cache_is_the_float_cache_of_its_dequantized_values(quantized_model, monkeypatch):
    tiny_model, kind = quantized_model
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    engine = engine_for(tiny_model, kv_cache_dtype=kind)
    try:
        layer = engine.runner.attention_layers[0]
        width = layer.head_dim // 2 if kind == "int4" else layer.head_dim
        assert layer.k_cache.dtype == CACHE_DTYPES[kind] and layer.k_cache.shape[-1] == width
        assert layer.k_scale.shape[:3] == layer.k_cache.shape[:3]
        assert layer.key_rotation.shape == (layer.head_dim, layer.head_dim)
        prompts = encode(engine, PROMPTS)
        quantized = _run(engine, prompts)
    finally:
        engine.destroy()
    _fake_quantized_float_cache(monkeypatch, kind)
    engine = engine_for(tiny_model)
    try:
        assert engine.runner.attention_layers[0].key_rotation is None   # a float cache rotates nothing
        _rotate_keys(engine)   # (the same float ops as the quantized engine's, so equal to 1e-5)
        dequantized = _run(engine, prompts)
    finally:
        engine.destroy()
    for a, b in zip(quantized, dequantized):
        assert a.generated_ids == b.generated_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # and the quantized cache really differs from the float one: the comparison above is not float against float
    float_cache = hf_greedy(tiny_model, prompts, NEW_TOKENS)
    first = [r["logprobs"][0] for r in float_cache]
    assert [s.logprobs[0] for s in quantized] != pytest.approx(first, abs=1e-6)


def test_rotated_keys_change_no_float_result(tiny_llama, monkeypatch):
    """Queries rotated as the keys are: every score, and so every token and logprob, as without the rotation."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    results = []
    for rotated in (False, True):
        engine = engine_for(tiny_llama)
        try:
            if rotated:
                _rotate_keys(engine)
            results.append(_run(engine, encode(engine, PROMPTS)))
        finally:
            engine.destroy()
    for a, b in zip(*results):
        assert a.generated_ids == b.generated_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_triton_kernels_give_the_references_tokens(tiny_llama, monkeypatch, kind):
    results = {}
    for kernels in ("reference", "triton"):
        monkeypatch.setenv("KUBELLM_KERNELS", kernels)
        engine = engine_for(tiny_llama, kv_cache_dtype=kind)
        try:
            results[kernels] = [s.generated_ids for s in _run(engine, encode(engine, PROMPTS[:3]))]
        finally:
            engine.destroy()
    assert results["triton"] == results["reference"]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_swapped_and_prefix_cached_quantized_blocks_keep_their_scales(tiny_llama, kind):
    prompts_text = [PROMPTS[0] * 3, PROMPTS[2] * 2, PROMPTS[4] * 3]
    expected = None
    for options in ({}, {"eviction": "copy", "num_cpu_blocks": 64, "num_kv_blocks": 40}):
        engine = engine_for(tiny_llama, kv_cache_dtype=kind, max_batch_size=3, **options)
        try:
            prompts = encode(engine, prompts_text)
            gen = GenerationConfig(max_new_tokens=40, ignore_eos=True)
            tokens = [s.generated_ids for s in engine.generate(prompts, [gen] * 3)]
            if options:   # preempted and swapped back: the quantized blocks came back with their scales
                assert engine.block_manager.swapped_in_blocks > 0
            else:   # a roomy cache keeps the first prompt's blocks: served from the prefix cache
                again = engine.generate(prompts[:1], [gen])[0]
                assert again.num_cached_prompt_tokens > 0 and again.generated_ids == tokens[0]
        finally:
            engine.destroy()
        expected = expected or tokens
        assert tokens == expected


def test_quantized_caches_hold_more_blocks_in_the_same_memory(tiny_llama):
    """int8: D + 4 bytes per token and head against float32's 4·D; int4: D / 2 + 8."""
    blocks = {}
    for dtype in ("auto", "int8", "int4"):
        engine = engine_for(tiny_llama, kv_cache_dtype=dtype, num_kv_blocks=None, cpu_memory_gb=0.001,
                            max_batch_size=64)
        try:
            blocks[dtype] = engine.block_manager.num_blocks
            head_dim = engine.runner.attention_layers[0].head_dim
        finally:
            engine.destroy()
    assert blocks["int8"] / blocks["auto"] == pytest.approx(4 * head_dim / (head_dim + 4), rel=0.02)
    assert blocks["int4"] / blocks["auto"] == pytest.approx(4 * head_dim / (head_dim / 2 + 8), rel=0.02)


def test_int4_cache_refuses_an_odd_head_size_by_name():
    from types import SimpleNamespace

    from kubellm.runtime.executor.model_runner import ModelRunner

    runner = SimpleNamespace(config=EngineConfig.build(kv_cache_dtype="int4"), dtype=torch.bfloat16)
    assert ModelRunner.kv_layout(runner, 64) == (torch.uint8, 32, (2,), 40)
    with pytest.raises(ValueError, match=r"kv_cache_dtype: int4 .* even head size; this model's is 63.*'int8'"):
        ModelRunner.kv_layout(runner, 63)


def test_lmdeploy_quant_policy_is_the_quantized_cache():
    from kubellm import PytorchEngineConfig, TurbomindEngineConfig
    from kubellm.runtime.lmdeploy_compat import backend_options

    for config_class in (PytorchEngineConfig, TurbomindEngineConfig):
        for policy, kind in ((8, "int8"), (4, "int4")):
            assert backend_options(config_class(quant_policy=policy)).engine == {"kv_cache_dtype": kind}
            EngineConfig.build(**backend_options(config_class(quant_policy=policy)).engine)
        assert backend_options(config_class(quant_policy=0)).engine == {}

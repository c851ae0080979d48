"""LoRA adapters against peft: each adapter merged into a transformers model (merge_and_unload) gives the
tokens kubellm gives for that adapter's requests, in one continuous batch mixing several adapters and the
base model; adapters are read from peft's files, checked against the model and refused by name."""

import json
import shutil

import pytest
from lora_adapters import make_adapter, merged_model
from parity import NEAR_TIE, PROMPTS, encode, engine_for
from tiny_models import greedy_with, hf_greedy, make_checkpoint

from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.errors import RequestError
from kubellm.runtime.executor.lora import AdapterError

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_llama, root / "alpha", rank=4, seed=1),
        # another rank, other targets, rsLoRA scaling: the stack must mix them
        "beta": make_adapter(tiny_llama, root / "beta", rank=8, alpha=16, seed=2, use_rslora=True,
                             targets=("q_proj", "v_proj", "down_proj")),
    }


def _matches(seq, ref) -> None:
    ties = [t for t, gap in enumerate(ref["top2_gaps"]) if gap < NEAR_TIE]
    upto = ties[0] if ties else len(ref["token_ids"])
    assert seq.generated_ids[:upto] == ref["token_ids"][:upto]


def _mixed_batch(engine, prompts):
    """Every prompt with each adapter and with none, interleaved, in one batch."""
    names = [None, "alpha", "beta"]
    jobs = [(p, name) for p in prompts for name in names]
    gens = [GenerationConfig(max_new_tokens=NEW_TOKENS, adapter=name) for _, name in jobs]
    seqs = engine.generate([p for p, _ in jobs], gens)
    return {(tuple(p), name): seq for (p, name), seq in zip(jobs, seqs)}


def test_mixed_batch_matches_peft_merged_models(tiny_llama, adapters):
    engine = engine_for(tiny_llama, adapters={k: str(v) for k, v in adapters.items()}, max_num_batched_tokens=24)
    try:
        prompts = encode(engine, PROMPTS)
        results = _mixed_batch(engine, prompts)
    finally:
        engine.destroy()
    refs = {None: hf_greedy(tiny_llama, prompts, NEW_TOKENS)}
    for name, path in adapters.items():
        refs[name] = greedy_with(merged_model(tiny_llama, path), prompts, NEW_TOKENS)
    for name, ref_list in refs.items():
        for prompt, ref in zip(prompts, ref_list):
            _matches(results[(tuple(prompt), name)], ref)
    # The adapters change the model: otherwise the comparison above proves nothing.
    for name in adapters:
        assert [results[(tuple(p), name)].generated_ids for p in prompts] != \
               [results[(tuple(p), None)].generated_ids for p in prompts]


def test_prefix_cache_is_kept_apart_per_adapter(tiny_llama, adapters):
    engine = engine_for(tiny_llama, adapters={"alpha": str(adapters["alpha"])})
    try:
        prompt = encode(engine, [PROMPTS[0] * 2])[0]
        base = engine.generate([prompt], [GenerationConfig(max_new_tokens=8)])[0]
        with_adapter = engine.generate([prompt], [GenerationConfig(max_new_tokens=8, adapter="alpha")])[0]
        assert with_adapter.num_cached_prompt_tokens == 0   # the base model's blocks hold other keys and values
        again = engine.generate([prompt], [GenerationConfig(max_new_tokens=8, adapter="alpha")])[0]
        assert again.num_cached_prompt_tokens > 0 and again.generated_ids == with_adapter.generated_ids
        assert base.generated_ids != with_adapter.generated_ids
    finally:
        engine.destroy()


def test_unknown_adapter_is_refused_by_name(tiny_llama, adapters):
    engine = engine_for(tiny_llama, adapters={"alpha": str(adapters["alpha"])})
    try:
        with pytest.raises(RequestError, match=r"adapter: 'gamma' is not served here \(adapters: alpha\)"):
            engine.add_request([1, 2, 3], GenerationConfig(adapter="gamma"))
    finally:
        engine.destroy()


def test_adapter_for_another_base_model_is_refused(tmp_path, adapters):
    other = make_checkpoint(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=160)
    # Its base model is on disk here: its config says it is another model.
    with pytest.raises(AdapterError, match=r"adapters\['alpha'\]: it was trained for '.*tiny_llama.*', whose "
                                           r"hidden_size is 64, not this model's 96"):
        engine_for(other, adapters={"alpha": str(adapters["alpha"])})
    # Its base model is a Hub name: the matrices' shapes say so.
    hub = tmp_path / "hub"
    shutil.copytree(adapters["alpha"], hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/small-llama"}))
    with pytest.raises(AdapterError, match=r"adapters\['hub'\]: model.layers.0.* is \[\d+ x \d+\] in this model "
                                           r"\(LlamaForCausalLM\) but .* trained for 'org/small-llama'"):
        engine_for(other, adapters={"hub": str(hub)})


@pytest.mark.parametrize("edit, message", [
    ({"use_dora": True}, r"use_dora is set"),
    ({"bias": "all"}, r"bias='all'"),
    ({"peft_type": "IA3"}, r"only LoRA"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save is set"),
])
def test_unsupported_adapter_options_are_refused(tiny_llama, adapters, tmp_path, edit, message):
    bad = tmp_path / "bad"
    shutil.copytree(adapters["alpha"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterError, match=message):
        engine_for(tiny_llama, adapters={"bad": str(bad)})


def test_rank_above_max_lora_rank_is_refused(tiny_llama, adapters):
    with pytest.raises(AdapterError, match=r"rank 8, more than max_lora_rank \(4\)"):
        engine_for(tiny_llama, adapters={"beta": str(adapters["beta"])}, max_lora_rank=4)


def test_a_directory_without_adapter_files_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"adapter 'none': .* holds no adapter_config.json"):
        engine_for(tiny_llama, adapters={"none": str(tmp_path)})


# Each family's own projection names (what peft users target), including GPT-2's Conv1D (fan_in_fan_out)
# and fused c_attn / Falcon's fused query_key_value, whose shards the layers' weight loaders place.
FAMILY_TARGETS = {
    "opt": ("q_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "phi": ("q_proj", "k_proj", "dense", "fc1", "fc2"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),   # attention: LoRA on experts is refused
}


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_families_match_peft(family, tmp_path):
    base = make_checkpoint(tmp_path / family, family, tie_word_embeddings=family in ("opt", "gpt2", "falcon"))
    options = {"fan_in_fan_out": True} if family == "gpt2" else {}
    adapter = make_adapter(base, tmp_path / "adapter", targets=FAMILY_TARGETS[family], seed=3, **options)
    engine = engine_for(base, adapters={"a": str(adapter)})
    try:
        prompts = encode(engine, PROMPTS[:3])
        gens = [GenerationConfig(max_new_tokens=NEW_TOKENS, adapter=name) for name in ("a", None, "a")]
        seqs = engine.generate(prompts, gens)
    finally:
        engine.destroy()
    ref = greedy_with(merged_model(base, adapter), prompts, NEW_TOKENS)
    _matches(seqs[0], ref[0])
    _matches(seqs[2], ref[2])
    assert seqs[1].generated_ids != seqs[0].generated_ids or prompts[1] == prompts[0]


def test_lora_on_moe_experts_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base = make_checkpoint(tmp_path / "mixtral", "mixtral")
    adapter = make_adapter(base, tmp_path / "adapter", targets=("q_proj",), seed=3)
    # peft cannot target one expert projection of transformers 5's fused experts; a checkpoint of the
    # older per-expert layout can: its key names expert 0's w1.
    tensors = load_file(adapter / "adapter_model.safetensors")
    expert = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1"
    tensors[f"{expert}.lora_A.weight"], tensors[f"{expert}.lora_B.weight"] = torch.zeros(4, 64), torch.zeros(128, 4)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapters\['a'\]: it targets .*experts.*w1.* no linear layer"):
        engine_for(base, adapters={"a": str(adapter)})


def test_the_transformers_backend_gives_the_model_files_tokens(tiny_llama, adapters):
    results = {}
    for impl in ("kubellm", "transformers"):
        engine = engine_for(tiny_llama, adapters={k: str(v) for k, v in adapters.items()}, model_impl=impl)
        try:
            results[impl] = {k: s.generated_ids for k, s in _mixed_batch(engine, encode(engine, PROMPTS[:3])).items()}
        finally:
            engine.destroy()
    assert results["transformers"] == results["kubellm"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", [{"tensor_parallel": 2}, {"pipeline_parallel": 2}], ids=["tp2", "pp2"])
def test_parallel_ranks_give_one_process_tokens(tiny_llama, adapters, parallel):
    served = {k: str(v) for k, v in adapters.items()}
    results = {}
    for name, options in (("one", {}), ("group", parallel)):
        engine = engine_for(tiny_llama, adapters=served, device="cpu", **options)
        try:
            results[name] = {k: s.generated_ids for k, s in _mixed_batch(engine, encode(engine, PROMPTS[:3])).items()}
        finally:
            engine.destroy()
    assert results["group"] == results["one"]


def test_pipeline_takes_adapters_as_lmdeploy_and_kubellm_spell_them(tiny_llama, adapters):
    from kubellm import GenerationConfig as Gen
    from kubellm import PytorchEngineConfig, pipeline

    served = {k: str(v) for k, v in adapters.items()}
    prompt = PROMPTS[0]
    pipe = pipeline(tiny_llama, backend_config=PytorchEngineConfig(adapters=served), show_progress=False,
                    dtype="float32")
    try:
        lmdeploy_style = pipe(prompt, Gen(max_new_tokens=NEW_TOKENS), adapter_name="alpha")[0].token_ids
        kubellm_style = pipe(prompt, max_new_tokens=NEW_TOKENS, adapter="alpha")[0].token_ids
        base = pipe(prompt, max_new_tokens=NEW_TOKENS)[0].token_ids
    finally:
        pipe.destroy()
    ref = greedy_with(merged_model(tiny_llama, adapters["alpha"]),
                      [pipe.tokenizer.hf.encode(prompt)], NEW_TOKENS)[0]["token_ids"]
    assert lmdeploy_style == kubellm_style == ref[:len(lmdeploy_style)] and base != lmdeploy_style


def _int8_rounded_peft(base, adapter):
    """The reference for an adapter on an int8 base: transformers' model with every decoder linear rounded to int8
    per output channel (kernels/quant.py's quantize_int8, what quantization='int8' does on load), then the adapter
    applied unmerged by peft, so its delta stays float as kubellm's does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubellm.kernels import quant

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(quant.dequantize_int8(*quant.quantize_int8(module.weight)))
    return PeftModel.from_pretrained(model, adapter).eval()


def _alpha_and_base(path, adapter, **options):
    """(the quantized layers' forms, prompts, the sequences under adapter "alpha", the same prompts' base-model
    sequences), from one batch."""
    engine = engine_for(path, adapters={"alpha": str(adapter)}, **options)
    try:
        prompts = encode(engine, PROMPTS)
        seqs = engine.generate(prompts * 2, [GenerationConfig(max_new_tokens=NEW_TOKENS, adapter=name)
                                             for name in ["alpha"] * len(prompts) + [None] * len(prompts)])
        forms = {m.form for m in engine.runner.model.modules() if type(m).__name__ == "QuantizedWeight"}
        return forms, prompts, seqs[:len(prompts)], seqs[len(prompts):]
    finally:
        engine.destroy()


def test_adapter_on_an_int8_base_matches_peft_on_the_rounded_weights(tiny_llama, adapters, monkeypatch):
    """A quantized base keeps no float weight: the adapter is cut by the layer's geometry and added to the
    quantized product. Reference kernels: the CPU int8 path multiplies in bf16, the reference in float32."""
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    forms, prompts, alpha, base = _alpha_and_base(tiny_llama, adapters["alpha"], quantization="int8")
    assert forms == {"int8"}
    refs = greedy_with(_int8_rounded_peft(tiny_llama, adapters["alpha"]), prompts, NEW_TOKENS)
    for seq, ref in zip(alpha, refs):
        _matches(seq, ref)
    assert [s.generated_ids for s in alpha] != [s.generated_ids for s in base]


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_adapter_on_an_awq_base_matches_peft_merged_into_its_dequantized_weights(tiny_llama, adapters, tmp_path,
                                                                                 monkeypatch, kernels):
    """AWQ 4-bit linears (packed int32 placeholders, no float weight at all) with an adapter. The reference
    kernels compute in float32, so the tokens are peft's merged into the de-quantized checkpoint; the CPU path
    (int4pack, bf16 activations) must run the same adapter and change the tokens the same way at first."""
    from quant_checkpoints import write_awq

    monkeypatch.setenv("KUBELLM_KERNELS", kernels)
    awq, dequantized = write_awq(tiny_llama, tmp_path)
    forms, prompts, alpha, base = _alpha_and_base(awq, adapters["alpha"])
    assert forms == ({"int4"} if kernels == "reference" else {"int4_cpu"})
    refs = greedy_with(merged_model(dequantized, adapters["alpha"]), prompts, NEW_TOKENS)
    if kernels == "reference":
        for seq, ref in zip(alpha, refs):
            _matches(seq, ref)
    else:   # bf16 activations: the first tokens, where the paths have not yet parted
        assert sum(seq.generated_ids[0] == ref["token_ids"][0] for seq, ref in zip(alpha, refs)) >= len(refs) - 1
    assert [s.generated_ids for s in alpha] != [s.generated_ids for s in base]

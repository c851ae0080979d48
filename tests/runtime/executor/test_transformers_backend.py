"""The Transformers backend: families without a kubellm model file run on transformers' modeling code with
kubellm's paged KV cache. Greedy tokens equal transformers' under continuous batching (prompts of different
lengths, later ones arriving mid-run, chunked prefills beside decodes), with prefix-cache hits and with
preemption; a family that has a model file gives the file's tokens when forced through the backend; pipeline
and tensor parallel; and what cannot run says why."""

from types import SimpleNamespace

import pytest
from parity import LOGPROB_ATOL, NEW_TOKENS, PROMPTS, assert_matches_hf, encode, engine_for, run
from tiny_hf_families import BACKEND_FAMILIES, make_family_checkpoint

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.rank_group import param_bytes

pytest.importorskip("transformers")

_paths: dict = {}


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family name -> its tiny checkpoint, built once per session."""
    def build(family):
        if family not in _paths:
            _paths[family] = make_family_checkpoint(tmp_path_factory.mktemp(family), family)
        return _paths[family]
    return build


def _backend():
    from kubellm.runtime.executor.models.transformers_backend import TransformersForCausalLM
    return TransformersForCausalLM


def run_staggered(engine, ids):
    """Two prompts at once, then one more every other step while the others decode. Returns the sequences
    and how many steps mixed a prefill chunk with decodes."""
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0)
    mixed = 0
    original = engine.scheduler.schedule

    def spying_schedule():
        nonlocal mixed
        scheduled = original()
        kinds = {item.num_tokens == 1 and item.seq.num_computed_tokens > 0 for item in scheduled}
        mixed += kinds == {True, False}
        return scheduled

    engine.scheduler.schedule = spying_schedule
    seqs = [engine.add_request(prompt, gen) for prompt in ids[:2]]
    waiting, steps = list(ids[2:]), 0
    while engine.has_unfinished() or waiting:
        if waiting and steps % 2 == 1:
            seqs.append(engine.add_request(waiting.pop(0), gen))
        engine.step()
        steps += 1
    return seqs, mixed


@pytest.mark.model
@pytest.mark.parametrize("family", BACKEND_FAMILIES)
def test_family_matches_transformers_under_continuous_batching(family_checkpoint, family):
    """Bloom (ALiBi), GPT-Neo (unscaled scores, a local layer of window 8), GPT-J and CodeGen (interleaved
    partial rotary), Gemma (one KV head, scaled embedding), Gemma 2 (soft-capped scores and logits, a
    sliding layer), StableLM (partial rotary, QKV bias), GPT-NeoX (checkpoint names renamed as transformers
    renames them)."""
    path = family_checkpoint(family)
    engine = engine_for(path, max_num_batched_tokens=16)
    assert isinstance(engine.runner.model, _backend())
    ids = encode(engine, PROMPTS)
    assert max(map(len, ids)) > 16, "a prompt must be longer than the step budget to be chunked"
    seqs, mixed = run_staggered(engine, ids)
    assert mixed > 0, "no step mixed a prefill chunk with decodes"
    assert_matches_hf(path, ids, seqs)


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_a_family_with_a_model_file_forced_through_the_backend_gives_the_files_tokens(arch, request, tmp_path):
    """Llama, Qwen2 (QKV bias) and OPT (decoder layers nested in model.decoder, learned positions)."""
    from tiny_models import make_checkpoint

    from kubellm.runtime.executor.models import ARCHITECTURES

    path = request.getfixturevalue(f"tiny_{arch}") if arch != "opt" else make_checkpoint(tmp_path / "opt", "opt")
    ids = None
    results = {}
    for impl in ("auto", "transformers"):
        engine = engine_for(path, max_num_batched_tokens=16, model_impl=impl)
        ids = ids or encode(engine, PROMPTS)
        results[impl], _ = run_staggered(engine, ids)
        file_class = ARCHITECTURES[engine.hf_config.architectures[0]]
        assert type(engine.runner.model) is (file_class if impl == "auto" else _backend())
    file_seqs, backend_seqs = results["auto"], results["transformers"]
    assert [s.generated_ids for s in backend_seqs] == [s.generated_ids for s in file_seqs]
    for ours, theirs in zip(backend_seqs, file_seqs):
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=LOGPROB_ATOL)
    assert_matches_hf(path, ids, backend_seqs)


@pytest.mark.model
@pytest.mark.parametrize("family", ["bloom", "gemma2", "gpt_neo"])
def test_prefix_cache_hits_give_the_same_tokens(family_checkpoint, family):
    """The cached prefix is read back from the paged cache (plain, ALiBi and soft-capped/windowed paths)."""
    path = family_checkpoint(family)
    engine = engine_for(path)
    shared = "The quick brown fox jumps over the lazy dog and runs into the forest. "
    ids = encode(engine, [shared + tail for tail in ("It was late.", "Hello there", "one two three")])
    run(engine, ids[:1])
    hits_before = engine.block_manager.prefix_hits
    seqs = run(engine, ids)
    assert engine.block_manager.prefix_hits - hits_before >= 2 * 4 * 2, "the shared prefix was not reused"
    assert all(s.num_cached_prompt_tokens > 0 for s in seqs)
    assert_matches_hf(path, ids, seqs)


@pytest.mark.model
@pytest.mark.parametrize("family", ["bloom", "gemma2", "stablelm"])
def test_forced_preemption_recomputes_to_the_same_tokens(family_checkpoint, family):
    # 20 blocks of 4 tokens: one sequence fits, five growing at once do not.
    path = family_checkpoint(family)
    engine = engine_for(path, num_kv_blocks=20, block_size=4, max_num_batched_tokens=64)
    ids = encode(engine, PROMPTS)
    seqs = run(engine, ids)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert_matches_hf(path, ids, seqs)


@pytest.mark.model
def test_random_weights_and_no_decode_graphs(family_checkpoint):
    from kubellm.runtime.executor.cuda_graphs import why_eager

    engine = engine_for(family_checkpoint("gemma"), load_format="random")
    assert why_eager(engine.runner) == "the transformers backend runs transformers' modeling code eagerly"
    (seq,) = run(engine, encode(engine, ["Hello"]))
    assert seq.generated_ids


@pytest.mark.model
def test_a_checkpoint_transformers_converts_on_load_is_refused_by_name(tmp_path):
    """Mixtral's per-expert tensors are merged by transformers 5 on load; the backend reads tensors one by one."""
    from tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path / "mixtral", "mixtral")
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' "
                                         r"must be converted as transformers does on load .*model_impl='auto'"):
        engine_for(path, model_impl="transformers")


# -- pipeline and tensor parallel (real rank processes over gloo) ---------------------------------------------
def _parallel_engine(path, tp=1, pp=1, **options):
    config = EngineConfig(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", block_size=4, num_kv_blocks=64,
                          max_num_batched_tokens=16, session_len=128, **options)
    return LLMEngine(path, config, show_progress=False)


def _generate(engine):
    gens = [GenerationConfig(max_new_tokens=6 + 2 * i, ignore_eos=True) for i in range(3)]
    return [s.token_ids for s in engine.generate(PROMPTS[:3], gens)]


def _single(path, **options):
    engine = _parallel_engine(path, **options)
    try:
        return _generate(engine), param_bytes(engine.runner.model)
    finally:
        engine.destroy()


@pytest.mark.multiprocess
@pytest.mark.parametrize("family", ["bloom", "gptj", "gemma2"])
def test_pp2_splits_the_decoder_layers_and_matches_one_process(family_checkpoint, family):
    """Bloom: embedding layernorm on the first stage, tied head on the last; GPT-J: an untied head with a
    bias; Gemma 2: the embedding scale inside the embedding, a sliding layer on each stage."""
    path = family_checkpoint(family)
    expected, total = _single(path)
    engine = _parallel_engine(path, pp=2)
    try:
        stage = engine.runner.stage
        assert (stage.is_first, stage.is_last, stage.start, stage.end) == (True, False, 0, 1)
        assert _generate(engine) == expected
        first, last = param_bytes(engine.runner.model), engine.executor.worker_param_bytes[0]
        assert first < total and last < total and first + last >= total
    finally:
        engine.destroy()


@pytest.mark.multiprocess
def test_tp2_follows_transformers_tp_plan(tiny_llama):
    expected, total = _single(tiny_llama, model_impl="transformers")
    engine = _parallel_engine(tiny_llama, tp=2, model_impl="transformers")
    try:
        assert isinstance(engine.runner.model, _backend())
        assert _generate(engine) == expected
        # attention and MLP linears halved; embeddings, head and norms whole on each rank
        per_rank = [param_bytes(engine.runner.model), *engine.executor.worker_param_bytes]
        assert all(0.5 * total < b < 0.8 * total for b in per_rank), (per_rank, total)
    finally:
        engine.destroy()


def test_pp_of_nested_layers_without_a_pp_plan_is_refused():
    """OPT keeps its layers in model.decoder.layers and defines its final norm before them: without
    transformers' base_model_pp_plan the backend cannot tell which parts run before the layers."""
    from kubellm.runtime.executor.stages import PipelineStage

    opt = _config("OPTConfig", architectures=["OPTForCausalLM"], hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                  num_attention_heads=2, vocab_size=64, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match=r"pipeline_parallel: 2 stages, but OPTModel keeps its decoder layers "
                                         r"nested \(decoder.layers\) and transformers gives no base_model_pp_plan"):
        _backend()(opt, 64, PipelineStage(0, 2, 0, 1))


@pytest.mark.model
def test_tp_without_a_plan_is_refused_listing_the_valid_sizes(family_checkpoint):
    with pytest.raises(ValueError, match=r"tensor_parallel: 2 is not possible for BloomForCausalLM on the "
                                         r"transformers backend: transformers gives no base_model_tp_plan for it; "
                                         r"valid sizes are \[1\]"):
        engine_for(family_checkpoint("bloom"), tensor_parallel=2)


# -- which path runs what, and why not (pure decisions) --------------------------------------------------------
def _config(name, **fields):
    import transformers

    return getattr(transformers, name)(**fields)


@pytest.mark.parametrize("config,problem", [
    (lambda: _config("LlamaConfig", architectures=["LlamaForCausalLM"]), None),
    (lambda: _config("BloomConfig", architectures=["BloomForCausalLM"]), None),
    (lambda: _config("GPTNeoConfig", architectures=["GPTNeoForCausalLM"]), None),
    (lambda: SimpleNamespace(architectures=["QWenLMHeadModel"], model_type="qwen",
                             auto_map={"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}), "remote code"),
    (lambda: _config("T5Config", architectures=["T5ForConditionalGeneration"]), "encoder-decoder"),
    (lambda: _config("BertConfig", architectures=["BertForMaskedLM"]),
     "BertForMaskedLM is not a causal language model"),
    (lambda: SimpleNamespace(architectures=["FooForCausalLM"], model_type="foo"), "does not know FooForCausalLM"),
    (lambda: SimpleNamespace(architectures=None, model_type="llama"), "names no architectures"),
    (lambda: _config("MambaConfig", architectures=["MambaForCausalLM"]),
     "MambaForCausalLM does not attend through transformers' attention interface"),
    (lambda: _config("MptConfig", architectures=["MptForCausalLM"]), "does not attend through"),
    (lambda: _config("CohereConfig", architectures=["CohereForCausalLM"]), "logit_scale=0.0625"),
    (lambda: _config("StableLmConfig", architectures=["StableLmForCausalLM"],
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "dynamic NTK rope scaling"),
    (lambda: _config("StableLmConfig", architectures=["StableLmForCausalLM"], use_logn_attn=True), "use_logn_attn"),
], ids=["llama", "bloom", "gpt_neo", "remote_code", "t5", "bert", "unknown", "no_architectures", "mamba", "mpt",
        "cohere", "dynamic_rope", "logn"])
def test_transformers_problem(config, problem):
    from kubellm.runtime.executor.models.transformers_backend import transformers_problem

    found = transformers_problem(config())
    assert found == problem if problem is None else problem in found, found


def test_model_impl_picks_the_path():
    from kubellm.runtime.executor.models import model_class
    from kubellm.runtime.executor.models.llama import LlamaForCausalLM

    llama = _config("LlamaConfig", architectures=["LlamaForCausalLM"])
    bloom = _config("BloomConfig", architectures=["BloomForCausalLM"])
    assert model_class(llama) is model_class(llama, "kubellm") is LlamaForCausalLM
    assert model_class(llama, "transformers") is model_class(bloom) is model_class(bloom, "transformers") is _backend()
    with pytest.raises(ValueError, match=r"model_impl: 'kubellm' but there is no kubellm model file for "
                                         r"\['BloomForCausalLM'\].*use model_impl='auto'"):
        model_class(bloom, "kubellm")
    # a family with a kubellm model file, in a config transformers' code cannot serve here
    dynamic = _config("LlamaConfig", architectures=["LlamaForCausalLM"],
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"model_impl: 'transformers' but transformers' modeling code cannot run "
                                         r"\['LlamaForCausalLM'\] here: dynamic NTK rope scaling.*use "
                                         r"model_impl='auto' \(kubellm has a model file for it\)"):
        model_class(dynamic, "transformers")
    assert model_class(dynamic) is LlamaForCausalLM
    t5 = _config("T5Config", architectures=["T5ForConditionalGeneration"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['T5ForConditionalGeneration'\] in config.json: "
                                         r"kubellm has no model file .* transformers' modeling code cannot run it "
                                         r"here: it is an encoder-decoder model"):
        model_class(t5, "auto")


@pytest.mark.parametrize("config,sizes", [
    (lambda: _config("LlamaConfig", num_attention_heads=8, num_key_value_heads=2, intermediate_size=64), [1, 2]),
    (lambda: _config("GemmaConfig", num_attention_heads=8, num_key_value_heads=8, intermediate_size=96,
                     head_dim=16), [1, 2, 4, 8]),
    (lambda: _config("BloomConfig", n_head=8), [1]),
    (lambda: _config("StableLmConfig"), [1]),
])
def test_tensor_parallel_sizes(config, sizes):
    from kubellm.runtime.executor.models.transformers_backend import tensor_parallel_sizes

    assert tensor_parallel_sizes(config()) == sizes


def test_layer_windows():
    from kubellm.runtime.executor.models.transformers_attention import layer_windows

    neo = _config("GPTNeoConfig", num_layers=3, attention_types=[[["global", "local", "global"], 1]], window_size=5)
    assert layer_windows(neo) == [None, 5, None]
    gemma2 = _config("Gemma2Config", num_hidden_layers=4, sliding_window=7)
    assert layer_windows(gemma2) == [7, None, 7, None]
    assert layer_windows(_config("LlamaConfig", num_hidden_layers=2)) == [None, None]
    chunked = SimpleNamespace(model_type="x", num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match=r"layer_types: \['chunked_attention'\] layers are not supported"):
        layer_windows(chunked)


@pytest.mark.parametrize("config,message", [
    ({"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
      "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}},
     r"is remote code \(\['QWenLMHeadModel'\].*kubellm never runs a checkpoint's own code \(trust_remote_code\)"),
    ({"architectures": ["FooForCausalLM"], "model_type": "foo"},
     r"model_type 'foo' \(\['FooForCausalLM'\]\) is unknown to transformers .* a newer transformers may know it"),
    ({"hidden_size": 64}, r"transformers cannot read config.json: .*model_type"),
], ids=["remote_code", "unknown_model_type", "no_model_type"])
def test_a_config_transformers_cannot_read_says_why(tmp_path, config, message):
    import json

    from kubellm.runtime.executor.loader import ModelDirError, load_hf_config

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=message):   # and never a trust_remote_code prompt
        load_hf_config(tmp_path)

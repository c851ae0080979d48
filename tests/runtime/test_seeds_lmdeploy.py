"""LMDeploy's pipeline API, written as LMDeploy's documentation writes it: backend configs mapped field by field
(or refused, naming the field), stream_infer, do_preprocess, ChatTemplateConfig, GenerationConfig.n, the
deprecated call keywords, Response.session_id. Tokens against transformers where tokens are involved."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from parity import NEW_TOKENS, assert_matches_hf

import kubellm
from kubellm import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline
from kubellm.runtime.chat_template import prepare_prompt, render_pieces
from kubellm.runtime.config import ConfigError, EngineConfig
from kubellm.runtime.errors import RequestError, SeedOptionWarning
from kubellm.runtime.lmdeploy_compat import FIELDS, backend_options, call_options

# -- the configs' mapping (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize("config, engine", [
    (PytorchEngineConfig(tp=2), {"tensor_parallel": 2}),
    (TurbomindEngineConfig(tp=4, session_len=4096), {"tensor_parallel": 4, "session_len": 4096}),
    (PytorchEngineConfig(max_batch_size=32, cache_max_entry_count=0.5), {"max_batch_size": 32, "kv_cache_fraction": 0.5}),
    (PytorchEngineConfig(max_batch_size=None), {}),   # LMDeploy's "decide for me": kubellm's default
    (PytorchEngineConfig(block_size=16, num_gpu_blocks=300), {"block_size": 16, "num_kv_blocks": 300}),
    (PytorchEngineConfig(num_gpu_blocks=0), {}),
    (TurbomindEngineConfig(cache_block_seq_len=32), {"block_size": 32}),
    (PytorchEngineConfig(max_prefill_token_num=2048), {"max_num_batched_tokens": 2048}),
    (TurbomindEngineConfig(max_prefill_token_num=2048, num_tokens_per_iter=256), {"max_num_batched_tokens": 256}),
    (TurbomindEngineConfig(rope_scaling_factor=2.0, use_logn_attn=True), {"rope_scaling_factor": 2.0, "use_logn_attn": True}),
    (TurbomindEngineConfig(rope_scaling_factor=0.0), {}),   # LMDeploy's 0 is off
    (PytorchEngineConfig(enable_prefix_caching=False, eager_mode=True), {"enable_prefix_caching": False, "enforce_eager": True}),
    (PytorchEngineConfig(device_type="cpu", dtype="bfloat16"), {"device": "cpu", "dtype": "bfloat16"}),
    (PytorchEngineConfig(quant_policy=0, dp=1, ep=1, dp_rank=0), {}),
    (TurbomindEngineConfig(quant_policy=4), {"kv_cache_dtype": "int4"}),
    (PytorchEngineConfig(quant_policy=8), {"kv_cache_dtype": "int8"}),
    (TurbomindEngineConfig(model_format="hf"), {}),
    (TurbomindEngineConfig(model_format="awq"), {"quantization": "awq"}),
    (TurbomindEngineConfig(model_format="gptq"), {"quantization": "gptq"}),
    (PytorchEngineConfig(distributed_executor_backend="mp", tp=2), {"tensor_parallel": 2}),
    (PytorchEngineConfig(thread_safe=True), {}),
    (PytorchEngineConfig(eviction_type="recompute"), {"eviction": "recompute"}),
])
def test_set_fields_map_onto_engine_config(config, engine):
    options = backend_options(config)
    assert options.engine == engine and not options.notes
    EngineConfig.build(**options.engine)   # every mapped value is a valid EngineConfig


def test_model_name_download_dir_and_revision_are_pipeline_options():
    options = backend_options(PytorchEngineConfig(model_name="internlm2", download_dir="/d", revision="v1"))
    assert (options.model_name, options.download_dir, options.revision, options.engine) == ("internlm2", "/d", "v1", {})


@pytest.mark.parametrize("config, field", [
    (PytorchEngineConfig(prefill_interval=8), "prefill_interval"),
    (PytorchEngineConfig(num_cpu_blocks=512), "num_cpu_blocks"),
    (TurbomindEngineConfig(cache_chunk_size=1), "cache_chunk_size"),
    (TurbomindEngineConfig(max_prefill_iters=4), "max_prefill_iters"),
    (TurbomindEngineConfig(communicator="native"), "communicator"),
])
def test_options_without_meaning_are_accepted_with_a_note(config, field):
    options = backend_options(config)
    assert len(options.notes) == 1 and f".{field}=" in options.notes[0] and "no effect" in options.notes[0]


@pytest.mark.parametrize("config, field, why", [
    (TurbomindEngineConfig(model_format="fp8"), "TurbomindEngineConfig.model_format", "'awq' or 'gptq'"),
    (PytorchEngineConfig(dp=2), "PytorchEngineConfig.dp", "replica_num"),
    (PytorchEngineConfig(ep=2), "PytorchEngineConfig.ep", "expert parallelism"),
    (PytorchEngineConfig(dp_rank=1), "PytorchEngineConfig.dp_rank", "replicas"),
    (PytorchEngineConfig(device_type="ascend"), "PytorchEngineConfig.device_type", "CUDA"),
    (PytorchEngineConfig(custom_module_map={"a": "b"}), "PytorchEngineConfig.custom_module_map", "model_impl"),
    (PytorchEngineConfig(distributed_executor_backend="ray"), "distributed_executor_backend", "never Ray"),
    (PytorchEngineConfig(distributed_executor_backend="uni", tp=2), "distributed_executor_backend", "'mp'"),
])
def test_refused_options_name_the_field_and_why(config, field, why):
    with pytest.raises(ConfigError, match=field) as err:
        backend_options(config)
    assert why in str(err.value)


def test_adapters_map_onto_the_engines_lora_adapters():
    options = backend_options(PytorchEngineConfig(adapters={"sql": "/adapters/sql"}))
    assert options.engine == {"adapters": {"sql": "/adapters/sql"}} and not options.notes
    assert backend_options(PytorchEngineConfig(adapters=None)).engine == {}


def test_copy_eviction_maps_onto_the_kv_swap():
    options = backend_options(PytorchEngineConfig(eviction_type="copy", num_cpu_blocks=256))
    assert options.engine == {"eviction": "copy", "num_cpu_blocks": 256} and not options.notes
    EngineConfig.build(**options.engine)
    with pytest.raises(ConfigError, match=r"PytorchEngineConfig\.eviction_type: 'copy' .* num_cpu_blocks is 0"):
        backend_options(PytorchEngineConfig(eviction_type="copy"))   # LMDeploy's 0: sized from memory


def test_bad_values_and_unknown_fields_are_refused_by_name():
    with pytest.raises(ConfigError, match="PytorchEngineConfig.eviction_type"):
        PytorchEngineConfig(eviction_type="swap")
    with pytest.raises(ConfigError, match="TurbomindEngineConfig.tp"):
        TurbomindEngineConfig(tp=0)
    with pytest.raises(ConfigError, match="PytorchEngineConfig.cache_max_entry_count"):
        PytorchEngineConfig(cache_max_entry_count=1.5)
    with pytest.raises(ConfigError, match="PytorchEngineConfig.tpp: unknown option"):
        PytorchEngineConfig(tpp=2)


def test_every_field_has_a_decision():
    for cls in (TurbomindEngineConfig, PytorchEngineConfig):
        assert set(cls.model_fields) <= set(FIELDS), set(cls.model_fields) - set(FIELDS)
        for name, info in cls.model_fields.items():   # a field set to its default maps without an error
            backend_options(cls(**{name: info.default}))
    assert set(FIELDS) == set(TurbomindEngineConfig.model_fields) | set(PytorchEngineConfig.model_fields)


def test_an_assigned_field_is_mapped_too():
    config = PytorchEngineConfig()
    config.session_len = 2048
    assert backend_options(config).engine == {"session_len": 2048}


def test_deprecated_request_output_len_warns_and_maps():
    with pytest.warns(DeprecationWarning, match="request_output_len is deprecated.*max_new_tokens"):
        assert call_options({"request_output_len": 7, "top_k": 3}) == {"max_new_tokens": 7, "top_k": 3}
    with pytest.raises(ConfigError, match="request_output_len: deprecated name of max_new_tokens, and both"):
        call_options({"request_output_len": 7, "max_new_tokens": 8})


# -- chat templates and do_preprocess (pure) ---------------------------------------------------------------
INTERNLM2 = ChatTemplateConfig(model_name="internlm2", system="<|im_start|>system\n", eosys="<|im_end|>\n",
                               user="<|im_start|>user\n", eoh="<|im_end|>\n", assistant="<|im_start|>assistant\n",
                               eoa="<|im_end|>", separator="\n", meta_instruction="You are InternLM.")


@pytest.mark.parametrize("messages, text", [
    ([{"role": "user", "content": "Hi"}],
     "<|im_start|>system\nYou are InternLM.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And?"}],
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
     "<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n"),
])
def test_template_pieces_render_as_lmdeploy_base_chat_template(messages, text):
    assert render_pieces(INTERNLM2, messages) == text


def test_pieces_without_a_system_piece_and_unknown_roles():
    plain = ChatTemplateConfig(user="USER: ", eoh="\n", assistant="ASSISTANT: ", eoa="</s>")
    assert render_pieces(plain, [{"role": "user", "content": "Hi"}]) == "USER: Hi\nASSISTANT: "
    with pytest.raises(RequestError, match=r"prompt\[0\]\.role: 'tool'"):
        render_pieces(plain, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("prompt, do_preprocess, template, expected", [
    ("Hi", None, None, "Hi"),
    ("Hi", False, None, "Hi"),
    ("Hi", True, None, [{"role": "user", "content": "Hi"}]),
    ([{"role": "user", "content": "Hi"}], None, None, [{"role": "user", "content": "Hi"}]),
    ([{"role": "user", "content": "Hi"}], True, None, [{"role": "user", "content": "Hi"}]),
    ([5, 6, 7], True, None, [5, 6, 7]),
    ("Hi", True, ChatTemplateConfig(meta_instruction="Be brief."),
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    ("Hi", True, ChatTemplateConfig(capability="completion"), "Hi"),
    ("Hi", True, ChatTemplateConfig(user="U:", assistant="A:"), "U:HiA:"),
])
def test_do_preprocess_table(prompt, do_preprocess, template, expected):
    assert prepare_prompt(prompt, do_preprocess, template) == expected


def test_do_preprocess_false_refuses_chat_messages():
    with pytest.raises(RequestError, match=r"prompts\[1\]: do_preprocess=False sends the prompt to the model as is"):
        prepare_prompt([{"role": "user", "content": "Hi"}], False, None, field="prompts[1]")


def test_chat_template_config_refuses_code_capabilities_and_bad_types():
    with pytest.raises(ValueError, match="ChatTemplateConfig.capability: 'infilling'"):
        ChatTemplateConfig(model_name="codellama", capability="infilling")
    with pytest.raises(ValueError, match="ChatTemplateConfig.user: expected a string"):
        ChatTemplateConfig(user=3)


def test_generation_config_n():
    assert GenerationConfig().n == 1 and GenerationConfig(n=4).n == 4
    with pytest.raises(ConfigError, match="GenerationConfig.n"):
        GenerationConfig.build(n=0)


# -- a real pipeline on a tiny checkpoint --------------------------------------------------------------------
BACKEND = dict(session_len=128, block_size=4, num_gpu_blocks=256, max_batch_size=8, max_prefill_token_num=32,
               device_type="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pipe(tiny_llama):
    p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(**BACKEND), model_name="tiny-llama",
                 log_level="WARNING", show_progress=False)
    yield p
    p.destroy()


@pytest.mark.model
def test_backend_config_reaches_the_engine_and_tokens_match_transformers(pipe, tiny_llama):
    cfg = pipe.engine.config
    assert (cfg.session_len, cfg.block_size, cfg.num_kv_blocks, cfg.max_batch_size, cfg.max_num_batched_tokens,
            cfg.device, cfg.dtype) == (128, 4, 256, 8, 32, "cpu", "float32")
    assert pipe.model_name == "tiny-llama" and pipe.engine.block_manager.num_blocks == 256
    prompts = ["The quick brown fox jumps over the lazy dog and runs into the forest", "Hello", "one two three"]
    responses = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=NEW_TOKENS, logprobs=0))
    ids = [pipe.tokenizer.hf.encode(p) for p in prompts]

    class Seq:   # what assert_matches_hf reads of an engine sequence
        def __init__(self, r):
            self.generated_ids, self.logprobs = r.token_ids, r.logprobs
    assert_matches_hf(tiny_llama, ids, [Seq(r) for r in responses])


@pytest.mark.model
def test_backend_config_as_second_argument_and_conflicts(tiny_llama):
    p = pipeline(str(tiny_llama), PytorchEngineConfig(**BACKEND), show_progress=False)   # LMDeploy's positional
    try:
        assert p.engine.config.num_kv_blocks == 256
    finally:
        p.destroy()
    with pytest.raises(ConfigError, match=r"tensor_parallel: given as 1 and as 2 \(from backend_config\)"):
        pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(tp=2), tensor_parallel=1)


@pytest.mark.model
def test_notes_warn_when_the_pipeline_is_built(tiny_llama):
    with pytest.warns(SeedOptionWarning, match="prefill_interval=4 has no effect in kubellm"):
        p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(prefill_interval=4, **BACKEND),
                     show_progress=False)
    p.destroy()


@pytest.mark.model
def test_stream_infer_yields_lmdeploy_responses(pipe):
    prompts = ["Once upon a time", "The quick brown fox"]
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    whole = pipe(prompts, gen_config=gen)
    text, tokens, counts, last = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}, {}
    for r in pipe.stream_infer(prompts, gen_config=gen):
        assert isinstance(r, kubellm.Response)
        text[r.index] += r.text
        tokens[r.index] += r.token_ids
        counts[r.index].append(r.generate_token_len)
        if r.finish_reason:
            last[r.index] = (r.finish_reason, r.session_id, r.input_token_len)
    assert [text[0], text[1]] == [r.text for r in whole]
    assert [tokens[0], tokens[1]] == [r.token_ids for r in whole]
    assert all(c == sorted(c) and c[-1] == 12 for c in counts.values())   # generated so far, growing
    assert {i: reason for i, (reason, _, _) in last.items()} == {0: "length", 1: "length"}
    assert [last[i][2] for i in (0, 1)] == [r.input_token_len for r in whole]
    assert last[0][1] != last[1][1]
    finals = list(pipe.stream_infer(prompts, gen_config=gen, stream_response=False))   # whole, as each finishes
    assert sorted((r.index, r.text, r.finish_reason) for r in finals) == [(r.index, r.text, "length") for r in whole]


@pytest.mark.model
def test_do_preprocess_true_applies_the_chat_template_and_false_sends_as_is(pipe):
    hf = pipe.tokenizer.hf
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                      tokenize=False)
    templated = pipe("Hello", do_preprocess=True, max_new_tokens=4)[0]
    assert templated.input_token_len == len(hf.encode(rendered, add_special_tokens=False))
    chat = pipe([{"role": "user", "content": "Hello"}], max_new_tokens=4)[0]
    assert templated.token_ids == chat.token_ids
    raw = pipe("Hello", do_preprocess=False, max_new_tokens=4)[0]
    assert raw.input_token_len == len(hf.encode("Hello")) == pipe("Hello", max_new_tokens=4)[0].input_token_len
    with pytest.raises(RequestError, match="do_preprocess=False"):
        pipe([{"role": "user", "content": "Hello"}], do_preprocess=False)


@pytest.mark.model
def test_n_choices_have_their_own_seeds(pipe):
    gen = GenerationConfig(n=3, temperature=1.0, top_p=0.95, random_seed=11, max_new_tokens=16, ignore_eos=True)
    first = pipe(["Once upon a time", "Hello"], gen_config=gen)
    assert [r.index for r in first] == list(range(6))
    # prompt i's choice j at i*n + j: the choices of one prompt share its prompt and differ from each other
    assert len({r.input_token_len for r in first[:3]}) == 1 and len({r.input_token_len for r in first[3:]}) == 1
    assert len({tuple(r.token_ids) for r in first[:3]}) == 3
    # seeds s, s+1, s+2: repeatable, and choice j is what random_seed s+j gives alone
    again = pipe(["Once upon a time", "Hello"], gen_config=gen)
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    alone = pipe("Once upon a time", gen_config=GenerationConfig(temperature=1.0, top_p=0.95, random_seed=12,
                                                                 max_new_tokens=16, ignore_eos=True))[0]
    assert alone.token_ids == first[1].token_ids
    unseeded = pipe("Once upon a time", gen_config=gen.updated(random_seed=None))
    assert len({tuple(r.token_ids) for r in unseeded}) == 3   # the engine draws a seed per choice
    greedy = pipe("Once upon a time", gen_config=GenerationConfig(n=2, max_new_tokens=16))
    assert greedy[0].token_ids == greedy[1].token_ids and [r.index for r in greedy] == [0, 1]
    streamed = {}
    for r in pipe.stream_infer("Once upon a time", gen_config=gen):
        streamed.setdefault(r.index, []).extend(r.token_ids)
    assert [streamed[i] for i in range(3)] == [r.token_ids for r in first[:3]]


@pytest.mark.model
def test_the_engine_refuses_n_above_one(pipe):
    with pytest.raises(RequestError, match="n: 2 choices asked of one request"):
        pipe.engine.add_request("Hello", GenerationConfig(n=2))
    assert not pipe.engine.has_unfinished()


@pytest.mark.model
def test_session_ids_are_unique_and_increasing(pipe):
    a = pipe(["Hello", "Hi"], max_new_tokens=2)
    b = pipe("Hello", max_new_tokens=2)
    ids = [r.session_id for r in a + b]
    assert ids == sorted(ids) and len(set(ids)) == 3


@pytest.mark.model
def test_deprecated_keywords_and_lmdeploy_call_names(pipe):
    with pytest.warns(DeprecationWarning, match="request_output_len"):
        [r] = pipe("Hello", request_output_len=3, top_k=40, top_p=0.8, temperature=0.0, repetition_penalty=1.0,
                   ignore_eos=True)
    assert r.generate_token_len == 3
    assert pipe.infer("Hello", max_new_tokens=3)[0].token_ids == pipe.batch_infer("Hello", max_new_tokens=3)[0].token_ids
    assert pipe("Hello", max_new_tokens=3, use_tqdm=True)[0].token_ids == r.token_ids
    with pytest.raises(RequestError, match=r"adapter: 'sql' is not served here \(adapters: none\)"):
        pipe("Hello", adapter_name="sql")   # LMDeploy's name for the request's adapter (served ones: test_lora)


@pytest.mark.model
def test_chat_template_config_pieces_meta_instruction_and_stop_words(tiny_llama):
    template = ChatTemplateConfig(model_name="vicuna", meta_instruction="Be brief. ", user="USER: ", eoh="\n",
                                  assistant="ASSISTANT:", eoa="</s>", stop_words=["zzz-never"])
    p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(**BACKEND), chat_template_config=template,
                 show_progress=False)
    try:
        [r] = p("Hello", do_preprocess=True, max_new_tokens=4)
        text = "Be brief. USER: Hello\nASSISTANT:"
        assert r.input_token_len == len(p.tokenizer.hf.encode(text))
        assert r.token_ids == p(text, max_new_tokens=4)[0].token_ids
        gens = p._requests("Hello", None, True, None, {})[1]
        assert gens[0].stop_words == ["zzz-never"]
        assert p._requests("Hello", None, None, None, {})[1][0].stop_words == []   # sent as is: no template
    finally:
        p.destroy()


@pytest.mark.model
def test_chat_template_by_name_needs_a_template_in_the_checkpoint(tmp_path, tiny_llama):
    named = ChatTemplateConfig(model_name="internlm2", meta_instruction="Be brief.")
    p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(**BACKEND), chat_template_config=named,
                 show_progress=False)
    try:   # the checkpoint's own template, with the meta instruction as the system message
        hf = p.tokenizer.hf
        rendered = hf.apply_chat_template([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          tokenize=False)
        assert p("Hi", do_preprocess=True, max_new_tokens=2)[0].input_token_len == len(
            hf.encode(rendered, add_special_tokens=False))
    finally:
        p.destroy()
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_llama, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="chat_template_config.model_name: 'internlm2' names one of LMDeploy's"):
        pipeline(str(bare), backend_config=PytorchEngineConfig(**BACKEND), chat_template_config=named,
                 show_progress=False)


@pytest.mark.model
def test_log_level(tiny_llama):
    import logging

    before = logging.getLogger("kubellm").level
    try:
        p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(**BACKEND), log_level="INFO",
                     show_progress=False)
        p.destroy()
        assert logging.getLogger("kubellm").level == logging.INFO
        with pytest.raises(ConfigError, match="log_level: 'LOUD'"):
            pipeline(str(tiny_llama), log_level="LOUD")
    finally:
        logging.getLogger("kubellm").setLevel(before)


@pytest.mark.model
def test_revision_of_a_local_directory_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="revision: .* is not a Hugging Face Hub model id"):
        pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(revision="v2", **BACKEND))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(download_dir="/nowhere", **BACKEND),
                     show_progress=False)
        p.destroy()
    assert any("download_dir='/nowhere' has no effect" in str(w.message) for w in seen)


@pytest.mark.multiprocess
def test_a_hub_id_is_downloaded_into_download_dir_at_revision(tiny_llama, tmp_path):
    """LMDeploy's pipeline("org/name", backend_config=...(download_dir=, revision=)) against a Hub mirror, in a
    process of its own (huggingface_hub reads HF_ENDPOINT when first imported)."""
    from e2e.hf_mirror import HFMirror

    script = textwrap.dedent("""
        import json, sys
        from kubellm import pipeline, PytorchEngineConfig
        config = PytorchEngineConfig(download_dir=sys.argv[2], revision=sys.argv[3] or None, device_type="cpu",
                                     dtype="float32", session_len=64, num_gpu_blocks=64, block_size=4)
        pipe = pipeline(sys.argv[1], backend_config=config, show_progress=False)
        print(json.dumps(pipe(["Hello, world!", "The capital of France is"], max_new_tokens=6,
                              ignore_eos=True)[0].token_ids))
    """)
    local = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(**BACKEND), show_progress=False)
    try:
        expected = local(["Hello, world!"], max_new_tokens=6, ignore_eos=True)[0].token_ids
    finally:
        local.destroy()
    with HFMirror(tiny_llama, "org/tiny") as mirror:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update(HF_ENDPOINT=mirror.url, HF_HOME=str(tmp_path / ".hf-home"), OMP_NUM_THREADS="1")
        run = subprocess.run([sys.executable, "-c", script, "org/tiny", str(tmp_path / "models"), mirror.commit],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
        assert [p.name for p in (tmp_path / "models").iterdir()] == [f"org--tiny@{mirror.commit}"]
        missing = subprocess.run([sys.executable, "-c", script, "org/tiny", str(tmp_path / "other"), "v9"],
                                 env=env, capture_output=True, text=True, timeout=300)
        assert missing.returncode != 0 and "revision 'v9'" in missing.stderr, missing.stderr[-2000:]


@pytest.mark.model
def test_eviction_type_copy_through_the_backend_config(tiny_llama):
    """PytorchEngineConfig(eviction_type='copy', num_cpu_blocks=) reaches the engine's KV swap; under a KV cache
    too small for the batch (preemption), the tokens are those of the recompute path."""
    common = dict(block_size=4, num_gpu_blocks=16, session_len=64, device_type="cpu", dtype="float32", max_batch_size=4)
    prompts = ["Hello there friend", "The quick brown fox", "Once upon a time", "one two three four"]
    tokens = {}
    for eviction in ("recompute", "copy"):
        extra = {"num_cpu_blocks": 64} if eviction == "copy" else {}
        p = pipeline(str(tiny_llama), backend_config=PytorchEngineConfig(eviction_type=eviction, **extra, **common),
                     show_progress=False)
        try:
            assert (p.engine.config.eviction, p.engine.config.num_cpu_blocks) == (eviction, extra.get("num_cpu_blocks", 0))
            tokens[eviction] = [r.token_ids for r in p(prompts, max_new_tokens=20, ignore_eos=True)]
        finally:
            p.destroy()
    assert tokens["copy"] == tokens["recompute"]


@pytest.mark.model
def test_calls_from_several_threads_are_serialized(pipe):
    """PytorchEngineConfig(thread_safe=True)'s promise, kept by every pipeline: concurrent calls do not mix."""
    import threading

    expected = [r.token_ids for r in pipe(["Hello", "Once upon a time"], max_new_tokens=6)]
    results, errors = [None] * 4, []

    def call(i):
        try:
            results[i] = [r.token_ids for r in pipe(["Hello", "Once upon a time"], max_new_tokens=6)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [expected] * 4

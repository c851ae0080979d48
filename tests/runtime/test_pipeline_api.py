"""The Python API: inputs it accepts, Response fields, streaming, sampling controls, clear errors."""

import json

import pytest
from tiny_models import hf_greedy, make_checkpoint

import kubellm
from kubellm.runtime.config import ConfigError, GenerationConfig
from kubellm.runtime.errors import RequestError
from kubellm.runtime.executor.loader import ModelDirError


pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def pipe(tiny_llama):
    p = kubellm.pipeline(tiny_llama, block_size=4, num_kv_blocks=512, max_num_batched_tokens=64,
                         session_len=128, show_progress=False)
    yield p
    p.destroy()


# -- inputs and outputs -------------------------------------------------------------------------
def test_string_list_and_chat_inputs(pipe, tiny_llama):
    [single] = pipe("The weather today is", max_new_tokens=6)
    assert isinstance(single, kubellm.Response)
    assert single.generate_token_len == 6 and single.finish_reason == "length"
    ids = pipe.tokenizer.hf.encode("The weather today is")
    assert single.input_token_len == len(ids)
    assert single.token_ids == hf_greedy(tiny_llama, [ids], 6)[0]["token_ids"]

    batch = pipe(["Hello", "one two three"], max_new_tokens=5)
    assert [r.index for r in batch] == [0, 1]
    assert [r.prompt_length for r in batch] == [r.input_token_len for r in batch]  # MII names
    assert all(r.generated_length == 5 for r in batch)

    chat = [{"role": "user", "content": "Hello"}]
    [reply] = pipe(chat, max_new_tokens=5)
    rendered = pipe.tokenizer.hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert reply.input_token_len == len(pipe.tokenizer.hf.encode(rendered, add_special_tokens=False))
    assert rendered.endswith("<|im_start|>assistant\n")
    # Two conversations in one call.
    assert len(pipe([chat, chat + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "And?"}]],
                    max_new_tokens=3)) == 2


def test_stream_concatenates_to_the_batch_text(pipe):
    prompts = ["Once upon a time", "The quick brown fox"]
    full = pipe(prompts, max_new_tokens=12)
    pieces = {0: "", 1: ""}
    finished = {}
    for delta in pipe.stream(prompts, max_new_tokens=12):
        pieces[delta.index] += delta.text
        if delta.finish_reason:
            finished[delta.index] = delta.finish_reason
    assert [pieces[0], pieces[1]] == [r.text for r in full]
    assert finished == {0: "length", 1: "length"}


def test_abandoned_stream_frees_its_blocks(pipe):
    engine = pipe.engine
    stream = pipe.stream(["Once upon a time"], max_new_tokens=50)
    next(stream)
    assert engine.block_manager.num_free < engine.block_manager.num_blocks
    stream.close()
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_mii_max_length_counts_the_prompt(pipe):
    prompt_len = len(pipe.tokenizer.hf.encode("one two three four"))
    [r] = pipe("one two three four", max_length=prompt_len + 5, max_new_tokens=100)
    assert r.generate_token_len == 5 and r.input_token_len + r.generate_token_len == prompt_len + 5


def test_session_len_caps_generation(pipe):
    [r] = pipe("Hello", max_new_tokens=1000)
    assert r.input_token_len + r.generate_token_len == 128 and r.finish_reason == "length"


# -- sampling -----------------------------------------------------------------------------------
def test_seeded_sampling_repeats_and_differs_across_seeds(pipe):
    opts = dict(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = pipe("Once upon a time", random_seed=7, **opts)[0]
    # Same seed, different batch company: same text.
    b = pipe(["The weather", "Once upon a time"], random_seed=7, **opts)[1]
    assert a.token_ids == b.token_ids
    others = {tuple(pipe("Once upon a time", random_seed=s, **opts)[0].token_ids) for s in range(1, 5)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_top_k_one_equals_greedy(pipe):
    greedy = pipe("The quick brown fox", max_new_tokens=12)[0]
    top1 = pipe("The quick brown fox", max_new_tokens=12, temperature=1.5, top_k=1, random_seed=3)[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_words_cut_the_text(pipe):
    greedy = pipe("Once upon a time", max_new_tokens=20)[0]
    word = greedy.text.strip().split()[1] if len(greedy.text.split()) > 1 else greedy.text.strip()[:2]
    stopped = pipe("Once upon a time", max_new_tokens=20, stop_words=[word])[0]
    assert stopped.finish_reason == "stop"
    assert word not in stopped.text
    assert greedy.text.startswith(stopped.text)
    assert greedy.text[len(stopped.text):].startswith(word)
    # Streaming agrees and never leaks the stop word.
    streamed = "".join(d.text for d in pipe.stream("Once upon a time", max_new_tokens=20, stop_words=[word]))
    assert streamed == stopped.text


def test_bad_words_never_appear(pipe):
    greedy = pipe("The quick brown fox", max_new_tokens=20)[0]
    tok = pipe.tokenizer.hf
    word = tok.decode(greedy.token_ids[2:3]).strip()
    assert word, "pick a token with visible text"
    banned = pipe("The quick brown fox", max_new_tokens=20, bad_words=[word])[0]
    assert word not in banned.text
    assert banned.token_ids[:2] == greedy.token_ids[:2]


def test_min_new_tokens_holds_off_eos(tmp_path, tiny_llama):
    # Rebuild the same weights with EOS set to a later greedy token: generation now stops there.
    base = kubellm.pipeline(tiny_llama, show_progress=False)
    ids = base("The weather today is", max_new_tokens=12)[0].token_ids
    base.destroy()
    at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    path = make_checkpoint(tmp_path / "eos", "llama", eos_token_id=ids[at])
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == ids[at]
    p = kubellm.pipeline(path, show_progress=False)
    stopped = p("The weather today is", max_new_tokens=12)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == ids[:at + 1]
    held = p("The weather today is", max_new_tokens=12, min_new_tokens=at + 3)[0]
    assert held.generate_token_len >= at + 3 and ids[at] not in held.token_ids[:at + 2]
    ignored = p("The weather today is", max_new_tokens=12, ignore_eos=True)[0]
    assert ignored.generate_token_len == 12 and ignored.finish_reason == "length"
    p.destroy()


def test_logprobs_and_top_alternatives(pipe):
    [r] = pipe("Hello", max_new_tokens=4, logprobs=3)
    assert len(r.logprobs) == 4 and all(lp <= 0 for lp in r.logprobs)
    for chosen, lp, top in zip(r.token_ids, r.logprobs, r.top_logprobs):
        assert len(top) == 3 and top[chosen] == pytest.approx(lp)  # greedy: the chosen is the best
        assert max(top.values()) == pytest.approx(lp)


def test_repetition_penalty_changes_greedy_output(pipe):
    plain = pipe("one two three one two three", max_new_tokens=16)[0]
    penalised = pipe("one two three one two three", max_new_tokens=16, repetition_penalty=5.0)[0]
    assert plain.token_ids != penalised.token_ids


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, field", [("", "prompts[0]"), ([""], "prompts[0]"), ([], "prompts"),
                                            (["ok", ""], "prompts[1]"), ([{"role": "user"}], "prompts[0]")])
def test_bad_prompts_name_the_field(pipe, prompts, field):
    with pytest.raises(RequestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        pipe(prompts)
    assert not pipe.engine.has_unfinished()


def test_prompt_longer_than_session_len(pipe):
    with pytest.raises(RequestError, match="session_len"):
        pipe("word " * 200)


@pytest.mark.parametrize("options, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-2), "top_k"), (dict(temprature=1.0), "temprature"),
    (dict(max_length=2), "max_length"),
])
def test_bad_generation_options_name_the_field(pipe, options, field):
    with pytest.raises((ConfigError, RequestError), match=field):
        pipe("Hello there", **options)
    [ok] = pipe("Hello there", max_new_tokens=2)  # the pipeline still works afterwards
    assert ok.generate_token_len == 2


def test_bad_model_directories(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="no-such-model"):
        kubellm.pipeline(tmp_path / "no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelDirError, match="config.json"):
        kubellm.pipeline(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny_llama / name).read_bytes())
    with pytest.raises(ModelDirError, match="no weights"):
        kubellm.pipeline(no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.startswith("tokenizer") and f.is_file():
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelDirError, match="tokenizer"):
        kubellm.pipeline(no_tokenizer)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tiny_llama):
    other = tmp_path / "gpt2ish"
    other.mkdir()
    for f in tiny_llama.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        kubellm.pipeline(other)


def test_gen_config_object_and_per_prompt_list(pipe):
    cfg = GenerationConfig(max_new_tokens=3)
    assert pipe("Hello", gen_config=cfg)[0].generate_token_len == 3
    rs = pipe(["Hello", "Hi"], gen_config=[cfg, {"max_new_tokens": 5}])
    assert [r.generate_token_len for r in rs] == [3, 5]
    with pytest.raises(RequestError, match="gen_config"):
        pipe(["Hello", "Hi"], gen_config=[cfg])

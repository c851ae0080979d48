"""Sanity tests of the tiny-checkpoint helpers themselves (tests/tiny_models.py)."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_models import ENDOFTEXT, IM_END, IM_START, hf_greedy, make_checkpoint, train_tokenizer  # noqa: E402

PROMPTS = [[5, 17, 42], [0, 300, 7, 7, 120, 64], [33]]


pytestmark = pytest.mark.model


def test_tokenizer_round_trips_text():
    tok = train_tokenizer()
    assert 400 <= len(tok) <= 500
    for text in ["Hello, world!", "The capital of France is Paris.\n", "  spaces\tand ünïcödé 中文 🙂"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # merges were learnt: common English is shorter in tokens than in bytes
    assert len(tok.encode("The capital of France is")) < len("The capital of France is") // 2


def test_tokenizer_special_tokens():
    tok = train_tokenizer()
    assert tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [0, 1, 2]
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    assert tok.encode(f"{IM_START}user{IM_END}")[0] == 1  # one token, not split into bytes


def test_tokenizer_training_is_deterministic():
    import tiny_models

    first = tiny_models._tokenizer_json()
    tiny_models._tokenizer_json.cache_clear()
    assert tiny_models._tokenizer_json() == first


def test_chat_template_renders(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    # The template is in tokenizer_config.json too, as in most Hub checkpoints.
    assert "chat_template" in json.loads((tiny_llama / "tokenizer_config.json").read_text())


def test_checkpoint_files(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert (tiny_model / "model.safetensors").is_file()
    assert (tiny_model / "tokenizer.json").is_file()
    assert config["vocab_size"] == len(train_tokenizer())
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16
    assert generation["bos_token_id"] == config["bos_token_id"]
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_llama3_rope_scaling(tiny_llama3):
    config = json.loads((tiny_llama3 / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert config["max_position_embeddings"] > 64 * 8


def test_qwen2_has_nonzero_qkv_bias(tiny_qwen2):
    from safetensors import safe_open

    with safe_open(str(tiny_qwen2 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f.get_tensor(f"model.layers.0.self_attn.{proj}.bias").abs().sum() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_tied_checkpoint_has_no_lm_head(tiny_llama_tied):
    from safetensors import safe_open

    assert json.loads((tiny_llama_tied / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(tiny_llama_tied / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_sharded_checkpoint(tiny_llama_sharded, tiny_llama):
    from safetensors import safe_open

    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3
    assert not (tiny_llama_sharded / "model.safetensors").exists()
    assert all((tiny_llama_sharded / name).is_file() for name in files)
    # same seed, same weights as the single-file checkpoint
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as single:
        assert set(single.keys()) == set(index["weight_map"])
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            with safe_open(str(tiny_llama_sharded / index["weight_map"][name]), "pt") as shard:
                assert shard.get_tensor(name).equal(single.get_tensor(name))


def test_hf_greedy_is_deterministic(tiny_model):
    first = hf_greedy(tiny_model, PROMPTS, max_new_tokens=12)
    second = hf_greedy(tiny_model, PROMPTS, max_new_tokens=12)
    assert first == second
    for out in first:
        assert 1 <= len(out["token_ids"]) <= 12
        assert len(out["logprobs"]) == len(out["token_ids"]) == len(out["top2_gaps"])
        assert all(lp <= 0 for lp in out["logprobs"])
        assert all(gap >= 0 for gap in out["top2_gaps"])


def test_hf_greedy_matches_a_plain_forward_pass(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[1]
    out = hf_greedy(tiny_llama, [prompt], max_new_tokens=6)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.tensor([prompt + out["token_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for step, token in enumerate(out["token_ids"]):
        row = logprobs[len(prompt) - 1 + step]
        assert row.argmax().item() == token
        assert row[token].item() == pytest.approx(out["logprobs"][step], abs=1e-4)


def test_hf_greedy_stops_at_eos(tmp_path):
    # Same seed, same weights: make the 4th greedy token the eos token.
    plain = make_checkpoint(tmp_path / "plain", "llama", seed=3)
    tokens = hf_greedy(plain, [PROMPTS[0]], max_new_tokens=10)[0]["token_ids"]
    eos = tokens[3]
    stopping = make_checkpoint(tmp_path / "eos", "llama", seed=3, eos_token_id=eos)
    out = hf_greedy(stopping, [PROMPTS[0]], max_new_tokens=10)[0]
    first = tokens.index(eos)
    assert out["token_ids"] == tokens[: first + 1]  # the eos token is included, then it stops

"""Tiny random-weight Hugging Face checkpoints, built on the spot (nothing is downloaded).

    from tiny_models import train_tokenizer, make_checkpoint, hf_greedy

    path = make_checkpoint(tmp_path / "llama", "llama")        # config + safetensors + tokenizer
    ref = hf_greedy(path, [[5, 17, 42]], max_new_tokens=16)   # transformers' greedy reference
    ref[0]["token_ids"], ref[0]["logprobs"]

The checkpoints look like real ones on disk (config.json, model.safetensors or shards plus
model.safetensors.index.json, tokenizer.json / tokenizer_config.json with a ChatML chat
template, generation_config.json) but are small enough to build and run in a second on a CPU.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

# torch, tokenizers and transformers are imported inside the functions, so that importing this
# module (conftest.py does) costs nothing in an environment without them (kubellm[operator]).

ARCHS = ("llama", "llama3", "mistral", "qwen2")
# Other families (not in ARCHS: their configs name heads and sizes their own way).
FAMILIES = ("opt", "opt_postnorm", "gpt2", "phi", "falcon", "falcon_mq", "falcon_serial", "mixtral", "qwen3")
TIED_FAMILIES = ("opt", "opt_postnorm", "gpt2", "falcon", "falcon_mq", "falcon_serial", "qwen3")  # as released

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

TOKENIZER_VOCAB_SIZE = 448

# ChatML, as in SmolLM2 / Qwen2 (without their default system prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog.
Hello, world! How are you today?
The capital of France is Paris, and the capital of Germany is Berlin.
Once upon a time, there was a little girl who lived in a village near the forest.
Kubernetes schedules pods onto nodes and restarts them when they fail.
A large language model predicts the next token given the previous tokens.
What is the meaning of life? Some say it is 42.
She sells sea shells by the sea shore.
In 1969, astronauts walked on the Moon for the first time.
The weather is sunny with a chance of rain in the afternoon.
Please write a short poem about the ocean and the stars.
def add(a, b):
    return a + b
The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 are written in digits.
I think, therefore I am.
Water boils at 100 degrees Celsius at sea level.
My favourite colours are red, green, blue, and yellow.
The train leaves the station at half past seven every morning.
Can you explain how attention works in a transformer?
Cats and dogs are the most popular pets in many countries.
The library opens at nine and closes at five on weekdays.
He played the piano while she sang an old song.
Mount Everest is the highest mountain on Earth.
Every good boy deserves fruit, and every cow eats grass.
The server returned an error: connection refused (code 111).
Tensor parallelism splits each weight matrix across several GPUs.
Rivers flow into the sea, and the sea gives rain back to the hills.
They decided to travel by boat instead of by plane.
Add two cups of flour, one egg, and a pinch of salt.
Why is the sky blue? Because air scatters blue light more than red light.
The committee will meet again next Thursday to discuss the budget.
Birds sing in the morning; owls hunt at night.
Answer: yes. Question: no? Maybe!
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return it serialised (JSON)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 8, trainer=trainer)
    return tok.to_str()


def train_tokenizer(path=None):
    """A small byte-level BPE tokenizer (vocab 448) with a ChatML chat template.

    `<|endoftext|>` (id 0) is bos, eos, unk and pad; `<|im_start|>` (1) and `<|im_end|>` (2)
    are extra special tokens. Training happens once per process; each call returns a fresh
    `PreTrainedTokenizerFast`, saved to `path` when one is given.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(str(path))
        _hub_style_tokenizer(Path(path))
    return tokenizer


def _config(arch: str, vocab_size: int, bos_id: int, eos_id: int, tie: bool, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # spread-out logits: few near-ties under greedy decoding
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=tie,
    )
    if arch == "llama":
        cls, kwargs = LlamaConfig, dict(common, num_hidden_layers=2)
    elif arch == "llama3":
        cls, kwargs = LlamaConfig, dict(
            common,
            num_hidden_layers=2,
            max_position_embeddings=1024,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif arch == "mistral":
        cls, kwargs = MistralConfig, common
    elif arch == "qwen2":
        cls, kwargs = Qwen2Config, dict(common, rope_theta=1000000.0)
    elif arch in FAMILIES:
        cls, kwargs = _family_config(arch, vocab_size, bos_id, eos_id, tie)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS + FAMILIES}")
    kwargs.update(overrides)
    return cls(**kwargs)


def _family_config(arch: str, vocab_size: int, bos_id: int, eos_id: int, tie: bool):
    """hidden 64, 4 heads of 16, MLP 128, 2 layers (3 for falcon_serial), each family's names."""
    from transformers import FalconConfig, GPT2Config, MixtralConfig, OPTConfig, PhiConfig, Qwen3Config

    ids = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=tie)
    if arch.startswith("opt"):
        kwargs = dict(ids, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=512, init_std=0.2, pad_token_id=eos_id)
        if arch == "opt_postnorm":  # as opt-350m: post-norm, embeddings projected 32 <-> 64
            kwargs.update(do_layer_norm_before=False, word_embed_proj_dim=32)
        return OPTConfig, kwargs
    if arch == "gpt2":
        return GPT2Config, dict(ids, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512,
                                initializer_range=0.2)
    if arch == "phi":  # grouped KV heads and a non-default rotary fraction (12 of 16 dims)
        return PhiConfig, dict(ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                               max_position_embeddings=512, initializer_range=0.2)
    if arch.startswith("falcon"):
        kwargs = dict(ids, hidden_size=64, ffn_hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=512, initializer_range=0.2, alibi=False)
        if arch == "falcon":  # new decoder architecture (40B/180B): 2 KV groups, two norms
            kwargs.update(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True)
        elif arch == "falcon_mq":  # 7B layout: multi-query (one KV head), parallel attention
            kwargs.update(new_decoder_architecture=False, multi_query=True, parallel_attn=True)
        else:  # old layout without multi-query, attention then MLP, with biases
            kwargs.update(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True,
                          num_hidden_layers=3)
        return FalconConfig, kwargs
    if arch == "qwen3":  # each head's q and k RMS-normed
        return Qwen3Config, dict(ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2)
    if arch == "mixtral":
        return MixtralConfig, dict(ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, initializer_range=0.2)
    raise AssertionError(arch)


def _perturb(model, seed: int) -> None:
    """Make the weights that `from_config` sets to constants random too.

    RMSNorm weights start at 1 and Qwen2's q/k/v biases at 0; left like that, a runtime that
    forgot to load them would still match transformers. Give them small random values.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    layer_norms = {f"{name}.weight" for name, module in model.named_modules()
                   if isinstance(module, torch.nn.LayerNorm)}  # GPT-2's ln_1, Falcon's ln_attn, ...
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name in layer_norms:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def make_checkpoint(
    path,
    arch: str = "llama",
    *,
    shards: int = 1,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a tiny random-weight checkpoint of `arch` (one of ARCHS) to `path`; return it.

    hidden 64, intermediate 128, 2 (llama, llama3) or 3 (mistral, qwen2) layers, 4 query heads,
    2 KV heads, head_dim 16, vocab = the tokenizer's (448), float32. `config_overrides` go
    to the transformers config class (e.g. `eos_token_id=37`; generation_config.json follows
    the config's bos/eos). The same `seed` gives the same weights, whatever overrides that
    leave the shapes and initializer_range alone. Norm weights and biases are random too.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(path)
    config = _config(
        arch,
        vocab_size=len(tokenizer),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        tie=tie_word_embeddings,
        overrides=config_overrides,
    )

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed)
    model.eval()

    _save_weights(model, path, shards)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(
        str(path)
    )
    _hub_style_config(path)
    return path


def _save_weights(model, path: Path, shards: int) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json."""
    if shards <= 1:
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size="10GB")
        assert (path / "model.safetensors").is_file()
        return
    # transformers packs tensors greedily up to max_shard_size; grow it until the count fits.
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    max_shard_size = math.ceil(total / shards)
    for _ in range(50):
        for old in path.glob("model*.safetensors*"):
            old.unlink()
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size=max_shard_size)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        if len(files) <= shards:
            break
        max_shard_size = math.ceil(max_shard_size * 1.05)
    assert 1 < len(files) <= shards, f"expected {shards} shards, got {sorted(files)}"


def _hub_style_config(path: Path) -> None:
    """Rewrite config.json (and tokenizer_config.json: _hub_style_tokenizer) Hub-style.

    transformers 5 writes `rope_parameters`, `dtype`, `extra_special_tokens`, a
    `TokenizersBackend` class and a separate chat_template.jinja; the checkpoints users serve
    mostly have `rope_theta` (+ `rope_scaling`), `torch_dtype`, `additional_special_tokens`,
    `PreTrainedTokenizerFast` and the template inside tokenizer_config.json. transformers 5
    reads both forms; older versions and plain-JSON readers only the latter.
    """
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    if "rope_theta" in rope:
        config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    if "partial_rotary_factor" in rope:  # Phi keeps it at the top level
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _hub_style_tokenizer(path: Path) -> None:
    """See _hub_style_config; chat_template.jinja stays too (same template)."""
    tok_file = path / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in tok_config:
        tok_config["additional_special_tokens"] = tok_config.pop("extra_special_tokens")
    tok_config["chat_template"] = CHAT_TEMPLATE
    tok_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=None)
def _load(path: str, stamp: tuple):
    """Cached per path; `stamp` (file times) makes a rebuilt checkpoint load afresh."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(path, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy decoding with transformers, one prompt at a time (no padding), float32, eager.

    Stops at eos as transformers does (from the checkpoint's generation_config.json). Returns
    one dict per prompt: {"token_ids": new tokens, "logprobs": log_softmax(raw logits)[token],
    "top2_gaps": raw logit of the best token minus the runner-up's, per step}. Where a gap is
    tiny (< 1e-3, about 1 step in 300) another correct implementation may pick the other token.
    """
    path = Path(path).resolve()
    stamp = tuple((path / name).stat().st_mtime_ns for name in ("config.json", "generation_config.json"))
    return greedy_with(_load(str(path), stamp), prompts, max_new_tokens)


def greedy_with(model, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """hf_greedy's decoding on a transformers model already loaded (e.g. one with a LoRA adapter merged)."""
    import torch

    results = []
    for prompt in prompts:
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = out.sequences[0, input_ids.shape[1] :].tolist()
        logprobs = [
            torch.log_softmax(step_logits[0].float(), dim=-1)[token].item()
            for step_logits, token in zip(out.logits, new_tokens)
        ]
        top2 = [step_logits[0].float().topk(2).values for step_logits in out.logits]
        gaps = [(top[0] - top[1]).item() for top in top2][: len(new_tokens)]
        results.append({"token_ids": new_tokens, "logprobs": logprobs, "top2_gaps": gaps})
    return results

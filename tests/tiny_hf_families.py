"""Tiny random checkpoints of families kubellm has no model file for (the Transformers backend's):
Bloom (ALiBi), GPT-Neo (unscaled, local layers), GPT-J, CodeGen, Gemma, Gemma 2 (soft-capping,
sliding window), StableLM, GPT-NeoX (saved as `embed_out`, read as `lm_head`). Same tokenizer, layout on disk and weight perturbation as
tiny_models.make_checkpoint; hidden 64, 4 heads of 16, 2 layers, seconds on a CPU.

    path = make_family_checkpoint(tmp_path / "bloom", "bloom")
"""

from __future__ import annotations

from pathlib import Path

BACKEND_FAMILIES = ("bloom", "gpt_neo", "gptj", "codegen", "gemma", "gemma2", "stablelm", "gpt_neox")
# Windows and caps small enough that the test prompts (up to ~20 tokens + 24 generated) cross them.
WINDOW = 8


def family_config(family: str, vocab_size: int, bos_id: int, eos_id: int, **overrides):
    from transformers import (BloomConfig, CodeGenConfig, Gemma2Config, GemmaConfig, GPTJConfig, GPTNeoConfig,
                              GPTNeoXConfig, Phi3Config, StableLmConfig)

    # initializer_range 0.2: spread-out logits, few near-ties under greedy decoding
    ids = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, initializer_range=0.2)
    rope = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512)
    table = {
        "bloom": (BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4)),
        "gpt_neo": (GPTNeoConfig, dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                       attention_types=[[["global", "local"], 1]], window_size=WINDOW,
                                       max_position_embeddings=512)),
        "gptj": (GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128, n_positions=512)),
        "codegen": (CodeGenConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128, n_positions=512,
                                        n_ctx=512)),
        "gemma": (GemmaConfig, dict(rope, num_key_value_heads=1, head_dim=16)),
        "gemma2": (Gemma2Config, dict(rope, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                      query_pre_attn_scalar=16)),
        "stablelm": (StableLmConfig, dict(rope, num_key_value_heads=2, use_qkv_bias=True)),
        "gpt_neox": (GPTNeoXConfig, dict(rope, rotary_pct=0.25)),
        # not in BACKEND_FAMILIES: the GGUF tests' Phi-3 (fused qkv_proj and gate_up_proj)
        "phi3": (Phi3Config, dict(rope, num_key_value_heads=2, pad_token_id=eos_id)),
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(table)}")
    cls, kwargs = table[family]
    return cls(**{**ids, **kwargs, **overrides})


def make_family_checkpoint(path, family: str, *, seed: int = 0, **overrides) -> Path:
    import torch
    from tiny_models import _hub_style_config, _perturb, _save_weights, train_tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(path)
    config = family_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed)
    model.eval()
    _save_weights(model, path, 1)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(str(path))
    _hub_style_config(path)
    return path

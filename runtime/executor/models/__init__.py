"""Model architectures, chosen by the checkpoint's `config.json` `architectures` entry."""

from __future__ import annotations

from kubellm.runtime.executor.models.falcon import FalconForCausalLM, falcon_kv_heads
from kubellm.runtime.executor.models.gpt2 import GPT2LMHeadModel, inner_size
from kubellm.runtime.executor.models.llama import LlamaForCausalLM
from kubellm.runtime.executor.models.mixtral import MixtralForCausalLM
from kubellm.runtime.executor.models.opt import OPTForCausalLM
from kubellm.runtime.executor.models.phi import PhiForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "PhiForCausalLM": PhiForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
}


def model_class(hf_config):
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"unsupported architecture {names or hf_config.model_type!r} in config.json; "
                     f"supported: {', '.join(ARCHITECTURES)}")


def parallel_dims(hf_config) -> tuple[int, int, int | None, bool]:
    """(attention heads, KV heads, MLP intermediate size or None, whether KV heads may be replicated
    when the tensor-parallel size exceeds them) under each family's own config names."""
    model_type = getattr(hf_config, "model_type", None)
    heads = hf_config.num_attention_heads
    if model_type == "falcon":
        return heads, falcon_kv_heads(hf_config), hf_config.ffn_hidden_size, True
    if model_type == "gpt2":
        return heads, heads, inner_size(hf_config), False
    if model_type == "opt":
        return heads, heads, hf_config.ffn_dim, False
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(hf_config, "intermediate_size", None), False

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
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "PhiForCausalLM": PhiForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
}


def model_class(hf_config, model_impl: str = "auto"):
    """kubellm's own model file for the architecture (the fast path), else, unless model_impl is
    "kubellm", transformers' modeling code on kubellm's KV cache (transformers_backend.py);
    model_impl "transformers" takes the backend even where a model file exists."""
    from kubellm.runtime.executor.models.transformers_backend import TransformersForCausalLM, transformers_problem

    names = list(getattr(hf_config, "architectures", None) or [])
    if model_impl != "transformers":
        for name in names:
            if name in ARCHITECTURES:
                return ARCHITECTURES[name]
    if model_impl == "kubellm":
        raise ValueError(f"model_impl: 'kubellm' but there is no kubellm model file for "
                         f"{names or hf_config.model_type!r} (supported: {', '.join(ARCHITECTURES)}); use "
                         "model_impl='auto' to run it on transformers' modeling code")
    problem = transformers_problem(hf_config)
    if problem is None:
        return TransformersForCausalLM
    if any(name in ARCHITECTURES for name in names):   # model_impl="transformers" on a family with a file
        raise ValueError(f"model_impl: 'transformers' but transformers' modeling code cannot run {names} here: "
                         f"{problem}; use model_impl='auto' (kubellm has a model file for it)")
    raise ValueError(f"unsupported architecture {names or hf_config.model_type!r} in config.json: kubellm has no "
                     f"model file for it (supported: {', '.join(ARCHITECTURES)}) and transformers' modeling code "
                     f"cannot run it here: {problem}")


def uses_transformers_backend(hf_config, model_impl: str = "auto") -> bool:
    """True where model_class gives the Transformers backend (raises where nothing can run it)."""
    from kubellm.runtime.executor.models.transformers_backend import TransformersForCausalLM

    return model_class(hf_config, model_impl) is TransformersForCausalLM


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

"""Model architectures, chosen by the checkpoint's `config.json` `architectures` entry."""

from __future__ import annotations

from kubellm.runtime.models.llama import LlamaForCausalLM

ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(hf_config):
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"unsupported architecture {names or hf_config.model_type!r} in config.json; "
                     f"supported: {', '.join(ARCHITECTURES)}")

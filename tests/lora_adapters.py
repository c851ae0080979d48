"""LoRA adapters for tests, written by peft itself: random A and B (peft's default B is zeros, which would
change nothing), saved with save_pretrained; and the reference, the adapter merged into a transformers
model (peft's merge_and_unload)."""

from __future__ import annotations

from pathlib import Path

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, *, rank: int = 4, alpha: int = 8, targets=LLAMA_TARGETS, seed: int = 0,
                 **lora_options) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        **lora_options)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():   # small deltas: the adapter changes the tokens without drowning the base model
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(out)
    return Path(out)


def merged_model(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()

"""Rotary embedding with a precomputed cos/sin table; scaling variants come from the HF config."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels.dispatch import apply_rotary


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) exactly as Hugging Face computes them for this config."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_scaling type 'dynamic' is not supported (its table changes with length); "
                         "supported: default, linear, llama3, yarn, longrope")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: default, "
                         + ", ".join(sorted(k for k in ROPE_INIT_FUNCTIONS if k != "dynamic")))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float).unsqueeze(1) * inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].to(q.dtype)
        sin = self.sin[positions].to(q.dtype)
        return apply_rotary(q, k, cos, sin)

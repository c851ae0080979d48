"""Rotary position embedding (GPT-NeoX / Llama "rotate half" layout)."""

from __future__ import annotations

import torch


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by per-token cos/sin [T, D]; returns new tensors."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), rotate(k)

"""Position encodings beyond full-width rotary: learned absolute positions (OPT, GPT-2) and
rotary over only the first dims of each head (Phi's partial rotary)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.executor.layers.rotary import RotaryEmbedding


class LearnedPositionEmbedding(nn.Module):
    """A table of `num_positions + offset` rows, replicated on every rank; OPT stores its
    positions shifted by an offset of 2."""

    def __init__(self, num_positions: int, hidden_size: int, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(num_positions + offset, hidden_size), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)


def partial_rotary_factor(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0))


class PartialRotaryEmbedding(nn.Module):
    """Rotary ("rotate half" layout) on the first `rotary_dim` dims of each head; the rest pass."""

    def __init__(self, hf_config, head_dim: int, rotary_dim: int, max_positions: int):
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.rotary = RotaryEmbedding(hf_config, rotary_dim, max_positions)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        d = self.rotary_dim
        if d == self.head_dim:
            return self.rotary(positions, q, k)
        q_rot, k_rot = self.rotary(positions, q[..., :d].contiguous(), k[..., :d].contiguous())
        return torch.cat((q_rot, q[..., d:]), dim=-1), torch.cat((k_rot, k[..., d:]), dim=-1)

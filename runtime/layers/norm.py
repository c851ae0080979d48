"""RMSNorm layer over the fused residual-add kernel."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels.dispatch import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: the normed tensor. With it: (normed, new residual)."""
        out, new_residual = rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, new_residual)

"""Normalisation layers, replicated on every rank: RMSNorm over the fused residual-add kernel, and LayerNorm
with optional weight and bias (OPT, GPT-2, Phi, Falcon)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, elementwise_affine: bool = True):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False) if elementwise_affine else None
        self.bias = (nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
                     if elementwise_affine and bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

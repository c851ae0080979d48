"""MLP activations: SiLU-and-multiply for packed gate/up projections, and the element-wise ones by their
Hugging Face `hidden_act` / `activation_function` names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.kernels.dispatch import silu_and_mul


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation, written exactly as transformers' NewGELUActivation.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "silu": F.silu,
}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        self.name, self.fn = name, _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class SiluAndMul(nn.Module):
    """silu(gate) * up over the packed [gate | up] projection, as one kernel."""

    def forward(self, x):
        return silu_and_mul(x)

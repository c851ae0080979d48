"""The fixed orthogonal rotation a quantized KV cache stores its keys in (QuaRot's idea, applied to the
cache only).

A head vector's error after int8 / int4 quantization grows with its largest entry: the scale is set by it.
Keys have a few outlier dimensions (RoPE's low frequencies, bias-like channels), so most of their codes go
unused. Rotated by an orthogonal R, a key keeps its length but spreads it over every dimension, and its scale
shrinks. Scores do not change: (qR)·(kR) = q·k. So PagedAttention rotates q and k before the cache and the
kernels, and the kernels are unchanged.

Measured on SmolLM2 (`python -m kubellm.bench.kv_quant`: the attention output's error relative to the float
cache, over every layer of five 200-token answers): int8 0.0150 -> 0.0096, int4 0.179 -> 0.140 with the keys
rotated. Values have no outlier dimensions: rotating them too (and the output back) took a one-off
measurement only from 0.011 to 0.010 (int8) and 0.164 to 0.158 (int4), for twice the matmuls, so they stay
as they are.

R is a Hadamard matrix with random signs on its rows (a "randomized Hadamard") where the head size is a power
of two, else a random orthogonal matrix. Both come from a fixed seed, so every rank, every restart and every
swapped or prefix-cached block use the same one.
"""

from __future__ import annotations

import functools

import torch

SEED = 0x4B56   # fixed: the cache's contents are only readable with the matrix they were written with


@functools.lru_cache(maxsize=None)
def _float64(head_dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    if head_dim & (head_dim - 1) == 0:   # Sylvester's construction, H_2n = [[H, H], [H, -H]]
        hadamard = torch.ones(1, 1, dtype=torch.float64)
        while hadamard.shape[0] < head_dim:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
        signs = torch.randint(0, 2, (head_dim, 1), generator=generator, dtype=torch.float64) * 2 - 1
        return signs * hadamard / head_dim ** 0.5
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))   # the sign fix makes it uniform over rotations (Mezzadri)


def rotation(head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthogonal [head_dim, head_dim] matrix R: a quantized cache holds k @ R, and queries meet it as q @ R."""
    return _float64(head_dim).to(device=device, dtype=dtype, copy=True)

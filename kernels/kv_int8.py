"""An int8 KV cache (LMDeploy's quant_policy=8): each token's key (and value) of each KV head is stored as
int8 with one float32 scale, max|x| / 127 over the head dimension. These are the plain-PyTorch references;
attention_triton.py quantizes while it writes and dequantizes in its tiles.

A layer's int8 cache is the pair of int8 tensors [num_blocks, block_size, Hkv, D] plus scales
[num_blocks, block_size, Hkv] (float32): D + 4 bytes per token and head instead of 2·D (bf16) or 4·D (fp32).
"""

from __future__ import annotations

import torch

BITS = 8
QMAX = 127.0
TINY = 1e-10   # an all-zero head vector gets this scale rather than 0 (no 0/0)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], scale [...] float32) with x ≈ q * scale."""
    scale = x.float().abs().amax(dim=-1).clamp(min=TINY) / QMAX
    q = torch.round(x.float() / scale.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Quantize key/value [T, Hkv, D] and store them (and their scales) at flat cache slots [T]."""
    for x, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        q, s = quantize(x)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, q)
        scales.view(-1, scales.shape[-1]).index_copy_(0, slot_mapping, s)

"""An int4 KV cache (LMDeploy's quant_policy=4): each token's key (and value) of each KV head is stored as
4-bit codes with a float32 scale and zero point over the head dimension, asymmetric as LMDeploy's is:
x ≈ code * scale + zero, zero = min(x), scale = (max(x) - min(x)) / 15. Asymmetric because 16 levels are
few: a symmetric code would spend half of them on the sign a head's range often does not need.
These are the plain-PyTorch references; attention_triton.py quantizes while it writes and dequantizes in
its tiles.

A layer's int4 cache is the pair of uint8 tensors [num_blocks, block_size, Hkv, D / 2], two codes a byte
(dimension 2i in the low nibble, 2i + 1 in the high one), plus params [num_blocks, block_size, Hkv, 2]
(float32 scale, zero): D / 2 + 8 bytes per token and head instead of 2·D (bf16) or 4·D (fp32).
The cache's dtype tells the formats apart: uint8 is this one, int8 is kv_int8.py's.
"""

from __future__ import annotations

import torch

BITS = 4
LEVELS = 15.0
TINY = 1e-10   # a constant head vector gets this scale rather than 0 (no 0/0)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D even) -> (uint8 [..., D/2], params [..., 2] float32: scale, zero)."""
    x = x.float()
    zero = x.amin(dim=-1)
    scale = (x.amax(dim=-1) - zero).clamp(min=TINY) / LEVELS
    # floor(y + 0.5), not round (half to even): the Triton write rounds the same way
    codes = torch.floor((x - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 0.5).clamp(0, LEVELS).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), torch.stack([scale, zero], dim=-1)


def dequantize(packed: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    return (codes.float() * params[..., :1] + params[..., 1:]).to(dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_params: torch.Tensor, v_params: torch.Tensor) -> None:
    """Quantize key/value [T, Hkv, D] and store them (and their params) at flat cache slots [T]."""
    for x, cache, params in ((key, k_cache, k_params), (value, v_cache, v_params)):
        q, p = quantize(x)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, q)
        params.view(-1, *params.shape[2:]).index_copy_(0, slot_mapping, p)

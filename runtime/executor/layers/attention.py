"""Attention over the paged KV cache: store the step's keys/values, then attend."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels.dispatch import paged_decode_attention, paged_prefill_attention, write_kv_cache
from kubellm.runtime.executor.context import get_context


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x @ rotation in float32 (the rotation is float32: 1/sqrt(D) is not exact in bf16, and a rotation rounded
    to bf16 would scale every score a little)."""
    return (x.float() @ rotation).to(x.dtype)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, Hkv, D]. A quantized
        # cache also has scales: int8 (kv_cache_dtype='int8') [num_blocks, block_size, Hkv]; int4 holds
        # [..., Hkv, D / 2] bytes with scales [..., Hkv, 2] (scale, zero) (kernels/kv_int8.py, kv_int4.py).
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = None
        # A quantized cache holds its keys rotated by this orthogonal [D, D] matrix (kernels/key_rotation.py):
        # rotated, a key has no outlier dimension to set its scale. None: a float cache, nothing rotated.
        self.key_rotation: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k / v [T, Hkv, D] -> [T, Hq, D]. Rotating q like k leaves every score as it was."""
        rotation = self.key_rotation
        if rotation is None:
            return self.attend(q, k, v)
        return self.attend(_rotate(q, rotation), _rotate(k, rotation), v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the step's keys and values in the cache, then attend over it."""
        ctx = get_context()
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        write_kv_cache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, **scales)
        if not ctx.prefills:   # decodes only: every row, no count read (a compiled step would specialize on it)
            return paged_decode_attention(q, self.k_cache, self.v_cache, ctx.decode_block_tables,
                                          ctx.decode_context_lens, self.scale, self.sliding_window, **scales)
        out = torch.empty_like(q)
        nd = ctx.num_decode
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], self.k_cache, self.v_cache, ctx.decode_block_tables,
                                              ctx.decode_context_lens, self.scale, self.sliding_window, **scales)
        for chunk in ctx.prefills:  # its block table and mask were built once, for every layer
            rows = chunk.rows
            out[rows] = paged_prefill_attention(q[rows], k[rows], v[rows], self.k_cache, self.v_cache,
                                                chunk.block_table, chunk.context_len, self.scale,
                                                self.sliding_window, chunk.masks.get(self.sliding_window), **scales)
        return out

"""Paged attention whose scores are not plain scaled dot products: ALiBi (Bloom) and soft-capping
(Gemma 2), for the Transformers backend.

The keys/values go into the paged cache as for any layer (the same KV write); the attention
itself is plain PyTorch over the gathered blocks, scores in float32 as transformers' eager code
computes them: `scale * q.k`, then `cap * tanh(score / cap)`, then `+ slope_h * key position`,
then the causal / sliding-window mask and a softmax. There is no Triton kernel for these yet, so
on a GPU they are slower than PagedAttention; plain softmax layers never come here.
"""

from __future__ import annotations

import torch

from kubellm.kernels.attention import gather_blocks
from kubellm.kernels.dispatch import write_kv_cache
from kubellm.runtime.executor.context import get_context
from kubellm.runtime.executor.layers.attention import PagedAttention


class BiasedPagedAttention(PagedAttention):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 softcap: float | None = None):
        """`alibi_slopes`: [num_heads] float32, this rank's heads; `softcap`: the logit cap."""
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        self.alibi_slopes = alibi_slopes
        self.softcap = softcap

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        write_kv_cache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.k_scale, self.v_scale)
        out = torch.empty_like(q)
        nd = ctx.num_decode
        if nd:
            lens = ctx.decode_context_lens
            keys, values = self._gather(ctx.decode_block_tables, q.dtype)
            out[:nd] = self._attend(q[:nd, None], keys, values, (lens - 1)[:, None], lens)[:, 0]
        for chunk in ctx.prefills:
            n, length = chunk.length, chunk.context_len
            keys, values = self._gather(chunk.block_table[None], q.dtype)
            q_pos = torch.arange(length - n, length, device=q.device)[None]
            lens = torch.tensor([length], device=q.device)
            out[chunk.rows] = self._attend(q[chunk.rows][None], keys, values, q_pos, lens)[0]
        return out

    def _gather(self, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, blocks * block_size, Hkv, D] keys and values of each row's blocks, in order (a quantized cache's
        dequantized to `dtype`)."""
        batch, shape = block_tables.shape[0], (self.num_kv_heads, self.head_dim)   # (an int4 cache holds D / 2)
        flat = block_tables.flatten()
        return (gather_blocks(self.k_cache, self.k_scale, flat, dtype).view(batch, -1, *shape),
                gather_blocks(self.v_cache, self.v_scale, flat, dtype).view(batch, -1, *shape))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
                context_lens: torch.Tensor) -> torch.Tensor:
        """q [B, n, Hq, D] at positions q_pos [B, n]; keys/values [B, L, Hkv, D] of which the first
        context_lens [B] are real. -> [B, n, Hq, D]."""
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=2)
        values = values.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        k_pos = torch.arange(keys.shape[1], device=q.device)
        if self.alibi_slopes is not None:
            # slope * key position: softmax is shift-invariant, so this is ALiBi's slope * (k - q)
            scores = scores + self.alibi_slopes.to(q.device)[None, :, None, None] * k_pos.float()
        allowed = (k_pos[None, None] <= q_pos[..., None]) & (k_pos < context_lens[:, None])[:, None]
        if self.sliding_window is not None:
            allowed &= k_pos[None, None] > q_pos[..., None] - self.sliding_window
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", probs, values)

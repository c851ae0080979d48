"""Attention over a paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim];
a sequence's keys live in the blocks its block table lists, in order. These are the plain
PyTorch references: they gather a sequence's blocks and run dense attention.

A quantized cache comes with its scales (k_scale / v_scale): an int8 cache (kv_int8.py) or an int4 one
(kv_int4.py, uint8 bytes of two codes, scales holding scale and zero); the cache's dtype says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubellm.kernels import kv_int4, kv_int8


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, Hkv, D] at flat cache slots (block * block_size + offset) [T]; with scales the cache
    is quantized (int8 or int4, by its dtype) as it is written."""
    if k_scale is not None:
        kv_format(k_cache).write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask [.., Tq, Tk]: True where a query may attend."""
    allowed = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        allowed &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - sliding_window
    return allowed


def kv_format(cache: torch.Tensor):
    """The module that quantizes and dequantizes a quantized cache: kv_int4 for uint8, kv_int8 for int8."""
    return kv_int4 if cache.dtype == torch.uint8 else kv_int8


def gather_blocks(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """The listed blocks [len(blocks), block_size, Hkv, D] of a cache, dequantized where it is quantized."""
    if scales is None:
        return cache.index_select(0, blocks)
    return kv_format(cache).dequantize(cache.index_select(0, blocks), scales.index_select(0, blocks), dtype)


_decode_mask_cache: tuple | None = None   # (context_lens copy, width, window, dtype, mask): the step's, every layer's


def _decode_mask(context_lens: torch.Tensor, width: int, sliding_window: int | None, dtype) -> torch.Tensor:
    """[B, 1, 1, width] mask of the keys each decode may read. Every layer of a step passes the same context
    lengths, so on CPU it is built once per step (kept while the lengths are equal). On CPU an additive float mask (0 / -inf): torch's CPU SDPA runs 2x faster
    with it than with a boolean one at 16 sequences (`kubellm bench kernels --cpu`)."""
    global _decode_mask_cache
    cached = _decode_mask_cache
    compiling = torch.compiler.is_compiling()   # a compiled step builds it once itself, and keeps nothing
    cpu = context_lens.device.type == "cpu"
    if cpu and not compiling and cached is not None and cached[1:4] == (width, sliding_window, dtype) and \
            torch.equal(cached[0], context_lens):
        return cached[4]
    k_pos = torch.arange(width, device=context_lens.device)
    valid = k_pos < context_lens.unsqueeze(1)
    if sliding_window is not None:
        valid &= k_pos > (context_lens - 1 - sliding_window).unsqueeze(1)
    mask = valid[:, None, None, :]
    if cpu:   # (a GPU step may be a CUDA graph capture: nothing of it is kept)
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        if not compiling:
            _decode_mask_cache = (context_lens.clone(), width, sliding_window, dtype, mask)
    return mask


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q [B, Hq, D]; block_tables [B, M]; context_lens [B] -> [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # [B, Hkv, M*bs, D] views of the gathered blocks (index_select copies whole blocks at once).
    # (Sizes spelled out, not -1: a compiled step then knows the table has a row per query.)
    blocks, keys = block_tables.flatten(), block_tables.shape[1] * k_cache.shape[1]
    k = gather_blocks(k_cache, k_scale, blocks, q.dtype).view(batch, keys, num_kv_heads, head_dim).transpose(1, 2)
    v = gather_blocks(v_cache, v_scale, blocks, q.dtype).view(batch, keys, num_kv_heads, head_dim).transpose(1, 2)
    # Grouped-query attention without repeating K/V: a group's query heads act as its query rows.
    qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if q.device.type == "cpu" and batch == 1 and not torch.compiler.is_compiling():
        # One sequence: its keys cut to its context (and window), no mask. torch's CPU SDPA with a mask is up to
        # 8x slower than without at 512 keys (`kubellm bench kernels --cpu`); on a CPU reading the length is free
        # (not in a compiled step: a length read from a tensor would end its graph).
        end = int(context_lens[0])
        begin = 0 if sliding_window is None else max(0, end - sliding_window)
        out = F.scaled_dot_product_attention(qg, k[:, :, begin:end], v[:, :, begin:end], scale=scale)
    else:
        mask = _decode_mask(context_lens, k.shape[2], sliding_window, q.dtype)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def prefill_mask(num_queries: int, context_len: int, sliding_window: int | None,
                 device: torch.device) -> torch.Tensor | None:
    """The mask [n, context_len] of a chunk of n queries, the last n of context_len tokens; None
    where plain causal attention (the chunk is the whole context, no window) needs none."""
    if context_len <= num_queries and sliding_window is None:
        return None
    q_pos = torch.arange(context_len - num_queries, context_len, device=device)
    k_pos = torch.arange(context_len, device=device)
    return _window_mask(q_pos, k_pos, sliding_window)


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            context_len: int, scale: float, sliding_window: int | None = None,
                            mask: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk of n query tokens of one sequence, the last n of its context_len tokens, causal.

    q [n, Hq, D]; k/v [n, Hkv, D] are the chunk's own keys (already written to the cache). When
    the chunk is the whole context they are used directly; otherwise the cached prefix is read
    through the block table. `mask`: prefill_mask(...) built once per step by the caller (every
    layer shares it); None builds it here. A quantized cache (scales given) is always read back, as the
    Triton kernel reads it, so a chunk attends to the same (quantized) keys on either path.
    """
    n, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[2]
    if context_len > n or k_scale is not None:
        block_size = k_cache.shape[1]
        blocks = block_table[: (context_len + block_size - 1) // block_size]
        k = gather_blocks(k_cache, k_scale, blocks, q.dtype).flatten(0, 1)[:context_len]
        v = gather_blocks(v_cache, v_scale, blocks, q.dtype).flatten(0, 1)[:context_len]
    if mask is None:
        mask = prefill_mask(n, context_len, sliding_window, q.device)
    group = num_heads // num_kv_heads
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0),
        v.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0),
        attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.squeeze(0).transpose(0, 1)

"""Triton attention over the paged KV cache: same signatures as the references in attention.py.

The cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]. The kernels never
gather blocks into a dense copy: each tile of BLOCK_N key positions looks its cache blocks up in
the block table (position // block_size) and reads keys and values in place, so any block size
works and a block index can be anything below num_blocks (addresses are computed in int64).

Softmax is the online (flash) form: a running max m, running sum l and an unnormalised
accumulator, in base 2 (exp2 is the fast path; scores are pre-multiplied by log2(e)).
Head sizes that are not powers of two (80) are padded to the next one and masked.

A quantized cache (scales passed as k_scale / v_scale) is quantized by the write kernel and dequantized
tile by tile as the attention kernels load it: int8 (kv_int8.py: one float32 scale per token and KV head)
or int4 (kv_int4.py: uint8 bytes of two codes, a float32 scale and zero per token and KV head). KV_BITS
says which: 16 for a cache in the model's dtype, 8, or 4; kv_bits() reads it off the cache's dtype.
"""

from __future__ import annotations

import torch

from kubellm.kernels import attention
from kubellm.kernels.triton_support import block, dot_dtype, dot_precision

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634
# Tiles for 16-bit inputs; float32 tiles are halved so K/V tiles (double-buffered by the
# software pipeline, NUM_STAGES) still fit in shared memory at head size 128.
DECODE_BLOCK_N = 64        # key positions per tile in decode
PREFILL_BLOCK_M = 64       # query rows per program in prefill
PREFILL_BLOCK_N = 64       # key positions per tile in prefill
NUM_STAGES = 2
MIN_KV_PER_SPLIT = 256     # split-KV only pays off when each split still reads this many keys
MAX_SPLITS = 32


# ---------------------------------------------------------------------------------------------
# KV-cache write
# ---------------------------------------------------------------------------------------------

def kv_bits(cache: torch.Tensor, scales: torch.Tensor | None) -> int:
    """16 for a cache in the model's dtype, else its format's (attention.kv_format tells them apart)."""
    return 16 if scales is None else attention.kv_format(cache).BITS


@triton.jit
def _quantize_store(x, cache_ptr, scale_ptr, dest, scale_dest, mask, head_mask):
    """x [BLOCK_H, BLOCK_D] as int8 with one scale per row (head): max|x| / 127 (kv_int8.py)."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-10) / 127.0
    scaled = x / scale[:, None]
    rounded = tl.where(scaled >= 0, tl.floor(scaled + 0.5), tl.ceil(scaled - 0.5))
    tl.store(cache_ptr + dest, tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8), mask=mask)
    tl.store(scale_ptr + scale_dest, scale, mask=head_mask)


@triton.jit
def _quantize_store_int4(even, odd, cache_ptr, params_ptr, dest, params_dest, mask, head_mask):
    """even / odd [BLOCK_H, BLOCK_D / 2]: a row's (head's) dimensions 2i and 2i + 1, stored as a byte of two
    4-bit codes with the row's scale and zero (kv_int4.py: zero = min, scale = (max - min) / 15)."""
    even, odd = even.to(tl.float32), odd.to(tl.float32)
    zero = tl.minimum(tl.min(tl.where(mask, even, float("inf")), 1), tl.min(tl.where(mask, odd, float("inf")), 1))
    top = tl.maximum(tl.max(tl.where(mask, even, float("-inf")), 1), tl.max(tl.where(mask, odd, float("-inf")), 1))
    zero = tl.where(head_mask, zero, 0.0)   # (a padding head has no values: keep its arithmetic finite)
    scale = tl.maximum(tl.where(head_mask, top, 0.0) - zero, 1e-10) / 15.0
    low = tl.minimum(tl.maximum(tl.floor((even - zero[:, None]) / scale[:, None] + 0.5), 0.0), 15.0)
    high = tl.minimum(tl.maximum(tl.floor((odd - zero[:, None]) / scale[:, None] + 0.5), 0.0), 15.0)
    tl.store(cache_ptr + dest, (low.to(tl.int32) | (high.to(tl.int32) << 4)).to(tl.uint8), mask=mask)
    tl.store(params_ptr + params_dest, scale, mask=head_mask)
    tl.store(params_ptr + params_dest + 1, zero, mask=head_mask)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                     key_stride_t, key_stride_h, value_stride_t, value_stride_h,
                     cache_stride_slot, cache_stride_h, scale_stride_slot, scale_stride_h,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_BITS: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    # An int4 cache's byte i holds dimensions 2i and 2i + 1: its tiles are half as wide, read twice.
    width: tl.constexpr = HEAD_DIM // 2 if KV_BITS == 4 else HEAD_DIM
    dims = tl.arange(0, BLOCK_D // 2 if KV_BITS == 4 else BLOCK_D)[None, :]
    # A negative slot is a padding row (a CUDA-graph batch bucket larger than the real batch).
    # (slot + heads * 0: the test is a tile, not a scalar; Triton's interpreter rejects a
    # scalar condition and-ed into a tile mask.)
    mask = (heads < NUM_KV_HEADS) & (dims < width) & (slot + heads * 0 >= 0)
    dest = slot * cache_stride_slot + heads * cache_stride_h + dims
    head_mask = tl.max(mask.to(tl.int32), 1) > 0
    scale_dest = slot * scale_stride_slot + tl.arange(0, BLOCK_H) * scale_stride_h
    key_at = key_ptr + token * key_stride_t + heads * key_stride_h
    value_at = value_ptr + token * value_stride_t + heads * value_stride_h
    if KV_BITS == 4:
        _quantize_store_int4(tl.load(key_at + 2 * dims, mask=mask, other=0.0),
                             tl.load(key_at + 2 * dims + 1, mask=mask, other=0.0),
                             k_cache_ptr, k_scale_ptr, dest, scale_dest, mask, head_mask)
        _quantize_store_int4(tl.load(value_at + 2 * dims, mask=mask, other=0.0),
                             tl.load(value_at + 2 * dims + 1, mask=mask, other=0.0),
                             v_cache_ptr, v_scale_ptr, dest, scale_dest, mask, head_mask)
    else:
        key = tl.load(key_at + dims, mask=mask, other=0.0)
        value = tl.load(value_at + dims, mask=mask, other=0.0)
        if KV_BITS == 8:
            _quantize_store(key, k_cache_ptr, k_scale_ptr, dest, scale_dest, mask, head_mask)
            _quantize_store(value, v_cache_ptr, v_scale_ptr, dest, scale_dest, mask, head_mask)
        else:
            tl.store(k_cache_ptr + dest, key, mask=mask)
            tl.store(v_cache_ptr + dest, value, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Store key/value [T, Hkv, D] at flat cache slots [T]; slots < 0 are skipped (padding). With
    scales the cache is int8 or int4 (by its dtype), quantized here (kv_int8.py's, kv_int4.py's rule)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.stride() == v_cache.stride()
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    bits = kv_bits(k_cache, k_scale)
    if bits < 16:
        assert k_scale.is_contiguous() and v_scale.is_contiguous()
    # (scales' stride 2 is the step from one head's scales to the next: 1 (int8) or 2 (int4, scale and zero))
    k_scales, v_scales = (k_scale, v_scale) if bits < 16 else (k_cache, v_cache)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_scales, v_scales, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), k_scales.stride(1), k_scales.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=block(num_kv_heads, 1), BLOCK_D=block(head_dim), KV_BITS=bits)


@triton.jit
def _load_kv(cache_ptr, scale_ptr, offset, scale_offset, dims, kv_mask, valid,
             KV_BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of keys or values from the cache; an int8 cache's rows times their scales,
    an int4 cache's codes (two a byte, each byte read for both) times their scales plus their zeros."""
    if KV_BITS == 4:
        packed = tl.load(cache_ptr + offset[:, None] + (dims // 2)[None, :], mask=kv_mask, other=0)
        codes = (packed.to(tl.int32) >> ((dims % 2) * 4)[None, :]) & 15
        scale = tl.load(scale_ptr + scale_offset, mask=valid, other=0.0)
        zero = tl.load(scale_ptr + scale_offset + 1, mask=valid, other=0.0)
        return (codes.to(tl.float32) * scale[:, None] + zero[:, None]).to(DOT_DTYPE)
    tile = tl.load(cache_ptr + offset[:, None] + dims[None, :], mask=kv_mask, other=0)
    if KV_BITS == 8:
        scale = tl.load(scale_ptr + scale_offset, mask=valid, other=0.0)
        return (tile.to(tl.float32) * scale[:, None]).to(DOT_DTYPE)
    return tile.to(DOT_DTYPE)


# ---------------------------------------------------------------------------------------------
# Decode: one query token per sequence, split-KV
# ---------------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, context_lens_ptr,
                   out_ptr, split_out_ptr, split_lse_ptr,
                   qk_scale, sliding_window,
                   q_stride_b, q_stride_h, out_stride_b, out_stride_h, table_stride_b,
                   cache_stride_block, cache_stride_pos, cache_stride_h,
                   scale_stride_block, scale_stride_pos, scale_stride_h,
                   KV_BITS: tl.constexpr, CACHE_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one sequence x one KV head (all GROUP query heads sharing it) x one split.

    The group's query heads are the rows of a [BLOCK_G, D] tile so K/V are read once per group,
    and tl.dot gets at least 16 rows (padding rows hold zeros and are never stored).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)

    # This split's share of the sequence, in whole tiles so splits never share a tile.
    kv_per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * kv_per_split
    end = tl.minimum(start + kv_per_split, context_len)
    if HAS_WINDOW:  # keys at positions > last - window, i.e. >= context_len - window
        start = tl.maximum(start, context_len - sliding_window)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * table_stride_b
    # Every tile starts below `end`, so it holds at least one valid key and m stays finite.
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        cache_block = tl.load(table + pos // CACHE_BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = (cache_block * cache_stride_block + (pos % CACHE_BLOCK_SIZE) * cache_stride_pos
                  + kv_head * cache_stride_h)
        kv_mask = valid[:, None] & dim_ok[None, :]
        scale_offset = (cache_block * scale_stride_block + (pos % CACHE_BLOCK_SIZE) * scale_stride_pos
                        + kv_head * scale_stride_h)
        k = _load_kv(k_cache_ptr, k_scale_ptr, offset, scale_offset, dims, kv_mask, valid, KV_BITS, DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _load_kv(v_cache_ptr, v_scale_ptr, offset, scale_offset, dims, kv_mask, valid, KV_BITS, DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m = m_new

    store_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / l[:, None]  # split 0 always holds the last key, so l > 0
        tl.store(out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partial results in float32: [B, Hq, NUM_SPLITS, HEAD_DIM] and log2-sum-exp [B, Hq, NUM_SPLITS].
        # An empty split (short sequence, or outside the window) gets lse = -inf and weight 0.
        empty = l == 0.0
        partial = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l)[:, None])
        lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))
        row = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(split_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], partial, mask=store_mask)
        tl.store(split_lse_ptr + row, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(split_out_ptr, split_lse_ptr, out_ptr, out_stride_b, out_stride_h,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the splits of one (sequence, query head): weights 2^(lse - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(split_lse_ptr + row, mask=splits < NUM_SPLITS, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    partial = tl.load(split_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                      mask=(splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(weight[:, None] * partial, 0)
    tl.store(out_ptr + seq * out_stride_b + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def _tile(size_for_16_bit: int, dtype: torch.dtype) -> int:
    return size_for_16_bit if dtype.itemsize <= 2 else size_for_16_bit // 2


def _num_decode_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough programs to fill the GPU when the batch alone does not, each split >= MIN_KV_PER_SPLIT keys.

    Decided from shapes only (no GPU sync), so a captured CUDA graph keeps its split count.
    """
    if max_context <= MIN_KV_PER_SPLIT:
        return 1
    if device.type == "cuda":
        processors = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        processors = 4  # interpreter: small, but enough to exercise the split path
    wanted = triton.cdiv(2 * processors, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_KV_PER_SPLIT), MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, num_splits: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q [B, Hq, D]; block_tables [B, M]; context_lens [B] -> [B, Hq, D].

    `num_splits` (tests, benchmarks) overrides the split-KV heuristic. With k_scale / v_scale the cache is
    quantized (int8 or int4, by its dtype).
    """
    batch, num_heads, head_dim = q.shape
    _, cache_block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if batch == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.stride(-1) == 1
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = _num_decode_splits(batch, num_kv_heads, block_tables.shape[1] * cache_block_size, q.device)
    if num_splits > 1:
        split_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        split_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        split_out = split_lse = out  # unused
    block_d = block(head_dim)
    bits = kv_bits(k_cache, k_scale)
    k_scales, v_scales = (k_scale, v_scale) if bits < 16 else (k_cache, v_cache)   # not read unless quantized
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens, out, split_out, split_lse,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scales.stride(0), k_scales.stride(1), k_scales.stride(2),
        KV_BITS=bits, CACHE_BLOCK_SIZE=cache_block_size, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=block(group), BLOCK_D=block_d, BLOCK_N=_tile(DECODE_BLOCK_N, q.dtype),
        NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
        DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype), num_stages=NUM_STAGES)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            split_out, split_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=block(num_splits, 2), BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------------
# Prefill: a chunk of one sequence's queries against its cached prefix and itself, causal
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, out_ptr,
                    num_queries, context_len, qk_scale, sliding_window,
                    q_stride_t, q_stride_h, out_stride_t, out_stride_h,
                    cache_stride_block, cache_stride_pos, cache_stride_h,
                    scale_stride_block, scale_stride_pos, scale_stride_h,
                    KV_BITS: tl.constexpr, CACHE_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = BLOCK_M query rows of one query head; keys come from the cache only."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    first_position = context_len - num_queries  # position of query row 0

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    dim_ok = dims < HEAD_DIM
    q_pos = first_position + rows
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)

    # Causality bounds the keys this tile can see by its last row; the window by its first.
    hi = tl.minimum(context_len, first_position + (tile + 1) * BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, first_position + tile * BLOCK_M - sliding_window + 1)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        cache_block = tl.load(block_table_ptr + pos // CACHE_BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = (cache_block * cache_stride_block + (pos % CACHE_BLOCK_SIZE) * cache_stride_pos
                  + kv_head * cache_stride_h)
        kv_mask = valid[:, None] & dim_ok[None, :]
        scale_offset = (cache_block * scale_stride_block + (pos % CACHE_BLOCK_SIZE) * scale_stride_pos
                        + kv_head * scale_stride_h)
        k = _load_kv(k_cache_ptr, k_scale_ptr, offset, scale_offset, dims, kv_mask, valid, KV_BITS, DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(allowed, scores, float("-inf"))
        # A row may see no key in this tile (causal or window edge): shift by 0 instead of -inf.
        m_new = tl.maximum(m, tl.max(scores, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        p = tl.exp2(scores - m_shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _load_kv(v_cache_ptr, v_scale_ptr, offset, scale_offset, dims, kv_mask, valid, KV_BITS, DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # every real row sees at least itself
    tl.store(out_ptr + rows[:, None] * out_stride_t + head * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            context_len: int, scale: float, sliding_window: int | None = None,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk of n query tokens of one sequence, the last n of its context_len tokens, causal.

    q [n, Hq, D]. The chunk's own keys k/v [n, Hkv, D] are already in the cache, so this reads
    every key, prefix and chunk alike, through the block table; k and v are not used.
    """
    num_queries, num_heads, head_dim = q.shape
    _, cache_block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_queries == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_table.dim() == 1 and block_table.stride(0) == 1
    block_m = _tile(PREFILL_BLOCK_M, q.dtype)
    grid = (triton.cdiv(num_queries, block_m), num_heads)
    bits = kv_bits(k_cache, k_scale)
    k_scales, v_scales = (k_scale, v_scale) if bits < 16 else (k_cache, v_cache)   # not read unless quantized
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, block_table, out,
        num_queries, int(context_len), scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scales.stride(0), k_scales.stride(1), k_scales.stride(2),
        KV_BITS=bits, CACHE_BLOCK_SIZE=cache_block_size, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=_tile(PREFILL_BLOCK_N, q.dtype), BLOCK_D=block(head_dim),
        HAS_WINDOW=sliding_window is not None,
        DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype), num_stages=NUM_STAGES)
    return out


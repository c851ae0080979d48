"""Triton rotary embedding ("rotate half" layout), same signature as rotary.py.

cos/sin come precomputed per token ([T, D], any scaling already applied: linear, Llama-3,
YaRN...), so the kernel is one formula: x * cos + rotate_half(x) * sin.
"""

from __future__ import annotations

import torch

from kubellm.kernels.triton_support import block

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402


@triton.jit
def _rotate(x_ptr, out_ptr, x_stride_t, x_stride_h, cos1, cos2, sin1, sin2, token,
            NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = x_ptr + token * x_stride_t + heads * x_stride_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = (-x2, x1)
    dst = out_ptr + token * NUM_HEADS * 2 * HALF + heads * 2 * HALF + dims
    tl.store(dst, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   q_stride_t, q_stride_h, k_stride_t, k_stride_h, table_stride,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per token: its cos/sin row is read once for all q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    table = token * table_stride + dims
    # The two halves of the table are equal for the usual cat((freqs, freqs)) tables, but any
    # table is honoured: each half of x uses its own half of cos/sin, as the reference does.
    cos1 = tl.load(cos_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr, q_out_ptr, q_stride_t, q_stride_h, cos1, cos2, sin1, sin2, token,
            NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate(k_ptr, k_out_ptr, k_stride_t, k_stride_h, cos1, cos2, sin1, sin2, token,
            NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by per-token cos/sin [T, D]; returns new tensors."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and head_dim % 2 == 0
    assert cos.stride(-1) == 1 and sin.stride() == cos.stride()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
            BLOCK_QH=block(num_q_heads, 1), BLOCK_KH=block(num_k_heads, 1), BLOCK_HALF=block(half))
    return q_out, k_out

"""Triton dequantize-GEMMs for the stored forms of quant.py (int4 group-wise affine, int8 and fp8 group-wise).

Each program computes a [BLOCK_M, BLOCK_N] tile of x @ W^T, dequantizing a [BLOCK_N, BLOCK_K] tile of
W in registers per step of K: the weights are read from memory once, in their packed bytes, which is
what makes decode (few rows, bound by reading weights) faster than a bf16 GEMM.

fp8 (e4m3) weights are loaded as their bytes and bitcast: a masked load's `other` cannot be an fp8 value,
and the e4m3 -> float32 conversion needs Hopper / Ada (sm89) on the GPU (the layers de-quantize on load
elsewhere: packed.py).
"""

from __future__ import annotations

import torch

from kubellm.kernels.triton_support import dot_dtype, dot_precision

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402


@triton.jit
def _dequant_matmul_kernel(x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_xm, stride_qn, stride_sn, stride_om,
                           GROUP: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DOT: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[:, None] & k_ok[None, :]
        groups = rn[:, None].to(tl.int64) * stride_sn + (ks // GROUP)[None, :]
        scale = tl.load(s_ptr + groups, mask=w_mask, other=0.0).to(tl.float32)
        if INT4:
            byte = tl.load(q_ptr + rn[:, None].to(tl.int64) * stride_qn + (ks // 2)[None, :], mask=w_mask, other=0)
            q = (byte.to(tl.int32) >> ((ks % 2) * 4)[None, :]) & 0xF
            low = tl.load(m_ptr + groups, mask=w_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * scale + low
        else:
            q = tl.load(q_ptr + rn[:, None].to(tl.int64) * stride_qn + ks[None, :], mask=w_mask, other=0)
            if FP8:
                q = q.to(tl.float8e4nv, bitcast=True)
            w = q.to(tl.float32) * scale
        acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _launch(x, qweight, scales, mins, bias, int4: bool, fp8: bool = False):
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).contiguous()
    m, k = rows.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 64   # tl.dot's smallest tile; decode rows are masked in
        block_n, block_k = 64, 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _dequant_matmul_kernel[grid](
            rows, qweight, scales, mins if mins is not None else scales, bias if bias is not None else scales, out,
            m, n, k, rows.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=k // scales.shape[1], INT4=int4, FP8=fp8, HAS_BIAS=bias is not None,
            DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(*shape[:-1], n)


def int4_linear(x: torch.Tensor, qweight, scales, mins, bias=None) -> torch.Tensor:
    return _launch(x, qweight, scales.contiguous(), mins.contiguous(), bias, int4=True)


def int8_linear(x: torch.Tensor, qweight, scales, bias=None) -> torch.Tensor:
    return _launch(x, qweight, scales.contiguous(), None, bias, int4=False)


def fp8_linear(x: torch.Tensor, qweight, scales, bias=None) -> torch.Tensor:
    """float8_e4m3fn `qweight` [N, K], float32 `scales` [N, K/group]."""
    return _launch(x, qweight.view(torch.uint8), scales.contiguous(), None, bias, int4=False, fp8=True)

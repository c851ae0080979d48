"""Triton SiLU(gate) * up over a packed [.., 2*I] gate/up projection (as activation.py)."""

from __future__ import annotations

import torch

from kubellm.kernels.triton_support import block

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402

MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded after SiLU like the unfused F.silu(gate) * up, so results match it closely.
    silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * INTERMEDIATE + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    assert rows.stride(-1) == 1
    out = torch.empty(*x.shape[:-1], intermediate, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        tile = min(block(intermediate), MAX_BLOCK)
        grid = (rows.shape[0], triton.cdiv(intermediate, tile))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), INTERMEDIATE=intermediate, BLOCK=tile)
    return out

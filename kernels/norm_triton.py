"""Triton RMSNorm with the fused residual add: same signature and rounding steps as norm.py."""

from __future__ import annotations

import torch

from kubellm.kernels.triton_support import block

import triton  # noqa: E402  (triton_support settles TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     x_stride, residual_stride, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One program per row; the whole row fits in one tile (hidden sizes are at most a few 10k)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype before normalising, as the unfused `x + residual` is.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * residual_stride + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * HIDDEN + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / HIDDEN + eps)
    # Cast back before the weight multiply, exactly like Hugging Face (and the reference).
    h = h.to(x.dtype).to(tl.float32) * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (norm(x [+ residual]) * weight, the summed residual or None)."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    res_rows = residual.reshape(-1, hidden) if residual is not None else None
    assert rows.stride(-1) == 1 and (res_rows is None or res_rows.stride(-1) == 1)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # what `weight * h` gives
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res_rows if res_rows is not None else rows, weight, out,
            residual_out if residual_out is not None else out,
            rows.stride(0), res_rows.stride(0) if res_rows is not None else 0, eps,
            HIDDEN=hidden, BLOCK=block(hidden), HAS_RESIDUAL=residual is not None)
    return out, residual_out

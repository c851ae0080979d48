"""Weight-only quantized linear layers, plain PyTorch: the reference every faster path is checked against.

Two stored forms cover every format kubellm reads (layers/quantization/ turns AWQ, GPTQ, GGUF and
int8-on-load into them):

- int4, group-wise affine: `qweight` uint8 [N, K/2], two 4-bit values per byte (column 2j in the low
  nibble, 2j+1 in the high one), `scales` and `mins` [N, K/group]; w[n, k] = q * scale + min.
  AWQ / GPTQ's `(q - zero) * scale` is min = -zero * scale; GGUF Q4_0 is min = -8 * scale; Q4_1 is its own.
- int8, group-wise symmetric: `qweight` int8 [N, K], `scales` [N, K/group]; w = q * scale. One
  group per row (K/group = 1) is per-output-channel int8; GGUF Q8_0 has groups of 32.
- fp8, group-wise: `qweight` float8_e4m3fn [N, K], `scales` float32 [N, K/group]; w = q * scale. FP8
  checkpoints (compressed-tensors, transformers' fp8) as stored: a block of [rows, columns] is one
  scale per `columns` group, repeated on each of its rows.

`scales` / `mins` of int4 / int8 are stored in the activations' dtype; fp8's stay float32 (a block's
scale multiplies up to 128 x 128 weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in 0..15 (any integer dtype) -> uint8 [N, K/2], column 2j low, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(qweight).to(scales.dtype)
    group = q.shape[1] // scales.shape[1]
    return q * scales.repeat_interleave(group, 1) + mins.repeat_interleave(group, 1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 or fp8 `qweight` (any dtype that casts to float exactly) times its group scales."""
    group = qweight.shape[1] // scales.shape[1]
    return qweight.to(scales.dtype) * scales.repeat_interleave(group, 1)



def int4_linear(x: torch.Tensor, qweight, scales, mins, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, mins).to(x.dtype), bias)


def int8_linear(x: torch.Tensor, qweight, scales, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales).to(x.dtype), bias)


def fp8_linear(x: torch.Tensor, qweight, scales, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales.float()).to(x.dtype), bias)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a float [N, K]: one scale per row (group_size None) or per group of columns.
    Returns (int8 [N, K], float32 scales [N, K/group]); all-zero groups get scale 1."""
    n, k = w.shape
    group = group_size or k
    grouped = w.float().reshape(n, k // group, group)
    scales = grouped.abs().amax(-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(grouped / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales

"""The CPU path of the quantized linears: torch's own weight-only kernels, fed bfloat16 activations.

Chosen by measurement (`python -m kubellm.bench.quant_kernels`, figures in docs/quantization.md):
on this AVX-512 (bf16, VNNI) CPU `aten._weight_int4pack_mm_for_cpu` and `aten._weight_int8pack_mm`
with bfloat16 activations read the packed weights near memory bandwidth, several times faster than a
float32 `linear` at decode shapes, while the same ops with float32 activations are up to 20x slower
than float32 `linear` (issue 19's "several times slower" was that path).

Their stored forms differ from quant.py's, so a layer on CPU converts once after loading and keeps only
these (`prepare_*`); with KUBELLM_KERNELS=reference it keeps quant.py's form and runs the reference.
- int4: torch's int4pack layout, and `scales_and_zeros` bf16 [K/group, N, 2] with w = (q - 8) * scale + zero;
- int8: int8 [N, K] and one bf16 scale per row (Q8_0's groups of 32 are re-quantized per row here).

Eager int8 at decode shapes (up to NATIVE_INT8_ROWS rows) runs kubellm's own C++ kernel (native.py,
csrc/int8_linear_cpu.cpp) where it builds: float32 activations, and the weights read at 1.7-2.3x
`_weight_int8pack_mm`'s speed at 1-16 rows (`kubellm bench kernels --cpu`). A compiled step keeps
`_weight_int8pack_mm`, which inductor replaces by its own weight-only templates: with the C++ kernel in
the graph instead the compiled step was no faster (docs/cpu-compile.md), and the row-count branch would
guard the graph on the batch size.
"""

from __future__ import annotations

import torch

from kubellm.kernels import native, quant

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4pack kernel takes
# Past this many rows (prefill) `_weight_int8pack_mm` is as fast or faster (bench kernels --cpu).
NATIVE_INT8_ROWS = 16


def int4_supported(k: int, group: int) -> bool:
    return group in INT4_GROUPS and k % group == 0


def prepare_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
    """quant.py's int4 form -> (int4pack uint8, scales_and_zeros bf16 [G, N, 2])."""
    q = quant.unpack_int4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = mins.float() + 8 * scales.float()
    scales_and_zeros = torch.stack([scales.float().t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def prepare_int8(qweight: torch.Tensor, scales: torch.Tensor):
    """quant.py's int8 form -> (int8 [N, K], bf16 [N]); group-wise scales re-quantized to one per row."""
    native.available()   # builds the native kernel now, while loading, rather than in the first step
    if scales.shape[1] != 1:
        qweight, scales = quant.quantize_int8(quant.dequantize_int8(qweight, scales.float()))
    return qweight.contiguous(), scales[:, 0].to(torch.bfloat16).contiguous()


def _finish(y: torch.Tensor, dtype, bias):
    y = y.to(dtype)
    return y if bias is None else y + bias


def int4_linear(x: torch.Tensor, packed, scales_and_zeros, group: int, bias=None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    return _finish(y, x.dtype, bias).reshape(*x.shape[:-1], -1)


def int8_linear(x: torch.Tensor, qweight, scales, bias=None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if native.loaded and not torch.compiler.is_compiling() and rows.shape[0] <= NATIVE_INT8_ROWS:
        y = native.int8_linear(rows.float().contiguous(), qweight, scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), qweight, scales)
    return _finish(y, x.dtype, bias).reshape(*x.shape[:-1], -1)

"""Float linears on CPU with the weight pre-packed in oneDNN's blocked layout.

Decode multiplies a few rows by every weight, so a step is bound by how fast the weights are read.
torch's `F.linear` (MKL sgemm on the plain [out, in] tensor) reads a 576x49152 float32 LM head at
12 GB/s with one row and 7 GB/s with sixteen; the same weight reordered once by
`mkldnn._reorder_linear_weight` and multiplied by `mkldnn._linear_pointwise` reads at 30-40 GB/s at
both (`kubellm bench kernels --cpu`; inductor's CPU freezing pass uses the same two ops). The packed
tensor is opaque (`is_mkldnn`): it can only be multiplied, so a weight that is also looked up by
row (a tied embedding) keeps its plain tensor beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

# The row count oneDNN tunes the blocked layout for; any count works. 16 is as fast as 1 at one row and
# up to 1.7x faster at 16 and more (the figures in docs/benchmarks.md).
PACK_ROWS_HINT = 16


@functools.cache
def available() -> bool:
    """Whether this torch build has the oneDNN ops (and they run on this CPU)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(4, 8)
        y = linear(torch.ones(2, 8), pack(w), None)
        return bool(torch.equal(y, torch.full((2, 4), 8.0)))
    except (RuntimeError, AttributeError):
        return False


# Off while a model is built for compiled decode steps (runtime/executor/cpu_compile.py): inductor's freezing
# packs the weights its own way and cannot trace an opaque mkldnn tensor.
_packing = contextvars.ContextVar("kubellm_linear_cpu_packing", default=True)


@contextlib.contextmanager
def packing(enabled: bool):
    """Whether weights built or loaded inside may be packed (can_pack says no to every one when not)."""
    token = _packing.set(enabled)
    try:
        yield
    finally:
        _packing.reset(token)


def can_pack(weight: torch.Tensor) -> bool:
    return (_packing.get() and weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_mkldnn and weight.numel() > 0)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 / bfloat16 -> the same weight in oneDNN's layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a plain or a packed weight; x [..., in] of the weight's dtype."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])

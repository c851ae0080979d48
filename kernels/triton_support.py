"""What every Triton kernel module shares: interpreter mode and the dtype the kernels compute in.

Import this before defining any `@triton.jit` kernel. `triton.jit` decides at decoration time
whether a function is compiled for the GPU or run by Triton's interpreter (`TRITON_INTERPRET=1`),
and that includes Triton's own library (tl.sum, tl.cdiv, ...), decorated when `triton` is first
imported. On a machine without CUDA the interpreter is the only way a Triton kernel can run, so
this module turns it on before importing triton; that is how CI checks the kernels on CPU
tensors. If something imported triton earlier without the variable, interpretation cannot work
any more, and this module says so instead of failing inside a kernel (tests/conftest.py sets
the variable first thing on machines without an NVIDIA driver).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the environment is settled)
import triton.language as tl  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _library_interpretable() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


if INTERPRETING and not _library_interpretable():
    raise RuntimeError(
        "TRITON_INTERPRET=1 but triton was imported before it was set, so Triton's library is "
        "compiled-only and kernels cannot run on CPU tensors. Set TRITON_INTERPRET=1 in the "
        "environment, or import kubellm.kernels before anything imports triton.")

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """True when the kernels run under Triton's interpreter (on CPU tensors)."""
    return INTERPRETING


def dot_dtype(dtype: torch.dtype):
    """The dtype attention tiles are fed to `tl.dot` in.

    The storage dtype on the GPU (tensor cores take fp16/bf16 directly). Under the interpreter
    bfloat16 becomes float32: numpy has no bfloat16, and the interpreter's bf16 `tl.dot` and
    arithmetic return garbage (checked with triton 3.9), while its bf16 -> fp32 conversion is exact.
    """
    if interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs must not be rounded to tf32 on the GPU, or fp32 results drift from the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block(n: int, minimum: int = 16) -> int:
    """Power-of-two tile covering n (Triton's tl.arange needs powers of two)."""
    return max(triton.next_power_of_2(n), minimum)

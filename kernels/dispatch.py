"""The one place that picks a kernel implementation for each call.

Triton when the tensors are on a CUDA device (and Triton is installed), the plain-PyTorch
reference otherwise. KUBELLM_KERNELS overrides the choice for tests and benchmarks:

    KUBELLM_KERNELS=auto       (default) Triton on CUDA, reference elsewhere
    KUBELLM_KERNELS=reference  always the reference
    KUBELLM_KERNELS=triton     always Triton; on CPU tensors that means Triton's interpreter
                               (turned on automatically where no CUDA device exists)

The variable is read on every call, so a test can change it between calls.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from kubellm.kernels import activation, attention, norm, quant, rotary, sampling

MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("KUBELLM_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"KUBELLM_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    # Called several times per layer and step: the common case is checked first, without kernel_mode().
    mode = os.environ.get("KUBELLM_KERNELS")
    if not mode or mode == "auto":
        return tensor.is_cuda and triton_installed()
    return kernel_mode() == "triton"


@functools.cache
def _triton_module(name: str):
    # Imported on first use only: CPU-only installs never load Triton.
    return importlib.import_module(f"kubellm.kernels.{name}_triton")


def _kv_scales(k_scale, v_scale) -> dict:
    """The int8 KV cache's scales as keyword arguments; none for a cache in the model's dtype."""
    return {} if k_scale is None else {"k_scale": k_scale, "v_scale": v_scale}


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """With k_scale / v_scale the cache is int8 (kv_int8.py): the keys and values are quantized as written."""
    impl = _triton_module("attention") if use_triton(key) else attention
    impl.write_kv_cache(key, value, k_cache, v_cache, slot_mapping, **_kv_scales(k_scale, v_scale))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None,
                           k_scale=None, v_scale=None):
    impl = _triton_module("attention") if use_triton(q) else attention
    return impl.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                       **_kv_scales(k_scale, v_scale))


def paged_prefill_attention(q, k, v, k_cache, v_cache, block_table, context_len, scale, sliding_window=None,
                            mask=None, k_scale=None, v_scale=None):
    """`mask`: from prefill_attention_mask, built once per step (the Triton kernel masks by itself)."""
    scales = _kv_scales(k_scale, v_scale)
    if use_triton(q):
        return _triton_module("attention").paged_prefill_attention(q, k, v, k_cache, v_cache, block_table,
                                                                   context_len, scale, sliding_window, **scales)
    return attention.paged_prefill_attention(q, k, v, k_cache, v_cache, block_table, context_len, scale,
                                             sliding_window, mask, **scales)


def prefill_attention_mask(num_queries, context_len, sliding_window, device):
    """The mask a prefill chunk's attention needs on `device`; None where the kernel needs none."""
    if use_triton(torch.empty(0, device=device)):
        return None
    return attention.prefill_mask(num_queries, context_len, sliding_window, device)


def rms_norm(x, weight, eps, residual=None):
    impl = _triton_module("norm") if use_triton(x) else norm
    return impl.rms_norm(x, weight, eps, residual)


def apply_rotary(q, k, cos, sin):
    impl = _triton_module("rotary") if use_triton(q) else rotary
    return impl.apply_rotary(q, k, cos, sin)


def silu_and_mul(x):
    impl = _triton_module("activation") if use_triton(x) else activation
    return impl.silu_and_mul(x)


def top_k_top_p_filter(logits, top_k, top_p):
    impl = _triton_module("sampling") if use_triton(logits) else sampling
    return impl.top_k_top_p_filter(logits, top_k, top_p)


def int4_linear(x, qweight, scales, mins, bias=None):
    """Weight-only int4 (quant.py's form); on CPU the layers use quant_cpu.py's form instead."""
    impl = _triton_module("quant") if use_triton(x) else quant
    return impl.int4_linear(x, qweight, scales, mins, bias)


def int8_linear(x, qweight, scales, bias=None):
    impl = _triton_module("quant") if use_triton(x) else quant
    return impl.int8_linear(x, qweight, scales, bias)


def fp8_linear(x, qweight, scales, bias=None):
    """float8_e4m3fn weights with float32 group scales (quant.py); Triton needs sm89+ on the GPU."""
    impl = _triton_module("quant") if use_triton(x) else quant
    return impl.fp8_linear(x, qweight, scales, bias)

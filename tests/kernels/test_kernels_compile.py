"""Every Triton kernel compiles for real GPUs (sm_90 H100, sm_80 A100), on a machine without one.

The interpreter (tests/kernels/test_kernels.py) checks what the kernels compute, but not whether the GPU
compiler accepts them: types that must agree across branches and loops, tl.dot shapes, shared
memory. triton.compile goes all the way to a cubin (ptxas ships with Triton) without a device.
It must run with the kernels decorated for compilation, so outside this (interpreted) process.

    python tests/kernels/test_kernels_compile.py   # the same check, by hand
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90 (A100: 163 KiB)


pytestmark = pytest.mark.multiprocess


KV_CACHE = {16: None, 8: "*i8", 4: "*u8"}   # a KV cache's element type, by KV_BITS (None: the model's)


def _signature(fn, constexprs: dict, element: str) -> dict:
    """Argument types: pointers to `element` unless named otherwise, ints, and the float scalars; a quantized
    KV cache (KV_BITS 8 or 4) holds int8 / uint8 with float32 scales."""
    kv = KV_CACHE[constexprs.get("KV_BITS", 16)]
    quantized = {} if kv is None else {"k_cache_ptr": kv, "v_cache_ptr": kv, "k_scale_ptr": "*fp32",
                                       "v_scale_ptr": "*fp32"}
    special = {**quantized, "block_tables_ptr": "*i64", "block_table_ptr": "*i64", "context_lens_ptr": "*i64", "slot_ptr": "*i64",
               "split_out_ptr": "*fp32", "split_lse_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32",
               "qk_scale": "fp32", "eps": "fp32"}
    return {name: "constexpr" if name in constexprs else special.get(name, f"*{element}" if name.endswith("_ptr")
                                                                      else "i32")
            for name in fn.arg_names}


def compile_all() -> list[str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kubellm.kernels import activation_triton, attention_triton, norm_triton, rotary_triton, sampling_triton

    tl_types = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    cases = []
    for element in ("bf16", "fp32"):
        wide = element != "fp32"
        dot = dict(DOT_DTYPE=tl_types[element], DOT_PRECISION="tf32" if wide else "ieee")
        for splits, window, head_dim, bits in ((8, True, 128, 16), (1, False, 80, 16), (8, False, 128, 8),
                                               (1, True, 128, 4)):
            cases.append((attention_triton._decode_kernel, element, dict(
                CACHE_BLOCK_SIZE=16, GROUP=4, HEAD_DIM=head_dim, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64 if wide else 32,
                NUM_SPLITS=splits, HAS_WINDOW=window, KV_BITS=bits, **dot)))
        for bits in (16, 4):
            cases.append((attention_triton._prefill_kernel, element, dict(
                CACHE_BLOCK_SIZE=16, GROUP=4, HEAD_DIM=128, BLOCK_M=64 if wide else 32, BLOCK_N=64 if wide else 32,
                BLOCK_D=128, HAS_WINDOW=True, KV_BITS=bits, **dot)))
    cases += [
        (attention_triton._decode_reduce_kernel, "bf16",
         dict(NUM_HEADS=32, HEAD_DIM=128, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128)),
        *((attention_triton._write_kv_kernel, "bf16", dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128,
                                                           KV_BITS=bits)) for bits in (16, 8, 4)),
        (norm_triton._rms_norm_kernel, "bf16", dict(HIDDEN=4096, BLOCK=4096, HAS_RESIDUAL=True)),
        (rotary_triton._rotary_kernel, "bf16",
         dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, BLOCK_QH=32, BLOCK_KH=8, BLOCK_HALF=64)),
        (activation_triton._silu_and_mul_kernel, "bf16", dict(INTERMEDIATE=14336, BLOCK=1024)),
        (sampling_triton._top_k_top_p_kernel, "fp32", dict(BLOCK=1024)),
    ]
    report = []
    for capability in (90, 80):
        for fn, element, constexprs in cases:
            source = ASTSource(fn, _signature(fn, constexprs, element), constexprs)
            kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                    options={"num_stages": attention_triton.NUM_STAGES})
            assert kernel.asm.get("cubin"), f"{fn.__name__}: no cubin"
            assert kernel.metadata.shared <= H100_SHARED_MEMORY, (fn.__name__, kernel.metadata.shared)
            report.append(f"sm_{capability} {fn.__name__} {element}: {kernel.metadata.shared} B shared")
    return report


def test_every_kernel_compiles_for_h100_and_a100():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")  # decorate for compilation in the child
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("sm_90") == out.stdout.count("sm_80") >= 20, out.stdout


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the kernels must be decorated for compilation")
    os.environ["TRITON_INTERPRET"] = "0"
    print("\n".join(compile_all()))

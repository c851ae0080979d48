"""Quantized matmuls: the Triton dequantize-GEMMs (under TRITON_INTERPRET=1 on CPU) and the CPU path
against the plain-PyTorch reference (kernels/quant.py), on shapes that are not tile multiples."""

import pytest
import torch

from kubellm.kernels import quant, quant_cpu

pytest.importorskip("triton")
from kubellm.kernels import quant_triton


def _int4(n, k, group, gen):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.1 + 0.01
    mins = -torch.rand(n, k // group, generator=gen) * 0.5
    return quant.pack_int4(q), scales, mins


def test_pack_and_unpack_int4_round_trip():
    q = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)   # column 2j low nibble, 2j+1 high


def test_int8_quantize_is_within_half_a_step_per_row():
    w = torch.randn(7, 96)
    q, scales = quant.quantize_int8(w)
    assert scales.shape == (7, 1) and q.dtype == torch.int8
    assert (quant.dequantize_int8(q, scales) - w).abs().max() <= scales.max() / 2 + 1e-6
    q32, s32 = quant.quantize_int8(w, group_size=32)
    assert s32.shape == (7, 3)


@pytest.mark.parametrize("m,n,k,group", [(1, 96, 64, 32), (5, 70, 128, 64), (33, 130, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_int4_matches_reference(m, n, k, group, dtype):
    gen = torch.Generator().manual_seed(m * n)
    qweight, scales, mins = _int4(n, k, group, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    want = quant.int4_linear(x.float(), qweight, scales, mins, bias.float())
    got = quant_triton.int4_linear(x, qweight, scales.to(dtype), mins.to(dtype), bias)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got.float(), want, atol=tol * want.abs().max(), rtol=0)


@pytest.mark.parametrize("groups", [1, 2, 4])   # 4: groups of 16, as a GGUF's Q6_K
def test_triton_int8_matches_reference(groups):
    gen = torch.Generator().manual_seed(groups)
    w = torch.randn(77, 64, generator=gen)
    qweight, scales = quant.quantize_int8(w, group_size=64 // groups)
    x = torch.randn(3, 64, generator=gen)
    want = quant.int8_linear(x, qweight, scales)
    got = quant_triton.int8_linear(x, qweight, scales)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0)
    assert torch.allclose(want, x @ w.t(), atol=0.02 * want.abs().max(), rtol=0)   # int8 is close to float


def _fp8(n, k, groups, gen):
    """e4m3 weights over the whole range (subnormals to 448, both signs) and float32 scales per group."""
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 2.6, k)[torch.randperm(k, generator=gen)]
    return w.to(torch.float8_e4m3fn), torch.rand(n, groups, generator=gen) * 0.01 + 1e-4


@pytest.mark.parametrize("m,n,k,groups", [(1, 96, 256, 2), (5, 70, 128, 1), (33, 130, 384, 3), (16, 64, 192, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fp8_matches_reference(m, n, k, groups, dtype):
    """Blocks of 128 columns (groups = K / 128), per channel (1 group), and a scale per column."""
    gen = torch.Generator().manual_seed(m * n + groups)
    qweight, scales = _fp8(n, k, groups, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    want = quant.fp8_linear(x.float(), qweight, scales, bias.float())
    got = quant_triton.fp8_linear(x, qweight, scales, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got.float(), want, atol=tol * want.abs().max(), rtol=0)
    # the reference is the stored values times their scales, exactly
    w = qweight.float() * scales.repeat_interleave(k // groups, 1)
    assert torch.allclose(want, x.float() @ w.t() + bias.float(), atol=1e-5 * want.abs().max(), rtol=0)


def test_dispatch_runs_fp8_on_triton_when_asked(monkeypatch):
    from kubellm.kernels import dispatch

    gen = torch.Generator().manual_seed(6)
    qweight, scales = _fp8(48, 128, 1, gen)
    x = torch.randn(3, 128, generator=gen)
    want = quant.fp8_linear(x, qweight, scales)
    monkeypatch.setenv("KUBELLM_KERNELS", "triton")
    assert torch.allclose(dispatch.fp8_linear(x, qweight, scales), want, atol=1e-4 * want.abs().max(), rtol=0)
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    assert torch.equal(dispatch.fp8_linear(x, qweight, scales), want)


def test_cpu_int4_path_matches_reference_within_bf16():
    gen = torch.Generator().manual_seed(3)
    qweight, scales, mins = _int4(96, 128, 32, gen)
    x = torch.randn(4, 128, generator=gen)
    want = quant.int4_linear(x, qweight, scales, mins)
    packed, scales_and_zeros = quant_cpu.prepare_int4(qweight, scales, mins)
    got = quant_cpu.int4_linear(x, packed, scales_and_zeros, 32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=0.02 * want.abs().max(), rtol=0)


def test_cpu_int8_path_requantizes_groups_per_row():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(50, 64, generator=gen)
    qweight, scales = quant.quantize_int8(w, group_size=32)   # GGUF Q8_0-like groups
    q_row, s_row = quant_cpu.prepare_int8(qweight, scales)
    assert s_row.shape == (50,) and s_row.dtype == torch.bfloat16
    x = torch.randn(2, 64, generator=gen)
    got = quant_cpu.int8_linear(x, q_row, s_row)
    want = quant.int8_linear(x, qweight, scales)
    assert torch.allclose(got, want, atol=0.03 * want.abs().max(), rtol=0)


def test_dispatch_picks_reference_on_cpu_and_triton_when_asked(monkeypatch):
    from kubellm.kernels import dispatch

    gen = torch.Generator().manual_seed(5)
    qweight, scales, mins = _int4(64, 64, 32, gen)
    x = torch.randn(2, 64, generator=gen)
    want = quant.int4_linear(x, qweight, scales, mins)
    monkeypatch.setenv("KUBELLM_KERNELS", "triton")
    assert torch.allclose(dispatch.int4_linear(x, qweight, scales, mins), want, atol=1e-4 * want.abs().max())
    monkeypatch.setenv("KUBELLM_KERNELS", "reference")
    assert torch.equal(dispatch.int4_linear(x, qweight, scales, mins), want)

"""kubellm's C++ int8 linear (kernels/csrc/int8_linear_cpu.cpp): exact against the float reference on odd
shapes, chosen by the eager CPU int8 path at decode shapes, traceable by torch.compile, off cleanly."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from kubellm.kernels import native, quant, quant_cpu

needs_native = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")


def _weights(n, k, gen):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return q, torch.rand(n, generator=gen) / 50 + 1e-3


@needs_native
def test_builds_where_a_compiler_exists():
    assert native.available() and native.loaded


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16, 33])
@pytest.mark.parametrize("n,k", [(64, 64), (37, 200), (9, 15), (130, 1000)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_matches_the_float_product(m, n, k, scale_dtype):
    assert native.available()
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, scales = _weights(n, k, gen)
    scales = scales.to(scale_dtype)
    x = torch.randn(m, k, generator=gen)
    got = native.int8_linear(x, q, scales)
    want = x.double() @ (q.double() * scales.double()[:, None]).t()
    assert got.shape == (m, n) and got.dtype == torch.float32
    # float32 sums in another order: a few ulps of the largest term
    assert torch.allclose(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


@needs_native
def test_no_rows_and_bad_inputs():
    assert native.available()
    q, scales = _weights(8, 32, torch.Generator().manual_seed(0))
    assert native.int8_linear(torch.empty(0, 32), q, scales).shape == (0, 8)
    with pytest.raises(RuntimeError, match="x has 16 columns, qweight 32"):
        native.int8_linear(torch.randn(2, 16), q, scales)
    with pytest.raises(RuntimeError, match="float32"):
        native.int8_linear(torch.randn(2, 32, dtype=torch.float64), q, scales)
    with pytest.raises(RuntimeError, match="scales"):
        native.int8_linear(torch.randn(2, 32), q, scales[:4])


@needs_native
def test_cpu_int8_path_takes_the_native_kernel_at_decode_rows_only(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    qweight, scales = quant.quantize_int8(torch.randn(48, 96, generator=gen))
    q_row, s_row = quant_cpu.prepare_int8(qweight, scales)
    assert native.loaded
    calls = []
    real = native.int8_linear
    monkeypatch.setattr(native, "int8_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, quant_cpu.NATIVE_INT8_ROWS, quant_cpu.NATIVE_INT8_ROWS + 1):
        x = torch.randn(rows, 96, generator=gen)
        got = quant_cpu.int8_linear(x, q_row, s_row)
        want = quant.int8_linear(x, qweight, scales)
        assert torch.allclose(got, want, atol=0.01 * want.abs().max(), rtol=0)
    assert calls == [1, quant_cpu.NATIVE_INT8_ROWS]
    # bfloat16 activations in, bfloat16 out, float32 inside
    got = quant_cpu.int8_linear(torch.randn(2, 3, 96, dtype=torch.bfloat16), q_row, s_row)
    assert got.shape == (2, 3, 48) and got.dtype == torch.bfloat16


@needs_native
def test_a_compiled_graph_calls_it_without_a_break():
    """The operator's fake implementation lets torch.compile trace it (quant_cpu keeps inductor's own int8
    templates in compiled steps, but the operator itself must not break a graph)."""
    assert native.available()
    gen = torch.Generator().manual_seed(2)
    q_row, s_row = quant_cpu.prepare_int8(*quant.quantize_int8(torch.randn(40, 64, generator=gen)))
    bias = torch.randn(40, generator=gen)

    def step(x):
        return torch.relu(native.int8_linear(x, q_row, s_row) + bias)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows in (3, 40):
        x = torch.randn(rows, 64, generator=gen)
        assert torch.allclose(compiled(x), step(x), atol=1e-5, rtol=0)


def _fresh_process(env: dict, tmp_path) -> str:
    code = ("import torch; from kubellm.kernels import native, quant, quant_cpu\n"
            "q, s = quant_cpu.prepare_int8(*quant.quantize_int8(torch.randn(8, 32)))\n"
            "y = quant_cpu.int8_linear(torch.randn(1, 32), q, s)\n"
            "print(native.available(), native.loaded, tuple(y.shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KUBELLM_KERNEL_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() + "\n" + done.stderr


def test_turned_off_or_unbuildable_falls_back_to_torch(tmp_path):
    out = _fresh_process({native.ENV: "0"}, tmp_path)
    assert out.startswith("False False (1, 8)")
    out = _fresh_process({"CXX": "no-such-compiler"}, tmp_path)
    assert out.startswith("False False (1, 8)")
    assert "torch's operators are used instead" in out and "no C++ compiler" in out

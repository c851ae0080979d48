"""`kubellm bench kernels --cpu` end to end on tiny shapes: every candidate timed, the engine's marked, the table
printed. Speed itself is read from a run on a quiet machine (docs/benchmarks.md), not asserted here."""

import json

import pytest

torch = pytest.importorskip("torch")

from kubellm.bench import kernels_cpu  # noqa: E402
from kubellm.runtime.cli.main import main  # noqa: E402

TINY = {"mlp": (96, 64)}


def test_matmul_rows_cover_every_format_and_mark_the_engines_paths():
    rows = kernels_cpu.bench_matmuls(TINY, rows=(1, 3), cache_bytes=2 ** 16, min_seconds=0.001)
    assert {(r["rows"], r["format"]) for r in rows} == {(m, f) for m in (1, 3)
                                                        for f in ("float32", "bfloat16", "int8", "int4")}
    for m in (1, 3):
        at = [r for r in rows if r["rows"] == m]
        assert at[0]["kernel"] == "F.linear (MKL)" and at[0]["speedup_vs_f32_linear"] == 1.0
        assert all(r["ms"] > 0 and r["weight_GBps"] > 0 for r in at)
        # one path the engine uses per format
        assert sorted(r["format"] for r in at if r["engine"]) == ["bfloat16", "float32", "int4", "int8"]


def test_the_int8_path_marked_follows_the_row_count():
    from kubellm.kernels import native, quant_cpu

    if not native.available():
        pytest.skip("kubellm's C++ kernels do not build here")
    beyond = quant_cpu.NATIVE_INT8_ROWS + 1
    rows = kernels_cpu.bench_matmuls(TINY, rows=(1, beyond), cache_bytes=2 ** 16, min_seconds=0.001)
    marked = {r["rows"]: r["kernel"] for r in rows if r["format"] == "int8" and r["engine"]}
    assert marked == {1: "kubellm C++ (native.py), f32 activations", beyond: "_weight_int8pack_mm, bf16 activations"}


def test_weights_are_cycled_past_the_cache():
    assert kernels_cpu._copies(2 ** 20, 32 * 2 ** 20) == 128
    assert kernels_cpu._copies(2 ** 30, 32 * 2 ** 20) == 2   # never fewer than two


def test_command_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(kernels_cpu, "SMOLLM2_SHAPES", TINY)
    monkeypatch.setattr(kernels_cpu, "MIN_SECONDS", 0.001)
    real_run = kernels_cpu.run
    monkeypatch.setattr(kernels_cpu, "run", lambda: real_run(TINY, (1,), 0.001, 2 ** 16, 2 ** 20))
    assert main(["bench", "kernels", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "<- engine" in out and "paged decode attention, batch 16" in out and "GB/s" in out
    assert main(["bench", "kernels", "--cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and result["read_bandwidth_GBps"] > 0
    assert {r["batch"] for r in result["attention"]} == {1, 16}

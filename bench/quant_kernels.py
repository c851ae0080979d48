"""CPU weight-only quantized matmuls at decode shapes: which path the quantized linears take on CPU.

    python -m kubellm.bench.quant_kernels [--json] [--repeats 30] [--compile]

Each candidate computes x @ W^T for SmolLM2-135M's shapes (576 -> 1536, 1536 -> 576 and the 576 -> 49152
LM head) at 1 and 16 rows (decode batch sizes), float32 activations in and out as the CPU engine runs:
- float32 / bfloat16 `F.linear` on a float weight (the float baselines; bf16 keeps a 16-bit copy);
- `aten._weight_int8pack_mm` (int8 per-row) and `aten._weight_int4pack_mm_for_cpu` (int4, groups of 32)
  with float32 activations and with bfloat16 activations (converted in the call);
- the same bf16 int4pack call after gathering the input by a permutation: what a GPTQ act-order layer adds
  (its columns stored group by group, layers/quantization/gptq.py);
- `torch._dyn_quant_matmul_4bit` (KleidiAI's 4-bit path; a reference fallback off ARM);
- oneDNN / fbgemm dynamic int8 through `torch.ao.nn.quantized.dynamic.Linear` (activations quantized per call);
- dequantize-then-linear: int4 dequantized into a cached float32 block each call, then float32 `linear`;
- `torch.compile` of the dequantize + matmul reference (with --compile: each shape compiles for a while).
Each is checked against float32 math on the dequantized weight (max error relative to the output's
scale) before it is timed; the median of --repeats calls is reported, in ms, with the weight bytes read per
ms as GB/s. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from kubellm.kernels import quant, quant_cpu

SHAPES = [(576, 1536), (1536, 576), (576, 49152)]   # (in_features K, out_features N)
ROWS = (1, 16)
GROUP = 32


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def candidates(k: int, n: int, with_compile: bool):
    """name -> (weight bytes read per call, build(): the call, or raise if this torch lacks it)."""
    gen = torch.Generator().manual_seed(0)
    q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // GROUP, generator=gen) * 0.02 + 0.01
    mins = -8 * scales
    packed4 = quant.pack_int4(q4)
    w4 = quant.dequantize_int4(packed4, scales, mins)                 # what the int4 paths compute with
    q8, s8 = quant.quantize_int8(torch.randn(n, k, generator=gen) * 0.05)
    w8 = quant.dequantize_int8(q8, s8)
    out = {}

    def float_linear(dtype):
        w = w4.to(dtype)
        return lambda x: F.linear(x.to(dtype), w).float()
    out["float32 linear"] = (n * k * 4, w4, lambda: float_linear(torch.float32))
    out["bfloat16 linear"] = (n * k * 2, w4, lambda: float_linear(torch.bfloat16))

    def int8pack(dtype):
        s = s8[:, 0].to(dtype)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(dtype), q8, s).float()
    out["int8pack_mm fp32 act"] = (n * k, w8, lambda: int8pack(torch.float32))
    out["int8pack_mm bf16 act"] = (n * k, w8, lambda: int8pack(torch.bfloat16))

    def int4pack(dtype):
        packed, sz = quant_cpu.prepare_int4(packed4, scales, mins)
        sz = sz.to(dtype)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, GROUP, sz).float()
    out["int4pack_mm fp32 act"] = (n * k // 2, w4, lambda: int4pack(torch.float32))
    out["int4pack_mm bf16 act"] = (n * k // 2, w4, lambda: int4pack(torch.bfloat16))

    # act-order: stored column j multiplies input column order[j], so the weight as the input sees it is
    # w4 with its columns put back
    order = torch.randperm(k, generator=gen)

    def act_order_int4pack():
        call = int4pack(torch.bfloat16)
        return lambda x: call(x.index_select(-1, order))
    out["int4pack bf16 act-order"] = (n * k // 2, w4[:, torch.argsort(order)], act_order_int4pack)

    def dyn_quant_4bit():
        # KleidiAI's symmetric int4 ((q - 8) * scale): same weights, since mins = -8 * scales
        blob = torch.ops.aten._dyn_quant_pack_4bit_weight(packed4, scales.float(), None, GROUP, k, n)
        return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, blob, GROUP, k, n)
    out["_dyn_quant_matmul_4bit"] = (n * k // 2, w4, dyn_quant_4bit)

    def ao_dynamic_int8():
        from torch.ao.nn.quantized.dynamic import Linear

        layer = Linear(k, n, bias_=False, dtype=torch.qint8)
        qw = torch.quantize_per_channel(w8, s8[:, 0].double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        layer.set_weight_bias(qw, None)
        return lambda x: layer(x)
    out["ao dynamic int8 (fbgemm)"] = (n * k, w8, ao_dynamic_int8)

    def dequant_then_linear():
        block = torch.empty(n, k)   # the cached float32 block, refilled every call
        wide_scales, wide_mins = scales.repeat_interleave(GROUP, 1), mins.repeat_interleave(GROUP, 1)

        def call(x):
            torch.mul(quant.unpack_int4(packed4), wide_scales, out=block)
            return F.linear(x, block.add_(wide_mins))
        return call
    out["dequant -> fp32 linear"] = (n * k // 2, w4, dequant_then_linear)

    if with_compile:
        def compiled():
            fn = torch.compile(lambda x: quant.int4_linear(x, packed4, scales, mins), dynamic=False)
            return fn
        out["torch.compile dequant+mm"] = (n * k // 2, w4, compiled)
    return out


def run(repeats: int = 30, with_compile: bool = False, progress=sys.stderr) -> dict:
    rows_out = []
    total = len(SHAPES) * len(ROWS)
    started, done = time.monotonic(), 0
    for k, n in SHAPES:
        for m in ROWS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
            for name, (nbytes, w, build) in candidates(k, n, with_compile).items():
                row = {"shape": f"{m} x {k} -> {n}", "rows": m, "k": k, "n": n, "path": name}
                try:
                    call = build()
                    got = call(x)
                    want = x @ w.t()
                    row["rel_error"] = float((got.float() - want).abs().max() / want.abs().max())
                    row["ms"] = _median_ms(lambda: call(x), repeats)
                    row["GBps"] = nbytes / row["ms"] / 1e6
                except Exception as err:   # an op this build of torch lacks, or refuses these shapes
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                rows_out.append(row)
            done += 1
            eta = (time.monotonic() - started) / done * (total - done)
            print(f"[{done}/{total}] {m} x {k} -> {n} measured; about {eta:.0f} s left", file=progress, flush=True)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": GROUP, "rows": rows_out}


def format_rows(result: dict) -> str:
    lines = [f"torch {result['torch']}, {result['threads']} threads; int4 groups of {result['group_size']}; "
             "median ms (GB/s of weights read); rel. error vs float32 on the same dequantized weight",
             f"{'shape':<22} {'path':<28} {'ms':>9} {'GB/s':>7} {'rel err':>9}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['shape']:<22} {r['path']:<28} {'-':>9} {'-':>7} {'-':>9}  {r['error']}")
        else:
            lines.append(f"{r['shape']:<22} {r['path']:<28} {r['ms']:>9.3f} {r['GBps']:>7.1f} {r['rel_error']:>9.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.bench.quant_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.compile)
    print(json.dumps(result) if args.json else format_rows(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `kubellm bench gpu` writes: docs/gpu/<date>-<device>.json and a markdown summary beside it.

The JSON holds every step's status ("pass", "fail", "timeout", "skipped"), seconds and figures, plus the
headline figures lifted to the top (`roofline_fraction`, `kernel_ratios` against SDPA, `offline_ratio`
against HF generate, the quantized GEMMs' speedups) and issue 19's GPU targets, each met, not met or not
measured. Pure functions of the report dict (table-tested in tests/bench/test_gpu_check.py).
"""

from __future__ import annotations

import json
from pathlib import Path

# Issue 19's GPU targets: (key, what, the figure's path in the report, the bar it must reach).
TARGETS = [
    ("roofline", "batch-1 decode >= 70% of the HBM roofline (Llama-3-8B shape)", "roofline_fraction", 0.70),
    ("offline", "offline throughput >= 10x HF generate", "offline_ratio", 10.0),
    ("paged_decode", "paged decode attention >= SDPA's speed (every shape)", "paged_decode_ratio_min", 1.0),
    ("w4a16", "W4A16 decode GEMM >= 2.5x bf16 at batch 1 (geomean of the 8B linears)", "w4a16_speedup_b1", 2.5),
]


def _step(report: dict, name: str) -> dict:
    return report.get("steps", {}).get(name, {})


def headline(report: dict) -> dict:
    """The figures the issue asks for by name, from the steps that measured them (None where none did)."""
    roof, offline = _step(report, "roofline_8b"), _step(report, "offline_vs_hf")
    attn, quant, kv = _step(report, "attention_kernels"), _step(report, "quant_gemm"), _step(report, "int8_kv_attention")
    ratios = {f"{r['kernel']}: {r['shape']}": r["ratio"] for r in attn.get("rows", [])}
    return {
        "roofline_fraction": roof.get("roofline_fraction"),
        "kernel_ratios": ratios,
        "paged_decode_ratio_min": attn.get("decode_ratio_min"),
        "paged_prefill_ratio_min": attn.get("prefill_ratio_min"),
        "offline_ratio": offline.get("ratio"),
        "w4a16_speedup_b1": quant.get("w4a16_speedup_b1"),
        "w8a16_speedup_b1": quant.get("w8a16_speedup_b1"),
        "fp8_speedup_b1": quant.get("fp8_speedup_b1"),
        "int8_kv_decode_speedup": kv.get("speedup_geomean"),
        "int4_kv_decode_speedup": kv.get("int4_speedup_geomean"),
    }


def targets(report: dict) -> dict:
    """Each target: its value and met (True / False), or met None where it was not measured, or measured on
    a CPU dry run (tiny shapes: such figures say nothing about the target)."""
    figures = headline(report)
    out = {}
    for key, what, figure, bar in TARGETS:
        value = figures.get(figure)
        if value is None:
            met, note = None, "not measured"
        elif not str(report.get("device", "")).startswith("cuda"):
            met, note = None, "CPU dry run: tiny shapes, not the target's"
        else:
            met, note = value >= bar, ""
        out[key] = {"target": what, "figure": figure, "bar": bar, "value": value, "met": met, "note": note}
    return out


def complete(report: dict) -> dict:
    """The report with its headline figures and targets filled in."""
    return {**report, **headline(report), "targets": targets(report)}


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the report's file name)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in out.split("-") if part) or "unknown"


def file_stem(report: dict) -> str:
    return f"{report['date']}-{slug(report.get('device_name') or report.get('device') or 'unknown')}"


def write(report: dict, out_dir: Path) -> list[Path]:
    """Writes <date>-<device>.json and .md into out_dir (made if missing); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = complete(report)
    stem = file_stem(full)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(full, indent=1, default=str) + "\n")
    md_path.write_text(markdown(full))
    return [json_path, md_path]


# --------------------------------------------------------------------------- markdown
def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _step_figures(name: str, step: dict) -> str:
    """One line of the step's key figures for the steps table."""
    if step.get("status") == "skipped":
        return step.get("reason", "")
    if step.get("status") == "timeout" and not step.get("partial"):
        return step.get("error", "")
    pick = {
        "environment": lambda s: f"{_num(s.get('bandwidth_GBps'), 0)} GB/s copy, "
                                 f"{_num(s.get('bf16_matmul_TFLOPs'), 0)} TFLOP/s bf16 matmul",
        "attention_kernels": lambda s: f"decode vs SDPA min {_num(s.get('decode_ratio_min'))}x, prefill min "
                                       f"{_num(s.get('prefill_ratio_min'))}x",
        "pointwise_kernels": lambda s: ", ".join(f"{r['kernel']} {r['ratio']:.2f}x" for r in s.get("rows", [])),
        "engine_vs_hf": lambda s: f"{s.get('tokens_compared')}/{s.get('tokens_total')} tokens compared, agreement "
                                  f"{_num(s.get('token_agreement'))}, max logprob diff {_num(s.get('max_logprob_diff'), 3)}, "
                                  f"{s.get('graph_replays')} graph replays",
        "cuda_graphs": lambda s: f"graphs / eager: batch 1 {_num(s.get('speedup_b1'))}x, batch 16 "
                                 f"{_num(s.get('speedup_b16'))}x; {s.get('graphs_replays')} replays",
        "roofline_8b": lambda s: f"{_num(s.get('decode_tok_s'), 1)} tok/s = {_num(100 * s['roofline_fraction'], 1)}% "
                                 f"of {_num(s.get('roofline_tok_s'), 1)}" if "roofline_fraction" in s else "",
        "quant_gemm": lambda s: f"batch 1: W4A16 {_num(s.get('w4a16_speedup_b1'))}x, W8A16 "
                                f"{_num(s.get('w8a16_speedup_b1'))}x, FP8 {_num(s.get('fp8_speedup_b1'))}x bf16",
        "int8_kv_attention": lambda s: f"int8 / bf16 KV decode {_num(s.get('speedup_geomean'))}x, int4 "
                                       f"{_num(s.get('int4_speedup_geomean'))}x; engine agreement int8 "
                                       f"{_num(s.get('engine_token_agreement'))}, int4 "
                                       f"{_num(s.get('int4_engine_token_agreement'))}; blocks int8 "
                                       f"x{_num(s.get('kv_blocks_gain'))}, int4 x{_num(s.get('int4_kv_blocks_gain'))}",
        "gpu_tests": lambda s: f"{s.get('summary', '')}" if "counts" in s else "",
        "offline_vs_hf": lambda s: f"kubellm {_num(s.get('engine_tok_s'), 0)} tok/s, HF {_num(s.get('hf_tok_s'), 0)} "
                                   f"tok/s: {_num(s.get('ratio'))}x",
    }.get(name)
    try:
        text = pick(step) if pick else ""
    except (KeyError, TypeError, ValueError):   # a killed step's partial figures may lack some
        text = ""
    if step.get("status") in ("fail", "timeout") and step.get("error"):
        text = f"{step['error']}; {text}" if text else step["error"]
    return text


def markdown(report: dict) -> str:
    report = report if "targets" in report else complete(report)
    v = report.get("versions", {})
    lines = [f"# GPU check {report.get('date')}: {report.get('device_name') or report.get('device')}", "",
             f"`kubellm bench gpu` on {report.get('device')}, started {report.get('started_at')}, "
             f"{_num(report.get('seconds'), 0)} s of a {_num(report.get('total_budget_s'), 0)} s budget. "
             f"Python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}, kubellm {v.get('kubellm')}; driver {v.get('driver')}.", ""]
    if not str(report.get("device", "")).startswith("cuda"):
        lines += ["A CPU dry run: tiny shapes, Triton interpreted; the timings mean nothing.", ""]
    lines += ["## Issue 19's GPU targets", "", "| target | value | |", "| --- | --- | --- |"]
    for t in report["targets"].values():
        mark = {True: "met", False: "not met", None: t["note"]}[t["met"]]
        lines.append(f"| {t['target']} | {_num(t['value'])} | {mark} |")
    lines += ["", "## Steps", "", "| step | status | seconds | figures |", "| --- | --- | --- | --- |"]
    for name, step in report.get("steps", {}).items():
        lines.append(f"| {name} | {step.get('status')} | {_num(step.get('seconds'), 0)} | "
                     f"{_step_figures(name, step).replace('|', '/')} |")
    attn = report.get("steps", {}).get("attention_kernels", {})
    if attn.get("rows"):
        lines += ["", "## Attention kernels against SDPA (ratio = SDPA time / Triton time)", "",
                  "| kernel | shape | Triton ms | SDPA ms | gather+SDPA ms | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        for r in attn["rows"]:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | "
                         f"{_num(r.get('gather_ms'), 3)} | {r['ratio']:.2f} |")
    quant = report.get("steps", {}).get("quant_gemm", {})
    if quant.get("rows"):
        lines += ["", "## Quantized GEMMs against bf16 (speedup = bf16 time / quantized time)", "",
                  "| linear | rows x K -> N | bf16 ms | W4A16 ms | W4A16 x | W8A16 ms | W8A16 x | FP8 ms | FP8 x |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in quant["rows"]:
            lines.append(f"| {r['linear']} | {r['rows']} x {r['k']} -> {r['n']} | {r['bf16_ms']:.4f} | "
                         f"{r['w4a16_ms']:.4f} | {r['w4a16_speedup']:.2f} | {r['w8a16_ms']:.4f} | "
                         f"{r['w8a16_speedup']:.2f} | {_num(r.get('fp8_ms'), 4)} | {_num(r.get('fp8_speedup'))} |")
    tests = report.get("steps", {}).get("gpu_tests", {}).get("tests", {})
    failed = {name: t for name, t in tests.items() if t["outcome"] in ("failed", "error")}
    if failed:
        lines += ["", "## GPU tests that failed", ""]
        lines += [f"- `{name}` ({t['outcome']}): {t.get('message', '')}" for name, t in failed.items()]
    broken = [(n, s) for n, s in report.get("steps", {}).items() if s.get("status") in ("fail", "timeout")]
    if broken:
        lines += ["", "## Failures", ""]
        for name, step in broken:
            lines.append(f"- **{name}** ({step['status']}): {step.get('error', '')}")
            for line in (step.get("traceback") or step.get("output_tail") or [])[-8:]:
                lines.append(f"    {line}")
    lines += ["", f"Full figures: {file_stem(report)}.json beside this file.", ""]
    return "\n".join(lines)


def summary(report: dict) -> str:
    """What the command prints at the end: the markdown, then where it was written."""
    text = markdown(report)
    if report.get("files"):
        text += "\nwritten: " + ", ".join(report["files"]) + "\n"
    return text

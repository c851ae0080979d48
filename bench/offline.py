"""`kubellm bench offline`: the engine against Hugging Face `generate` on the same seeded workload.

Both sides get the same prompts, the same per-request `max_new_tokens` (EOS ignored) and the
same cap on concurrent sequences. Hugging Face runs the requests in arrival-order batches of
that size, left-padded, each batch until its longest request is done; its throughput counts
only the tokens the requests asked for. Everything runs in one process, one after the other.

Lengths are drawn either uniformly from a range, or long-tailed (log-normal, as prompt and
reply lengths of real chat traffic such as ShareGPT are), clipped to the range.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kubellm.bench.progress import Progress
from kubellm.bench.workload import Workload, make_workload, run_engine


def run_hf(model, pad_id: int, work: Workload, batch_size: int, progress: Progress | None = None) -> float:
    import torch

    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        batch = work.prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        new = max(work.max_new_tokens[i:i + batch_size])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id)
        if progress is not None:   # the tokens the batch's requests asked for, as the throughput counts them
            progress.update(sum(work.max_new_tokens[i:i + batch_size]))
    return time.perf_counter() - start


# --formats: each weight format's EngineConfig options (layers/quantization/). "q4" is the checkpoint as stored:
# the embedded model's GGUF holds Q4_1 layers (and a Q8_0 embedding tied to the LM head).
FORMAT_OPTIONS = {"float32": dict(quantization="float", dtype="float32"), "int8": dict(quantization="int8"),
                  "q4": dict()}


def parse_formats(text: str | None, device: str) -> list[str]:
    """`--formats`: comma-separated names of FORMAT_OPTIONS; "auto" is all of them on CPU, none on a GPU (the
    random-model roofline is the GPU's); "none" none. Pure: tested by table."""
    if text in (None, "auto"):
        return list(FORMAT_OPTIONS) if device == "cpu" else []
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMAT_OPTIONS]
    if unknown:
        raise ValueError(f"--formats: {', '.join(unknown)} unknown; use a comma-separated list of "
                         f"{', '.join(FORMAT_OPTIONS)}, or auto / none")
    return names


def format_rooflines(model: str, formats: list[str], base: dict, progress: Progress, rounds: int = 3,
                     prompt_len: int = 32, new_tokens: int = 64) -> dict:
    """Per weight format, batch-1 decode tok/s against the read-bandwidth roofline (bench/roofline.py), with the
    bandwidth measured once for all of them. Short prompt and reply: on CPU the weights dominate a step's bytes."""
    import torch

    from kubellm.bench import roofline as bench_roofline
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    progress.switch("read bandwidth (torch.sum over 1 GiB)", total=None)
    bandwidth = bench_roofline.measure_bandwidth(torch.device("cpu"))
    out = {"bandwidth_GBps": bandwidth / 1e9, "formats": {}}
    for name in formats:
        progress.switch(f"kubellm {name} batch-1 decode (roofline)", total=None)
        engine = LLMEngine(model, EngineConfig.build(**{**base, **FORMAT_OPTIONS[name]}), show_progress=False)
        try:
            out["formats"][name] = bench_roofline.batch1_decode(engine, prompt_len, new_tokens, bandwidth=bandwidth,
                                                                rounds=rounds)
        finally:
            engine.destroy()
    return out


def format_formats(r: dict) -> str:
    lines = [f"bandwidth    {r['bandwidth_GBps']:8.1f} GB/s read (torch.sum over 1 GiB, best of 5)"]
    float32 = r["formats"].get("float32")
    for name, d in r["formats"].items():
        vs = f", {d['decode_tok_s'] / float32['decode_tok_s']:.2f}x float32" if float32 and name != "float32" else ""
        lines.append(f"{name:<8} b=1 {d['decode_tok_s']:8.1f} tok/s  roofline {d['roofline_tok_s']:7.1f} tok/s "
                     f"({d['weight_GB'] * 1e3:.0f} MB/step)  {100 * d['roofline_fraction']:5.1f} % of it{vs}")
    return "\n".join(lines)


def offline(model: str, num_prompts: int = 64, batch_size: int = 16, prompt_len=(8, 512),
            new_tokens=(8, 512), seed: int = 0, dtype: str = "auto", skip_hf: bool = False,
            lengths: str = "longtail", random_model: str | None = None, enforce_eager: bool = False,
            compile: bool = False, device: str = "auto", show_progress: bool = True, on_engine_result=None,
            formats: str | None = None, baseline: str = "hf") -> dict:
    """`random_model` (a name in bench_roofline.RANDOM_MODELS, e.g. llama3-8b): that shape with random
    bf16 weights instead of `model`, plus batch-1 decode speed against the memory-bandwidth roofline.
    `formats` (parse_formats): the same roofline on CPU per weight format of `model`. `baseline`: "hf" (the
    workload against HF generate) or "llama.cpp" (bench/llama_cpp.py: batch 1 and 16 concurrent requests on the
    same GGUF file, instead of HF generate).
    `show_progress`: the side being measured, tokens done / total and an ETA on stderr (bench/progress.py).
    `on_engine_result(result)`: called with kubellm's figures before HF generate runs (`bench gpu` keeps them
    should HF's side not finish in time)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from kubellm.bench import roofline as bench_roofline
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    options = dict(max_batch_size=batch_size, dtype=dtype, enforce_eager=enforce_eager, device=device)
    if compile:   # kubellm's side only (EngineConfig.compile: CPU decode steps through torch.compile)
        options["compile"] = True
    if random_model:
        model = str(bench_roofline.make_random_checkpoint(tempfile.mkdtemp(prefix="kubellm-random-"), random_model))
        options.update(load_format="random", dtype="bfloat16" if dtype == "auto" else dtype)
    if baseline not in ("hf", "llama.cpp"):
        raise ValueError(f"--baseline: {baseline!r} unknown; use hf or llama.cpp")
    if baseline == "llama.cpp":
        from kubellm.bench import llama_cpp

        llama_cpp.import_llama_cpp()   # before minutes of benchmarking: say now if it is missing
    engine = LLMEngine(model, EngineConfig.build(**options), show_progress=show_progress)
    cpu = engine.runner.device.type == "cpu"
    names = parse_formats(formats, "cpu" if cpu else "cuda") if not random_model else []
    work = make_workload(engine.tokenizer.hf, num_prompts, prompt_len, new_tokens, seed, lengths)
    warm = Workload(work.prompts[:2], [4, 4])
    progress = Progress("bench offline", "kubellm warm-up", total=warm.generated_tokens, unit="tokens",
                        enabled=show_progress)
    run_engine(engine, warm, progress)
    if random_model:
        progress.switch("kubellm batch-1 decode (roofline)", total=None)
    decode = bench_roofline.batch1_decode(engine) if random_model else None
    if baseline == "llama.cpp":
        return _against_llama_cpp(engine, work, names, options, progress)
    progress.switch("kubellm", total=work.generated_tokens)
    engine_s = run_engine(engine, work, progress)
    result = {"model": str(engine.model_path), "device": str(engine.runner.device), "dtype": str(engine.runner.dtype),
              "threads": torch.get_num_threads(), "prompts": num_prompts, "batch_size": batch_size,
              "lengths": lengths,
              "prompt_tokens": sum(map(len, work.prompts)), "generated_tokens": work.generated_tokens,
              "engine_s": engine_s, "engine_tok_s": work.generated_tokens / engine_s,
              "preemptions": engine.scheduler.num_preemptions}
    if decode is not None:
        result.update(random_model=random_model, decode=decode)
    if on_engine_result is not None:
        on_engine_result(dict(result))
    device, dtype_ = engine.runner.device, engine.runner.dtype
    engine.destroy()
    if names:
        result["rooflines"] = format_rooflines(result["model"], names, options, progress)
    if not skip_hf:
        progress.switch("loading HF generate's model", total=None)
        if random_model:  # the same shapes with HF's own random init: speed does not depend on values
            from transformers import AutoConfig

            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(result["model"]), dtype=dtype_)
            hf = hf.eval()
        else:
            # a GGUF directory (the embedded model): transformers de-quantizes the file itself
            gguf = {"gguf_file": f.name for f in Path(result["model"]).glob("*.gguf")}
            hf = AutoModelForCausalLM.from_pretrained(result["model"], dtype=dtype_, **gguf).to(device).eval()
        pad = hf.generation_config.pad_token_id
        pad = pad if pad is not None else 0
        progress.switch("HF generate warm-up", total=warm.generated_tokens)
        run_hf(hf, pad, warm, batch_size, progress)
        progress.switch("HF generate", total=work.generated_tokens)
        hf_s = run_hf(hf, pad, work, batch_size, progress)
        result.update(hf_s=hf_s, hf_tok_s=work.generated_tokens / hf_s, ratio=hf_s / engine_s)
    progress.close()
    return result


def _against_llama_cpp(engine, work: Workload, names: list[str], options: dict, progress: Progress) -> dict:
    import torch

    from kubellm.bench import llama_cpp

    model = str(engine.model_path)
    result = {"model": model, "device": str(engine.runner.device), "dtype": str(engine.runner.dtype),
              "threads": torch.get_num_threads(), "baseline": "llama.cpp",
              "llama_cpp": llama_cpp.compare(engine, model, work.prompts, concurrency=options["max_batch_size"],
                                             progress=progress)}
    engine.destroy()
    if names:
        result["rooflines"] = format_rooflines(model, names, options, progress)
    progress.close()
    return result


def format_result(r: dict) -> str:
    if r.get("baseline") == "llama.cpp":
        from kubellm.bench.llama_cpp import format_compare

        lines = [f"model        {r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads)",
                 format_compare(r["llama_cpp"])]
        if "rooflines" in r:
            lines.append(format_formats(r["rooflines"]))
        return "\n".join(lines)
    lines = [f"model        {r['model']} ({r['device']}, {r['dtype']}, {r['threads']} threads)",
             f"workload     {r['prompts']} prompts ({r['lengths']} lengths), {r['prompt_tokens']} prompt tokens, "
             f"{r['generated_tokens']} generated tokens, batch cap {r['batch_size']}",
             f"kubellm      {r['engine_tok_s']:8.1f} tok/s  ({r['engine_s']:.1f} s, {r['preemptions']} preemptions)"]
    if "hf_tok_s" in r:
        lines += [f"HF generate  {r['hf_tok_s']:8.1f} tok/s  ({r['hf_s']:.1f} s)",
                  f"ratio        {r['ratio']:8.2f}x  (kubellm / Hugging Face)"]
    if "decode" in r:
        from kubellm.bench.roofline import format_decode

        lines += [f"random model {r['random_model']} (random bf16 weights from a config; nothing downloaded)",
                  format_decode(r["decode"])]
    if "rooflines" in r:
        lines.append(format_formats(r["rooflines"]))
    return "\n".join(lines)


def command(args) -> int:
    """`kubellm bench offline`."""
    result = offline(args.model, num_prompts=args.num_prompts, batch_size=args.batch_size,
                     prompt_len=(args.min_prompt, args.max_prompt), new_tokens=(args.min_new, args.max_new),
                     seed=args.seed, dtype=args.dtype, skip_hf=args.no_baseline, lengths=args.lengths,
                     random_model=args.random_model, enforce_eager=args.enforce_eager, compile=args.compile,
                     formats=args.formats, baseline=args.baseline)
    print(json.dumps(result) if args.json else format_result(result))
    return 0

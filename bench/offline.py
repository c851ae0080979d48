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


def offline(model: str, num_prompts: int = 64, batch_size: int = 16, prompt_len=(8, 512),
            new_tokens=(8, 512), seed: int = 0, dtype: str = "auto", skip_hf: bool = False,
            lengths: str = "longtail", random_model: str | None = None, enforce_eager: bool = False,
            device: str = "auto", show_progress: bool = True, on_engine_result=None) -> dict:
    """`random_model` (a name in bench_roofline.RANDOM_MODELS, e.g. llama3-8b): that shape with random
    bf16 weights instead of `model`, plus batch-1 decode speed against the memory-bandwidth roofline.
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
    if random_model:
        model = str(bench_roofline.make_random_checkpoint(tempfile.mkdtemp(prefix="kubellm-random-"), random_model))
        options.update(load_format="random", dtype="bfloat16" if dtype == "auto" else dtype)
    engine = LLMEngine(model, EngineConfig.build(**options), show_progress=show_progress)
    work = make_workload(engine.tokenizer.hf, num_prompts, prompt_len, new_tokens, seed, lengths)
    warm = Workload(work.prompts[:2], [4, 4])
    progress = Progress("bench offline", "kubellm warm-up", total=warm.generated_tokens, unit="tokens",
                        enabled=show_progress)
    run_engine(engine, warm, progress)
    if random_model:
        progress.switch("kubellm batch-1 decode (roofline)", total=None)
    decode = bench_roofline.batch1_decode(engine) if random_model else None
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


def format_result(r: dict) -> str:
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
    return "\n".join(lines)


def command(args) -> int:
    """`kubellm bench offline`."""
    result = offline(args.model, num_prompts=args.num_prompts, batch_size=args.batch_size,
                     prompt_len=(args.min_prompt, args.max_prompt), new_tokens=(args.min_new, args.max_new),
                     seed=args.seed, dtype=args.dtype, skip_hf=args.no_baseline, lengths=args.lengths,
                     random_model=args.random_model, enforce_eager=args.enforce_eager)
    print(json.dumps(result) if args.json else format_result(result))
    return 0

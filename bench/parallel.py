"""`kubellm bench parallel`: one workload on one process, then on a tensor × pipeline group with
and without micro-batching, side by side (greedy, so every run generates the same tokens)."""

from __future__ import annotations

import json

from kubellm.bench.progress import Progress
from kubellm.bench.workload import Workload, make_workload, run_engine


def parallel(model: str, tensor_parallel: int = 1, pipeline_parallel: int = 2, num_prompts: int = 32,
             batch_size: int = 16, prompt_len=(8, 256), new_tokens=(8, 128), seed: int = 0, dtype: str = "auto",
             lengths: str = "longtail", device: str = "auto") -> dict:
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.engine import LLMEngine

    group = {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel}
    configs = [("one process", {}), ("group, 1 micro-batch", {**group, "pipeline_micro_batches": 1}),
               (f"group, {pipeline_parallel} micro-batches", group)]
    if pipeline_parallel == 1:
        configs = configs[:2]
    runs, work = [], None
    progress = Progress("bench parallel", f"{configs[0][0]}: starting", total=None, unit="tokens")
    for n, (label, options) in enumerate(configs):
        progress.switch(f"{label} ({n + 1}/{len(configs)}): starting", total=None)
        engine = LLMEngine(model, EngineConfig.build(max_batch_size=batch_size, dtype=dtype, device=device,
                                                     **options), show_progress=False)
        try:
            if work is None:
                work = make_workload(engine.tokenizer.hf, num_prompts, prompt_len, new_tokens, seed, lengths)
            run_engine(engine, Workload(work.prompts[:2], [4, 4]))  # warm up
            progress.switch(f"{label} ({n + 1}/{len(configs)})", total=work.generated_tokens)
            seconds = run_engine(engine, work, progress)
            runs.append({"config": label, **options, "seconds": seconds,
                         "tok_s": work.generated_tokens / seconds, "device": str(engine.runner.device)})
        finally:
            engine.destroy()
    progress.close()
    for run in runs:
        run["ratio"] = run["tok_s"] / runs[0]["tok_s"]
    return {"model": model, "prompts": num_prompts, "generated_tokens": work.generated_tokens,
            "batch_size": batch_size, "runs": runs}


def format_parallel(r: dict) -> str:
    lines = [f"model {r['model']}: {r['prompts']} prompts, {r['generated_tokens']} generated tokens, "
             f"batch cap {r['batch_size']}, {r['runs'][0]['device']}"]
    for run in r["runs"]:
        lines.append(f"{run['config']:<26} {run['tok_s']:8.1f} tok/s  {run['ratio']:5.2f}x of one process")
    return "\n".join(lines)


def command(args) -> int:
    """`kubellm bench parallel`."""
    result = parallel(args.model, args.tensor_parallel, args.pipeline_parallel, args.num_prompts, args.batch_size,
                      (args.min_prompt, args.max_prompt), (args.min_new, args.max_new), args.seed, args.dtype,
                      args.lengths)
    print(json.dumps(result) if args.json else format_parallel(result))
    return 0

"""`python -m kubellm.bench.kv_swap`: how long a preempted sequence takes to resume with eviction='copy'
(its KV blocks swapped to host memory and back) against eviction='recompute' (its tokens prefilled again).

The KV cache is sized so that a long sequence (`--prompt-tokens`) and a short one that keeps decoding
do not both fit: when the short one needs a block, the long one (admitted last) is preempted, and it
resumes once the short one has finished. Its resume is timed from the start of the step that brings it
back (swap-in, or re-admission) to its next token; the step that preempted it is timed too (copy pays
the swap-out there). Both runs are greedy and must generate the same tokens. Prefix caching is off by
default, so that recompute recomputes (with it on, the long sequence's own freed blocks are often still
cached when it comes back: `--prefix-caching` shows that case).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def resume_once(model: str, eviction: str, prompt_tokens: int, block_size: int, budget: int, dtype: str,
                device: str, prefix_caching: bool, seed: int) -> dict:
    from kubellm.runtime.config import EngineConfig, GenerationConfig
    from kubellm.runtime.engine.engine import LLMEngine
    from kubellm.runtime.engine.sequence import Status

    long_new, short_new = 2 * block_size, 3 * block_size
    # Room for the whole long sequence plus the short prompt's block: the short one's second block takes
    # the last free one, and the long one's next block then finds none and preempts it (admitted last).
    # It comes back once the short one is done (while it runs, its blocks leave too few).
    blocks = -(-(prompt_tokens + long_new) // block_size) + 1
    config = EngineConfig.build(num_kv_blocks=blocks, block_size=block_size, max_num_batched_tokens=budget,
                                dtype=dtype, device=device, enable_prefix_caching=prefix_caching,
                                eviction=eviction, num_cpu_blocks=blocks if eviction == "copy" else 0,
                                session_len=prompt_tokens + long_new + 1)
    engine = LLMEngine(model, config, show_progress=False)
    try:
        rng = random.Random(seed)
        vocab = engine.tokenizer.hf.vocab_size
        long_ids = [rng.randrange(100, vocab) for _ in range(prompt_tokens)]
        short_ids = [rng.randrange(100, vocab) for _ in range(block_size // 2)]
        short = engine.add_request(short_ids, GenerationConfig(max_new_tokens=short_new, ignore_eos=True))
        long = engine.add_request(long_ids, GenerationConfig(max_new_tokens=long_new, ignore_eos=True))
        preempt_s = resume_s = None
        resumed_at = preempted_tokens = None
        was_running = False
        while engine.has_unfinished():
            generated = long.num_generated
            started = time.perf_counter()
            engine.step()
            took = time.perf_counter() - started
            sched = engine.scheduler
            if was_running and long.status is not Status.RUNNING and preempt_s is None:
                preempt_s, preempted_tokens = took, len(long)
            if preempt_s is not None and resume_s is None:
                if resumed_at is None and long.status is Status.RUNNING:
                    resumed_at = started          # the step that brought it back
                if resumed_at is not None and long.num_generated > generated:
                    resume_s = time.perf_counter() - resumed_at
            was_running = long.status is Status.RUNNING
        if preempt_s is None or resume_s is None:
            raise RuntimeError("the long sequence was not preempted and resumed; the cache sizing is off")
        return {"eviction": eviction, "resume_s": resume_s, "preempt_step_s": preempt_s,
                "tokens_at_preemption": preempted_tokens, "swapped_out_blocks": engine.block_manager.swapped_out_blocks,
                "swapped_in_blocks": engine.block_manager.swapped_in_blocks, "fallbacks": sched.num_swap_fallbacks,
                "device": str(engine.runner.device), "token_ids": long.token_ids, "short_ids": short.token_ids}
    finally:
        engine.destroy()


def kv_swap(model: str = "smollm2-135m", prompt_tokens: int = 1024, rounds: int = 3, block_size: int = 16,
            budget: int = 512, dtype: str = "float32", device: str = "cpu", prefix_caching: bool = False,
            seed: int = 0) -> dict:
    from kubellm.bench.progress import Progress

    runs: dict[str, list[dict]] = {"copy": [], "recompute": []}
    progress = Progress("bench kv_swap", "eviction=copy and eviction=recompute in turn", total=2 * rounds,
                        unit="runs")
    for r in range(rounds):   # alternating, so drifting machine load hits both alike
        for eviction in runs:
            progress.update(0, note=f"round {r + 1}/{rounds}, eviction={eviction}")
            runs[eviction].append(resume_once(model, eviction, prompt_tokens, block_size, budget, dtype, device,
                                              prefix_caching, seed))
            progress.update()
    progress.close()
    copy, recompute = runs["copy"], runs["recompute"]
    if any(r["token_ids"] != recompute[0]["token_ids"] or r["short_ids"] != recompute[0]["short_ids"]
           for r in copy + recompute):
        raise RuntimeError("copy and recompute generated different tokens")
    if any(r["swapped_out_blocks"] == 0 or r["swapped_in_blocks"] == 0 for r in copy):
        raise RuntimeError("eviction='copy' did not swap")

    def median(rs, key):
        return statistics.median(r[key] for r in rs)

    import torch

    return {"model": model, "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "block_size": block_size, "budget": budget,
            "dtype": dtype, "device": copy[0]["device"], "prefix_caching": prefix_caching, "rounds": rounds,
            "tokens_at_preemption": copy[0]["tokens_at_preemption"],
            "swapped_blocks": copy[0]["swapped_out_blocks"], "copied_back_blocks": copy[0]["swapped_in_blocks"],
            "copy_resume_s": median(copy, "resume_s"), "recompute_resume_s": median(recompute, "resume_s"),
            "copy_preempt_step_s": median(copy, "preempt_step_s"),
            "recompute_preempt_step_s": median(recompute, "preempt_step_s"),
            "resume_ratio": median(recompute, "resume_s") / median(copy, "resume_s"),
            "copy_resume_all_s": [r["resume_s"] for r in copy],
            "recompute_resume_all_s": [r["resume_s"] for r in recompute]}


def format_kv_swap(r: dict) -> str:
    return "\n".join([
        f"model {r['model']} ({r['dtype']} on {r['device']}), a {r['prompt_tokens']}-token prompt preempted at "
        f"{r['tokens_at_preemption']} tokens ({r['swapped_blocks']} blocks of {r['block_size']} out, "
        f"{r['copied_back_blocks']} copied back, the rest shared from the prefix cache), step budget "
        f"{r['budget']}, prefix caching {'on' if r['prefix_caching'] else 'off'}, {r['threads']} torch threads, "
        f"median of {r['rounds']}",
        f"resume to its next token: copy {r['copy_resume_s'] * 1e3:8.1f} ms   recompute "
        f"{r['recompute_resume_s'] * 1e3:8.1f} ms   recompute / copy {r['resume_ratio']:.1f}x",
        f"the preempting step:      copy {r['copy_preempt_step_s'] * 1e3:8.1f} ms   recompute "
        f"{r['recompute_preempt_step_s'] * 1e3:8.1f} ms",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.bench.kv_swap", description=__doc__.split("\n")[0])
    parser.add_argument("--model", "-m", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default torch's); 1 is steadier on a shared machine")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    result = kv_swap(a.model, a.prompt_tokens, a.rounds, a.block_size, a.budget, a.dtype, a.device,
                     a.prefix_caching, a.seed)
    print(json.dumps(result) if a.json else format_kv_swap(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`kubellm generate`: prompts through the Python API's pipeline, printed."""

from __future__ import annotations

import json

from kubellm.runtime.config import generation_config
from kubellm.runtime.pipeline import pipeline


def engine_options(args) -> dict:
    options = {"dtype": args.dtype, "device": args.device, "max_batch_size": args.max_batch_size}
    if args.session_len:
        options["session_len"] = args.session_len
    if args.compile:
        options["compile"] = True
    return options


def generate(args) -> int:
    gen = generation_config(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, random_seed=args.seed, stop_words=args.stop or [])
    pipe = pipeline(args.model, show_progress=not args.quiet, **engine_options(args))
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompts]
    if args.stream and len(prompts) == 1:
        for delta in pipe.stream(prompts, gen_config=gen):
            print(delta.text, end="", flush=True)
        print()
        return 0
    for response in pipe(prompts, gen_config=gen):
        if args.json:
            print(json.dumps({"text": response.text, "prompt_length": response.input_token_len,
                              "generated_length": response.generate_token_len,
                              "finish_reason": response.finish_reason}))
        else:
            text = response.text if args.chat else args.prompts[response.index] + response.text
            print(text.strip() if args.chat else text)
    return 0

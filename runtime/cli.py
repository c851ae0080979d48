"""The `kubellm` command. Subcommands import what they need, so `kubellm --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys


def _engine_options(args) -> dict:
    options = {"dtype": args.dtype, "device": args.device, "max_batch_size": args.max_batch_size}
    if args.session_len:
        options["session_len"] = args.session_len
    return options


def cmd_generate(args) -> int:
    from kubellm.runtime.api import pipeline
    from kubellm.runtime.config import generation_config

    gen = generation_config(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, random_seed=args.seed, stop_words=args.stop or [])
    pipe = pipeline(args.model, show_progress=not args.quiet, **_engine_options(args))
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


def cmd_models(args) -> int:
    from kubellm.runtime import model_hub

    if args.action == "pull":
        print(model_hub.pull(args.name, force=args.force))
    elif args.action == "download":
        print(model_hub.download_hf(args.name, args.dest))
    else:
        for name in model_hub.known_names():
            print(name)
    return 0


def cmd_bench(args) -> int:
    from kubellm.runtime import bench

    result = bench.offline(args.model, num_prompts=args.num_prompts, batch_size=args.batch_size,
                           prompt_len=(args.min_prompt, args.max_prompt), new_tokens=(args.min_new, args.max_new),
                           seed=args.seed, dtype=args.dtype, skip_hf=args.no_baseline, lengths=args.lengths)
    print(json.dumps(result) if args.json else bench.format_result(result))
    return 0


def cmd_router(args) -> int:
    import asyncio
    import logging

    from kubellm.runtime.router import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args.leaders, port=args.port, host=args.host, deployment_name=args.deployment_name,
                      rest_port=args.rest_port, metrics_port=args.metrics_port,
                      allow_terminate=args.allow_terminate, health_interval=args.health_interval,
                      resolve_interval=args.resolve_interval))
    return 0


def cmd_operator(args) -> int:
    from kubellm.operator.handlers import run

    run(namespace=args.namespace, verbose=args.verbose)
    return 0


def cmd_worker(args) -> int:
    """One engine behind the gRPC API (rank 0 of a replica); runs until terminated or signalled."""
    import asyncio
    import logging

    from kubellm.runtime.config import EngineConfig, generation_config
    from kubellm.runtime.server import serve_worker

    options = {}
    if args.config:
        with open(args.config) as f:
            options = json.load(f)
        if not isinstance(options, dict):
            raise ValueError(f"--config: {args.config} must hold a JSON object of EngineConfig fields")
    for name in ("tensor_parallel", "pipeline_parallel", "dtype", "device", "max_batch_size", "session_len"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    engine_config = EngineConfig.build(**options)
    if engine_config.tensor_parallel > 1 or engine_config.pipeline_parallel > 1:
        raise NotImplementedError("tensor/pipeline parallel arrives with issue 5; "
                                  "run with --tensor-parallel 1 --pipeline-parallel 1")
    defaults = None
    if args.generation_defaults:
        with open(args.generation_defaults) as f:
            defaults = generation_config(json.load(f)).model_dump(exclude_unset=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve_worker(args.model, engine_config, port=args.port, host=args.host, replica=args.replica,
                                 allow_terminate=args.allow_terminate, generation_defaults=defaults,
                                 metrics_port=args.metrics_port, show_progress=False))
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kubellm import __version__

    parser = argparse.ArgumentParser(prog="kubellm", description="Serve large language models, locally or on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubellm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def engine_flags(p):
        p.add_argument("--model", "-m", default="smollm2-135m",
                       help="local Hugging Face directory or a known name (default: smollm2-135m)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--max-batch-size", type=int, default=64)
        p.add_argument("--session-len", type=int, default=None)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    engine_flags(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop word (repeatable)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user chat message")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive (one prompt)")
    gen.add_argument("--json", action="store_true", help="one JSON object per response")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="the local model cache")
    models.add_argument("action", choices=["pull", "list", "download"],
                        help="pull: convert a known model into the cache; download: fetch hf://org/name[@rev] "
                             "into --dest (the worker pods' init container)")
    models.add_argument("name", nargs="?", default="smollm2-135m")
    models.add_argument("--dest", help="download: target directory")
    models.add_argument("--force", action="store_true", help="convert again even if cached")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks, each against a baseline in the same run")
    bench.add_argument("kind", choices=["offline"])
    bench.add_argument("--model", "-m", default="smollm2-135m")
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--batch-size", type=int, default=16, help="concurrency cap for both engines")
    bench.add_argument("--lengths", choices=["longtail", "uniform"], default="longtail",
                       help="prompt/reply length distribution within the bounds below")
    bench.add_argument("--min-prompt", type=int, default=8)
    bench.add_argument("--max-prompt", type=int, default=512)
    bench.add_argument("--min-new", type=int, default=8)
    bench.add_argument("--max-new", type=int, default=512)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--no-baseline", action="store_true", help="skip Hugging Face generate")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    operator = sub.add_parser("operator", help="run the Kubernetes operator (the operator container's entrypoint)")
    operator.add_argument("--namespace", default=None, help="watch one namespace (default: the whole cluster)")
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(func=cmd_operator)
    worker = sub.add_parser("worker", help="serve one engine over gRPC (a replica's leader; what the pods run)")
    worker.add_argument("--model", "-m", default="smollm2-135m",
                        help="local Hugging Face directory or a known name (default: smollm2-135m)")
    worker.add_argument("--config", help="JSON file of EngineConfig fields (the operator's ConfigMap)")
    worker.add_argument("--tensor-parallel", type=int, default=None)
    worker.add_argument("--pipeline-parallel", type=int, default=None)
    worker.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    worker.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    worker.add_argument("--max-batch-size", type=int, default=None)
    worker.add_argument("--session-len", type=int, default=None)
    worker.add_argument("--host", default="0.0.0.0")
    worker.add_argument("--port", type=int, default=50051)
    worker.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    worker.add_argument("--replica", default=None, help="name reported in every response (default: hostname:port)")
    worker.add_argument("--allow-terminate", action="store_true", help="honour the Terminate RPC (local deployments)")
    worker.add_argument("--generation-defaults", help="JSON file of GenerationConfig defaults for every request")
    worker.set_defaults(func=cmd_worker)
    router = sub.add_parser("router", help="round-robin gRPC router over replica leaders, with optional REST "
                                           "gateway (the router pod's entrypoint; no torch)")
    router.add_argument("--leaders", required=True,
                        help="host:port,host:port or dns:///NAME:PORT (re-resolved; every A record is a leader)")
    router.add_argument("--port", type=int, default=50051, help="gRPC port")
    router.add_argument("--host", default="0.0.0.0")
    router.add_argument("--deployment-name", default="kubellm")
    router.add_argument("--rest-port", type=int, default=None,
                        help="serve /mii/NAME, OpenAI /v1/... and /metrics on this port")
    router.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    router.add_argument("--allow-terminate", action="store_true", help="let Terminate stop the replicas and router")
    router.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    router.add_argument("--resolve-interval", type=float, default=5.0, help="seconds between DNS resolutions")
    router.set_defaults(func=cmd_router)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, NotImplementedError) as err:  # bad configuration or request: a message, not a traceback
        print(f"kubellm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `kubellm` command. Subcommands import what they need, so `kubellm --help` is instant."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading


def _engine_options(args) -> dict:
    options = {"dtype": args.dtype, "device": args.device, "max_batch_size": args.max_batch_size}
    if args.session_len:
        options["session_len"] = args.session_len
    return options


def cmd_generate(args) -> int:
    from kubellm.runtime.pipeline import pipeline
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
    from kubellm.runtime.hub import download, embedded

    if args.action == "pull":
        print(embedded.pull(args.name, force=args.force))
    elif args.action == "download":
        print(download.download_hf(args.name, args.dest))
    else:
        for name in embedded.known_names():
            print(name)
    return 0


def cmd_bench(args) -> int:
    if args.kind == "serve":
        from kubellm.bench.serve import sweep

        print(sweep(args.target, args.direct, [int(c) for c in args.concurrency.split(",")],
                    args.requests_per_stream, args.max_new))
        return 0
    if args.kind == "parallel":
        from kubellm.bench.parallel import format_parallel, parallel

        result = parallel(args.model, args.tensor_parallel, args.pipeline_parallel, args.num_prompts,
                          args.batch_size, (args.min_prompt, args.max_prompt), (args.min_new, args.max_new),
                          args.seed, args.dtype, args.lengths)
        print(json.dumps(result) if args.json else format_parallel(result))
        return 0
    if args.kind == "kernels":
        from kubellm.bench import kernels as bench_kernels

        return bench_kernels.main(as_json=args.json)
    from kubellm.bench import offline as bench

    result = bench.offline(args.model, num_prompts=args.num_prompts, batch_size=args.batch_size,
                           prompt_len=(args.min_prompt, args.max_prompt), new_tokens=(args.min_new, args.max_new),
                           seed=args.seed, dtype=args.dtype, skip_hf=args.no_baseline, lengths=args.lengths,
                           random_model=args.random_model, enforce_eager=args.enforce_eager)
    print(json.dumps(result) if args.json else bench.format_result(result))
    return 0


def cmd_router(args) -> int:
    import asyncio
    import logging

    from kubellm.runtime.serving.router import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args.leaders, port=args.port, host=args.host, deployment_name=args.deployment_name,
                      rest_port=args.rest_port, metrics_port=args.metrics_port,
                      allow_terminate=args.allow_terminate, health_interval=args.health_interval,
                      resolve_interval=args.resolve_interval, wait_for_replica=args.wait_for_replica))
    return 0


def cmd_operator(args) -> int:
    from kubellm.operator.handlers import run

    run(namespace=args.namespace, verbose=args.verbose)
    return 0


def _join_other_hosts(model, engine_config, ranks: list[int]):
    """Rank 0 of a group spanning hosts: start this host's other ranks, then wait for every rank."""
    from kubellm.runtime.executor.rank_group import RankGroup, master_address, start_remote_rank
    from kubellm.runtime.engine.engine import session_len_for
    from kubellm.runtime.executor.loader import load_hf_config
    from kubellm.runtime.hub.embedded import resolve_model

    path = resolve_model(model)
    session_len = session_len_for(load_hf_config(path), engine_config)
    addr, port = master_address()
    local = [start_remote_rank(r, addr, port, path, engine_config, session_len) for r in ranks[1:]]
    return RankGroup.accept(engine_config, addr, port, local_procs=local)


def _json_object(path: str, flag: str, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as err:
        raise ValueError(f"{flag}: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: {path} is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: {path} must hold a JSON object of {what} fields")
    return value


def worker_configs(args):
    """`kubellm worker`'s (EngineConfig, generation defaults or None) from its parsed arguments: the
    --config file (the operator's ConfigMap key engine.json) under the flags, and the
    --generation-defaults file (generation.json), validated as a GenerationConfig."""
    from kubellm.runtime.config import EngineConfig, generation_config

    options = _json_object(args.config, "--config", "EngineConfig") if args.config else {}
    for name in ("tensor_parallel", "pipeline_parallel", "dtype", "device", "max_batch_size", "session_len"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    engine_config = EngineConfig.build(**options)
    defaults = None
    if args.generation_defaults:
        defaults = generation_config(_json_object(args.generation_defaults, "--generation-defaults",
                                                  "GenerationConfig")).model_dump(exclude_unset=True)
    return engine_config, defaults


def cmd_worker(args) -> int:
    """One engine behind the gRPC API (rank 0 of a replica); runs until terminated or signalled."""
    import asyncio
    import logging

    from kubellm.runtime.executor.rank_group import ranks_on_this_host
    from kubellm.runtime.serving.follower import serve_follower
    from kubellm.runtime.serving.worker import TerminatedWhileLoading, serve_worker

    engine_config, defaults = worker_configs(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A group spread over pods (or torchrun processes): rank 0 serves gRPC, the others follow it.
    ranks = ranks_on_this_host(engine_config.world_size)
    if ranks is not None and ranks[0] != 0:
        serve_follower(args.model, engine_config, ranks, port=args.port, host=args.host)
        return 0
    rank_group = None if ranks is None else functools.partial(_join_other_hosts, args.model, engine_config, ranks)
    try:
        asyncio.run(serve_worker(args.model, engine_config, port=args.port, host=args.host, replica=args.replica,
                                 allow_terminate=args.allow_terminate, generation_defaults=defaults,
                                 metrics_port=args.metrics_port, show_progress=True, rank_group=rank_group))
    except KeyboardInterrupt:
        pass
    except TerminatedWhileLoading as stopped:
        logging.getLogger("kubellm.worker").info("%s", stopped)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)  # without waiting for the loading thread
    return 0


def _deployment_from_yaml(path: str) -> tuple[str, str, dict]:
    """An LLMDeployment manifest (the Kubernetes one) -> (name, model, serve() keyword options)."""
    import yaml

    from kubellm.api.spec import LLMDeploymentSpec

    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise ValueError(f"{path}: expected an LLMDeployment manifest with a 'spec' mapping")
    if doc.get("kind", "LLMDeployment") != "LLMDeployment":
        raise ValueError(f"{path}: kind is {doc.get('kind')!r}, expected LLMDeployment")
    try:
        spec = LLMDeploymentSpec.model_validate(doc["spec"])
    except Exception as err:  # pydantic's ValidationError: name the fields
        raise ValueError(f"{path}: invalid spec: {err}") from None
    name = (doc.get("metadata") or {}).get("name")
    if spec.model.kind in ("hf", "pvc"):
        raise ValueError(f"{path}: spec.model.source {spec.model.source!r} is not supported by local deployments; "
                         "use a local path or a known model name (kubellm models download hf://... --dest DIR)")
    settings = spec.runtime_settings()
    options = {**settings.engine, **settings.generation, "replica_num": max(spec.replicas, 1),
               "enable_restful_api": spec.restApi.enabled, "restful_api_port": spec.restApi.port}
    return name, spec.model.source, options


def cmd_serve(args) -> int:
    """Start a persistent local deployment (workers + router in the background) and return."""
    from kubellm.runtime.local import deployments

    name, model, options = None, args.model, {}
    if args.file:
        name, model, options = _deployment_from_yaml(args.file)
        if args.model:
            raise ValueError("give either MODEL or -f FILE, not both")
    elif not model:
        raise ValueError("serve: give a MODEL (a local directory or known name) or -f deployment.yaml")
    for key in ("dtype", "device", "max_batch_size", "session_len", "max_num_batched_tokens", "num_kv_blocks",
                "block_size", "kv_cache_fraction", "max_new_tokens"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.replicas is not None:
        options["replica_num"] = args.replicas
    if args.tensor_parallel is not None:
        options["tensor_parallel"] = args.tensor_parallel
    if args.pipeline_parallel is not None:
        options["pipeline_parallel"] = args.pipeline_parallel
    if args.rest or args.rest_port is not None:
        options["enable_restful_api"] = True
    if args.rest_port is not None:
        options["restful_api_port"] = args.rest_port
    try:
        c = deployments.serve(model, deployment_name=args.name or name, host=args.host,
                              startup_timeout=args.startup_timeout, **options)
    except deployments.DeploymentError as err:
        raise ValueError(str(err)) from None
    print(f"deployment: {c.deployment_name}")
    print(f"address:    {c.address}")
    if c.rest_url:
        print(f"rest:       {c.rest_url}")
    print(f"stop with:  kubellm stop {c.deployment_name}")
    c.close()
    return 0


def cmd_status(args) -> int:
    from kubellm.runtime.local import deployments

    entries = deployments.list_deployments()
    if args.json:
        print(json.dumps(entries))
        return 0
    if not entries:
        print("no local deployments")
        return 0
    rows = [("NAME", "MODEL", "REPLICAS", "ADDRESS", "REST", "STATE")]
    for e in entries:
        rows.append((e["name"], str(e.get("model", "")), str(e.get("replicas", "")), str(e.get("address", "")),
                     str(e.get("rest_url") or "-"), "alive" if e["alive"] else e["state"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_stop(args) -> int:
    from kubellm.runtime.local import deployments

    try:
        for name in args.names:
            deployments.stop(name)
            print(f"stopped {name}")
    except deployments.DeploymentError as err:
        raise ValueError(str(err)) from None
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
    bench.add_argument("kind", choices=["offline", "serve", "parallel", "kernels"],
                       help="offline: engine vs HF generate; serve: streaming load on --target (vs --direct); "
                            "parallel: one process vs a tensor x pipeline group; "
                            "kernels: Triton kernels vs PyTorch SDPA / references (GPU)")
    bench.add_argument("--target", default="127.0.0.1:50051", help="serve: gRPC address of a router or worker")
    bench.add_argument("--direct", default=None, help="serve: a worker address to compare with (router overhead)")
    bench.add_argument("--concurrency", default="1,16,64", help="serve: comma-separated stream counts")
    bench.add_argument("--requests-per-stream", type=int, default=4)
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
    bench.add_argument("--tensor-parallel", type=int, default=1, help="parallel: tensor ranks of the group")
    bench.add_argument("--pipeline-parallel", type=int, default=2, help="parallel: pipeline stages of the group")
    bench.add_argument("--random-model", choices=["llama3-8b", "llama3-tiny"], default=None,
                       help="offline: that shape with random bf16 weights instead of --model (nothing downloaded), "
                            "plus batch-1 decode tokens/s against the memory-bandwidth roofline")
    bench.add_argument("--enforce-eager", action="store_true", help="offline: no CUDA graphs for decode steps")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    operator = sub.add_parser("operator", help="run the Kubernetes operator (the operator container's entrypoint)")
    operator.add_argument("--namespace", default=None, help="watch these namespaces only, comma-separated (default: the whole cluster)")
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
    router.add_argument("--wait-for-replica", type=float, default=30.0,
                        help="seconds a request waits for a healthy replica while none is (a group restarting, "
                             "a rolling update) before UNAVAILABLE")
    router.set_defaults(func=cmd_router)
    serve = sub.add_parser("serve", help="start a persistent local deployment (workers + router in the background)")
    serve.add_argument("model", nargs="?", help="local Hugging Face directory or a known name")
    serve.add_argument("-f", "--file", help="an LLMDeployment YAML (the Kubernetes manifest) to run locally")
    serve.add_argument("--name", help="deployment name (default: metadata.name or the model's basename)")
    serve.add_argument("--replicas", type=int, default=None, help="worker processes (default 1)")
    serve.add_argument("--tensor-parallel", type=int, default=None)
    serve.add_argument("--pipeline-parallel", type=int, default=None)
    serve.add_argument("--rest", action="store_true", help="serve the REST API (/mii/NAME, /v1/...)")
    serve.add_argument("--rest-port", type=int, default=None, help="REST port (default 28080; implies --rest)")
    serve.add_argument("--host", default="127.0.0.1", help="router listen address (workers stay on loopback)")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--max-batch-size", type=int, default=None)
    serve.add_argument("--max-num-batched-tokens", type=int, default=None)
    serve.add_argument("--session-len", type=int, default=None)
    serve.add_argument("--num-kv-blocks", type=int, default=None)
    serve.add_argument("--block-size", type=int, default=None)
    serve.add_argument("--kv-cache-fraction", type=float, default=None)
    serve.add_argument("--max-new-tokens", type=int, default=None, help="default for requests that do not set it")
    serve.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for SERVING")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="list local deployments and whether their processes run")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    stop = sub.add_parser("stop", help="stop local deployments and forget them")
    stop.add_argument("names", nargs="+")
    stop.set_defaults(func=cmd_stop)
    return parser


def _exit_on_sigterm() -> None:
    """A container's entrypoint is PID 1, for which the kernel ignores SIGTERM unless the process
    handles it: without a handler, a pod deleted while its worker still imports torch or loads
    weights waits out the whole grace period. Commands that drain (worker, router) replace this
    handler with their own once they serve."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, NotImplementedError) as err:  # bad configuration or request: a message, not a traceback
        print(f"kubellm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `kubellm` command: its parser, and a table of what each command runs.

The parser imports the standard library only, so `kubellm --help` is instant; a command's module is
imported when that command runs (COMMANDS): `kubellm router` loads no torch, only the commands that
run an engine (worker, generate, bench offline / parallel) load it, only `kubellm operator` loads kopf.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Callable

from kubellm import __version__

# What each command runs, as "module:function(args) -> exit status", imported when it runs. The one
# place where the command line names the operator and the benchmarks: by name, not by import, so that
# the runtime imports neither (pyproject.toml's import contracts).
COMMANDS = {
    "generate": "kubellm.runtime.cli.generate:generate",
    "models": "kubellm.runtime.cli.models:models",
    "bench offline": "kubellm.bench.offline:command",
    "bench serve": "kubellm.bench.serve:command",
    "bench parallel": "kubellm.bench.parallel:command",
    "bench kernels": "kubellm.bench.kernels:command",
    "bench fuzz": "kubellm.bench.fuzz:command",
    "bench gpu": "kubellm.bench.gpu:command",
    "operator": "kubellm.operator.cli:command",
    "worker": "kubellm.runtime.cli.worker:worker",
    "router": "kubellm.runtime.cli.router:router",
    "serve": "kubellm.runtime.cli.local:serve",
    "status": "kubellm.runtime.cli.local:status",
    "stop": "kubellm.runtime.cli.local:stop",
}


COMPILE_HELP = ("CPU: decode steps through torch.compile, about 2.4x faster; the first start compiles for a few "
                "minutes, later ones read the cache (docs/cpu-compile.md)")


def command(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function that runs the parsed command (its module imported now)."""
    name = f"{args.command} {args.kind}" if args.command == "bench" else args.command
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
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
        p.add_argument("--compile", action="store_true", default=None, help=COMPILE_HELP)

    def model_flags(p) -> None:
        """Engine options past the basics (`kubellm worker`, `kubellm serve`); unset: the --config file's, else
        EngineConfig's defaults. The operator passes spec.engine's through the config file instead."""
        p.add_argument("--model-impl", default=None, choices=["auto", "kubellm", "transformers"],
                       help="auto (default): kubellm's model file where the architecture has one, else transformers' "
                            "modeling code; kubellm / transformers: only that one (vLLM's --model-impl)")
        p.add_argument("--eviction", default=None, choices=["recompute", "copy"],
                       help="what preemption does with a sequence's KV blocks: recompute (default) or copy them to "
                            "--num-cpu-blocks of host memory and back (LMDeploy's eviction_type)")
        p.add_argument("--num-cpu-blocks", type=count, default=None, metavar="N",
                       help="KV blocks of host memory for --eviction copy (default 0)")
        p.add_argument("--rope-scaling-factor", type=float, default=None, metavar="F",
                       help="dynamic NTK rotary scaling (>= 1), so --session-len may pass max_position_embeddings")
        p.add_argument("--use-logn-attn", action="store_true", default=None,
                       help="Qwen's log-n attention scaling past the trained length")
        p.add_argument("--lora", action="append", default=None, metavar="NAME=SOURCE",
                       help="serve a LoRA adapter beside the model (repeatable); a request picks it by NAME (gRPC "
                            "adapter, OpenAI model). SOURCE: a directory with adapter_config.json and "
                            "adapter_model.safetensors (or .bin), or hf://org/name[@revision], downloaded into the "
                            "cache as the model is")
        p.add_argument("--max-lora-rank", type=count, default=None, metavar="R",
                       help="largest rank an adapter may have (default 64; vLLM's --max-lora-rank)")
        p.add_argument("--quantization", default=None, choices=["int8", "float", "awq", "gptq", "gguf"],
                       help="weights: unset, as the checkpoint stores them (float, AWQ, GPTQ, GGUF); int8: weight-only "
                            "int8 made on load; float: de-quantize on load (docs/quantization.md)")
        p.add_argument("--compile", action="store_true", default=None, help=COMPILE_HELP)
        p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8", "int4"],
                       help="auto: the KV cache holds the model's dtype; int8: int8 with a scale per token and head "
                            "(about 2x the bf16 blocks; LMDeploy's quant_policy=8); int4: 4 bits with a scale and "
                            "zero per token and head (about 3x; quant_policy=4)")

    def drain_flag(p, what: str) -> None:
        """--drain-timeout (the operator passes spec.drain.timeoutSeconds)."""
        p.add_argument("--drain-timeout", type=seconds, default=30.0, metavar="S",
                       help=f"on SIGTERM: stop taking new requests (UNAVAILABLE) and let {what} finish, up to S "
                            "seconds, then exit (default 30)")

    def tls_flags(p, what: str) -> None:
        """--tls-cert / --tls-key (`kubellm router`, `kubellm serve`): a PEM certificate chain and its key."""
        p.add_argument("--tls-cert", default=None, metavar="FILE",
                       help=f"PEM certificate chain (e.g. tls.crt of a kubernetes.io/tls Secret): {what}")
        p.add_argument("--tls-key", default=None, metavar="FILE", help="the private key of --tls-cert (tls.key)")

    def limits_flags(p, defaults: bool = True):
        """What one request and one caller may cost the router (serving/limits.py; the operator passes spec.limits)."""
        p.add_argument("--max-request-bytes", type=count, default=1 << 20 if defaults else None, metavar="N",
                       help="largest request: a REST body past it is 413, a gRPC message RESOURCE_EXHAUSTED "
                            "(default 1048576, 1 MiB)")
        p.add_argument("--max-streams-per-connection", type=count, default=100 if defaults else None, metavar="N",
                       help="concurrent gRPC calls on one HTTP/2 connection; a client's next call waits for one to "
                            "end (default 100; REST's HTTP/1.1 takes one request at a time per connection)")
        p.add_argument("--rate-limit", type=float, default=None, metavar="R",
                       help="requests per second per API key (without keys: per client address) that generate, REST "
                            "and gRPC together; past it 429 with Retry-After / RESOURCE_EXHAUSTED with retry-after "
                            "(default: no limit)")
        p.add_argument("--rate-limit-burst", type=count, default=None, metavar="B",
                       help="requests a caller may send at once after being idle: the bucket's size (default: "
                            "--rate-limit rounded up)")
        p.add_argument("--max-prompts-per-request", type=count, default=256 if defaults else None, metavar="N",
                       help="most prompts in one REST request, refused with 400 before they are read (default 256, "
                            "the workers' max_prompts_per_request)")

    def routing_flags(p, defaults: bool = True):
        """The router's policy flags (`kubellm router`, `kubellm serve`); the names of api/spec.py ROUTING_POLICIES."""
        p.add_argument("--policy", choices=["round_robin", "least_loaded", "prefix_affinity"],
                       default="round_robin" if defaults else None,
                       help="how each request picks a replica: round_robin (in turn, the default), least_loaded "
                            "(fewest requests in flight), prefix_affinity (consistent hashing with bounded load over "
                            "the prompt's leading text: a shared system prompt stays on the replica that caches it)")
        p.add_argument("--prefix-length", type=int, default=256 if defaults else None,
                       help="prefix_affinity: leading characters of the prompt hashed (token ids for token-id "
                            "prompts; default 256)")
        p.add_argument("--load-factor", type=float, default=1.25 if defaults else None,
                       help="prefix_affinity: a replica takes a request while its requests in flight stay below "
                            "ceil(F x the mean); >= 1, default 1.25")

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

    models = sub.add_parser("models", help="the local model cache")
    models.add_argument("action", choices=["pull", "list", "download"],
                        help="pull: convert a known model into the cache; download: fetch hf://org/name[@rev] "
                             "into --dest (the worker pods' init container)")
    models.add_argument("name", nargs="?", default="smollm2-135m")
    models.add_argument("--dest", help="download: target directory")
    models.add_argument("--force", action="store_true", help="convert again even if cached")
    models.add_argument("--adapter", action="store_true",
                        help="download: the repository is a LoRA adapter (adapter_config.json, adapter_model.*)")

    bench = sub.add_parser("bench", help="benchmarks, each against a baseline in the same run")
    bench.add_argument("kind", choices=["offline", "serve", "parallel", "kernels", "fuzz", "gpu"],
                       help="offline: engine vs HF generate; serve: streaming load on --target (vs --direct); "
                            "fuzz: --requests generated hostile requests (REST and gRPC) against a 2-replica tiny "
                            "deployment, checking nothing 5xx, dies, hangs or leaks; "
                            "parallel: one process vs a tensor x pipeline group; "
                            "kernels: Triton kernels vs PyTorch SDPA / references (GPU; --cpu: the CPU paths); "
                            "gpu: every GPU check in one call, written to --out-dir (docs/gpu/README.md)")
    bench.add_argument("--target", default=None,
                       help="serve: gRPC address of a router or worker (default 127.0.0.1:50051); fuzz: a running "
                            "local deployment's name (kubellm serve NAME --rest; default: start one)")
    bench.add_argument("--requests", type=count, default=10_000, help="fuzz: requests to send (default 10000)")
    bench.add_argument("--timeout", type=seconds, default=30.0,
                       help="fuzz: each request's deadline in seconds; past it the request counts as hung (default 30)")
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
    bench.add_argument("--cpu", action="store_true",
                       help="kernels: the CPU paths of a decode step (matmuls per weight format, attention) instead "
                            "of the Triton kernels")
    bench.add_argument("--enforce-eager", action="store_true", help="offline: no CUDA graphs for decode steps")
    bench.add_argument("--compile", action="store_true",
                       help="offline: CPU decode steps through torch.compile (EngineConfig.compile) on kubellm's side")
    bench.add_argument("--formats", default="auto",
                       help="offline: weight formats whose batch-1 decode is measured against the read-bandwidth "
                            "roofline, comma-separated from float32,int8,q4 (q4: the GGUF as stored); auto: all on "
                            "CPU, none on a GPU; none")
    bench.add_argument("--baseline", choices=["hf", "llama.cpp"], default="hf",
                       help="offline: hf (the workload against Hugging Face generate) or llama.cpp (llama-cpp-python "
                            "on the same GGUF file, batch 1 and --batch-size concurrent requests; the bench extra)")
    bench.add_argument("--workload", choices=["short", "shared-prefix"], default="short",
                       help="serve: short (six short prompts, --target vs --direct) or shared-prefix (long system "
                            "prompts shared by many requests: the routing policies side by side on 2 workers)")
    bench.add_argument("--workers", default=None,
                       help="serve shared-prefix: two running workers' gRPC addresses (default: start two of --model)")
    bench.add_argument("--worker-metrics", default=None,
                       help="serve shared-prefix: those workers' metrics host:port, for the prefix-cache hit rates")
    bench.add_argument("--policies", default=None, help="serve shared-prefix: comma-separated (default: all three)")
    bench.add_argument("--system-prompts", type=int, default=8, help="serve shared-prefix: distinct system prompts")
    bench.add_argument("--system-words", type=int, default=256, help="serve shared-prefix: words per system prompt")
    bench.add_argument("--user-words", type=int, default=12, help="serve shared-prefix: words per user turn")
    bench.add_argument("--num-kv-blocks", type=int, default=None,
                       help="serve shared-prefix: KV blocks per started worker (size it so one worker cannot hold "
                            "every system prompt but two can)")
    bench.add_argument("--block-size", type=int, default=None, help="serve shared-prefix: tokens per KV block")
    bench.add_argument("--device", default=None,
                       help="serve shared-prefix: the started workers' device; gpu: auto (default), cuda or cpu (tiny shapes)")
    bench.add_argument("--worker-threads", type=int, default=None,
                       help="serve shared-prefix: CPU threads per started worker (OMP_NUM_THREADS)")
    bench.add_argument("--prefix-length", type=int, default=256, help="serve shared-prefix: the routers' --prefix-length")
    bench.add_argument("--load-factor", type=float, default=1.25, help="serve shared-prefix: the routers' --load-factor")
    bench.add_argument("--out-dir", default=None, help="gpu: where <date>-<device>.json and .md go (default docs/gpu)")
    bench.add_argument("--steps", default=None, help="gpu: comma-separated steps to run (default: all)")
    bench.add_argument("--step-budget", action="append", default=None, metavar="NAME=S",
                       help="gpu: seconds one step may take (repeatable); past it the step is killed as timed out")
    bench.add_argument("--total-budget", type=seconds, default=None, metavar="S",
                       help="gpu: seconds for the whole check (default 480)")
    bench.add_argument("--json", action="store_true")
    operator = sub.add_parser("operator", help="run the Kubernetes operator (the operator container's entrypoint)")
    operator.add_argument("--namespace", default=None, help="watch these namespaces only, comma-separated (default: the whole cluster)")
    operator.add_argument("--verbose", action="store_true")
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
    worker.add_argument("--http-port", type=int, default=None,
                        help="also serve OpenAI HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                             "/metrics) on this port: a Gateway's inference extension sends traffic straight here")
    worker.add_argument("--replica", default=None, help="name reported in every response (default: hostname:port)")
    worker.add_argument("--served-model-name", default=None,
                        help="the name the model is served as: the vllm:* metrics' model_name label "
                             "(default: --model; the operator passes the LLMDeployment's name)")
    worker.add_argument("--allow-terminate", action="store_true", help="honour the Terminate RPC (local deployments)")
    worker.add_argument("--generation-defaults", help="JSON file of GenerationConfig defaults for every request")
    model_flags(worker)
    drain_flag(worker, "the requests it is running")
    tool_call_parser_flag(worker)
    router = sub.add_parser("router", help="gRPC router over replica leaders (--policy), with optional REST "
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
                             "a rolling update, a deployment scaled to zero) before UNAVAILABLE with a retry-after")
    router.add_argument("--scale-from-zero", action="store_true",
                        help="the deployment may be scaled to 0 replicas: readiness stays SERVING with no healthy "
                             "replica (the router holds requests while the first group starts, and counts them in "
                             "kubellm_router_requests_waiting); ModelInfo and /v1/models answer from the router")
    router.add_argument("--max-waiting", type=count, default=1024, metavar="N",
                        help="at most N requests held at once waiting for a healthy replica; past it a new one "
                             "fails at once with UNAVAILABLE (default 1024; 0 holds none)")
    router.add_argument("--model-name", default="", metavar="NAME",
                        help="the model the deployment serves (e.g. its spec.model.source): what ModelInfo and "
                             "/v1/models name before any replica has answered (default: --deployment-name)")
    router.add_argument("--api-keys-dir", default=None, metavar="DIR",
                        help="require an API key (REST 'Authorization: Bearer KEY', gRPC 'authorization' metadata) "
                             "from the files in DIR (a mounted Secret: one key or several per file, one a line; "
                             "re-read when it changes); $KUBELLM_API_KEY (comma-separated) adds keys. Keys are never "
                             "flags: ps shows flags")
    tls_flags(router, "the gRPC port serves TLS and the REST port HTTPS (the metrics port, with /readyz and "
                      "/livez, stays plain HTTP)")
    limits_flags(router)
    routing_flags(router)
    tool_call_parser_flag(router)
    drain_flag(router, "the calls it is forwarding")
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
    model_flags(serve)
    serve.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for SERVING")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require this API key on the router (REST and gRPC); default $KUBELLM_API_KEY, which "
                            "is better: a flag shows in ps while this command runs. The router gets it through "
                            "its environment, and the registry records only that a key is needed")
    tls_flags(serve, "the router serves TLS (gRPC) and HTTPS (REST); kubellm.client(NAME) trusts this certificate")
    limits_flags(serve, defaults=False)   # unset: the manifest's spec.limits (-f), else the router's defaults
    routing_flags(serve, defaults=False)   # unset: the manifest's spec.router (-f), else the router's defaults
    status = sub.add_parser("status", help="list local deployments and whether their processes run")
    status.add_argument("--json", action="store_true")
    stop = sub.add_parser("stop", help="stop local deployments and forget them")
    stop.add_argument("names", nargs="+")
    return parser


def tool_call_parser_flag(parser) -> None:
    parser.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json", "mistral", "auto"),
                        help="the format of the model's tool calls in its replies, parsed into OpenAI's tool_calls "
                             "(vLLM's names; default: the chat template's on a worker, auto by their markers on a "
                             "router)")


def seconds(value: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: give 0 or more seconds (e.g. 30)")
    return number


def count(value: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: give 0 or more (e.g. 1024)")
    return number


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
        return command(args)(args)
    except (ValueError, NotImplementedError) as err:  # bad configuration or request: a message, not a traceback
        print(f"kubellm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

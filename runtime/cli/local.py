"""`kubellm serve | status | stop`: persistent local deployments (`serve -f`: the LLMDeployment manifest)."""

from __future__ import annotations

import json
import os

import yaml

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.runtime.hub.adapters import parse_lora_flags
from kubellm.runtime.local import deployments
from kubellm.runtime.serving.client import API_KEY_ENV


def deployment_from_yaml(path: str) -> tuple[str, str, dict]:
    """An LLMDeployment manifest (the Kubernetes one) -> (name, model, serve() keyword options)."""
    name, spec = read_manifest(path)
    return name, spec.model.source, serve_options(spec)


def serve_options(spec: LLMDeploymentSpec) -> dict:
    """A spec -> serve() keyword options."""
    settings = spec.runtime_settings()
    adapters = {"adapters": {a.name: a.source for a in spec.adapters}} if spec.adapters else {}
    return {**settings.engine, **settings.generation, **adapters, "replica_num": max(spec.replicas, 1),
            "enable_restful_api": spec.restApi.enabled, "restful_api_port": spec.restApi.port,
            "policy": spec.router.policy, "prefix_length": spec.router.prefixLength,
            "load_factor": spec.router.loadFactor, **limit_options(spec)}


def limit_options(spec: LLMDeploymentSpec) -> dict:
    """spec.limits' router limits as serve() options (its worker limits are in runtime_settings' engine)."""
    limits = spec.limits
    rate = limits.rateLimit
    return {"max_request_bytes": limits.maxRequestBytes,
            "max_streams_per_connection": limits.maxConcurrentStreamsPerConnection,
            **({"rate_limit": rate.requestsPerSecond, "rate_limit_burst": rate.burst_or_default} if rate else {})}


def read_manifest(path: str) -> tuple[str | None, LLMDeploymentSpec]:
    """An LLMDeployment manifest -> (metadata.name, its spec), checked for a local run; errors name the file."""
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
    for i, adapter in enumerate(spec.adapters):   # hf:// adapters are downloaded by the workers; claims are not here
        if adapter.kind == "pvc":
            raise ValueError(f"{path}: spec.adapters[{i}].source {adapter.source!r} is a PersistentVolumeClaim, "
                             "which local deployments cannot mount; give the adapter's directory or hf://org/name")
    return name, spec


def check_locks(path: str, spec: LLMDeploymentSpec, api_key: str | None, tls_cert: str | None) -> None:
    """A manifest's API-key and TLS Secrets are Kubernetes objects a local run cannot read: it needs their
    local stand-ins (--api-key or $KUBELLM_API_KEY; --tls-cert and --tls-key), else an error rather than
    an open door the manifest asked to lock."""
    secret = getattr(spec.restApi, "apiKeySecret", None)
    if secret and not (api_key or os.environ.get(API_KEY_ENV, "").strip()):
        raise ValueError(f"{path}: spec.restApi.apiKeySecret ({secret}) is a Kubernetes Secret, which a local "
                         f"deployment cannot read: give --api-key KEY or set {API_KEY_ENV} (or remove the field "
                         "to run without keys)")
    secret = getattr(spec.router, "tlsSecretName", None)
    if secret and not tls_cert:
        raise ValueError(f"{path}: spec.router.tlsSecretName ({secret}) is a Kubernetes Secret, which a local "
                         "deployment cannot read: give --tls-cert FILE --tls-key FILE (its tls.crt and tls.key), "
                         "or remove the field to run without TLS")


def serve(args) -> int:
    """Start a persistent local deployment (workers + router in the background) and return."""
    name, model, options = None, args.model, {}
    if args.file:
        name, spec = read_manifest(args.file)
        check_locks(args.file, spec, args.api_key, args.tls_cert)
        model, options = spec.model.source, serve_options(spec)
        if args.model:
            raise ValueError("give either MODEL or -f FILE, not both")
    elif not model:
        raise ValueError("serve: give a MODEL (a local directory or known name) or -f deployment.yaml")
    for key in ("dtype", "device", "max_batch_size", "session_len", "max_num_batched_tokens", "num_kv_blocks",
                "block_size", "kv_cache_fraction", "max_new_tokens", "policy", "prefix_length", "load_factor",
                "max_request_bytes", "max_streams_per_connection", "rate_limit", "rate_limit_burst",
                "max_prompts_per_request", "model_impl", "eviction", "num_cpu_blocks", "rope_scaling_factor",
                "use_logn_attn", "max_lora_rank", "quantization",
                 "kv_cache_dtype", "compile"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.lora:   # --lora NAME=SOURCE: added to (and over) the manifest's spec.adapters
        options["adapters"] = {**options.get("adapters", {}), **parse_lora_flags(args.lora)}
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
    # --api-key, else $KUBELLM_API_KEY (serve() reads it); TLS files by path.
    options.update(api_key=args.api_key, tls_cert=args.tls_cert, tls_key=args.tls_key)
    try:
        c = deployments.serve(model, deployment_name=args.name or name, host=args.host,
                              startup_timeout=args.startup_timeout, **options)
    except deployments.DeploymentError as err:
        raise ValueError(str(err)) from None
    print(f"deployment: {c.deployment_name}")
    print(f"address:    {c.address}")
    if c.rest_url:
        print(f"rest:       {c.rest_url}")
    if c.entry.get("tls"):
        print(f"tls:        on (certificate {c.entry['ca_file']})")
    if c.entry.get("api_key_required"):
        print("api key:    required (kubellm.client(NAME, api_key=...) or KUBELLM_API_KEY)")
    print(f"stop with:  kubellm stop {c.deployment_name}")
    c.close()
    return 0


def status(args) -> int:
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


def stop(args) -> int:
    try:
        for name in args.names:
            deployments.stop(name)
            print(f"stopped {name}")
    except deployments.DeploymentError as err:
        raise ValueError(str(err)) from None
    return 0

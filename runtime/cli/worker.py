"""`kubellm worker`: one engine behind the gRPC API (a replica's rank 0), or a follower rank of a group."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal

from kubellm.runtime.config import EngineConfig, generation_config
from kubellm.runtime.engine.engine import session_len_for
from kubellm.runtime.executor.loader import load_hf_config
from kubellm.runtime.executor.rank_group import RankGroup, master_address, ranks_on_this_host, start_remote_rank
from kubellm.runtime.hub.adapters import check_local_adapters, parse_lora_flags, resolve_adapters
from kubellm.runtime.hub.embedded import resolve_model
from kubellm.runtime.serving.follower import serve_follower
from kubellm.runtime.serving.worker import TerminatedWhileLoading, serve_worker


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
    options = _json_object(args.config, "--config", "EngineConfig") if args.config else {}
    for name in ("tensor_parallel", "pipeline_parallel", "dtype", "device", "max_batch_size", "session_len",
                 "model_impl", "eviction", "num_cpu_blocks", "rope_scaling_factor", "use_logn_attn", "max_lora_rank", "quantization",
                 "kv_cache_dtype", "compile"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    engine_config = EngineConfig.build(**options)
    defaults = None
    if args.generation_defaults:
        defaults = generation_config(_json_object(args.generation_defaults, "--generation-defaults",
                                                  "GenerationConfig")).model_dump(exclude_unset=True)
    return engine_config, defaults


def worker_adapters(args) -> dict[str, str]:
    """`--lora NAME=SOURCE` flags -> {name: source}, checked now where no download is needed (a bad directory fails
    before the model loads). No adapter may take the name the base model is served under: a request naming it
    would be ambiguous."""
    adapters = parse_lora_flags(getattr(args, "lora", None))
    served = args.served_model_name or str(args.model)
    if served in adapters:
        raise ValueError(f"--lora: adapter {served!r} has the name the base model is served under "
                         f"({'--served-model-name' if args.served_model_name else '--model'}); rename the adapter")
    check_local_adapters(adapters)
    return adapters


def _join_other_hosts(model, ranks: list[int], engine_config):
    """Rank 0 of a group spanning hosts: start this host's other ranks, then wait for every rank."""
    path = resolve_model(model)
    session_len = session_len_for(load_hf_config(path), engine_config)
    addr, port = master_address()
    local = [start_remote_rank(r, addr, port, path, engine_config, session_len) for r in ranks[1:]]
    return RankGroup.accept(engine_config, addr, port, local_procs=local)


def worker(args) -> int:
    """One engine behind the gRPC API (rank 0 of a replica); runs until terminated or signalled."""
    engine_config, defaults = worker_configs(args)
    adapters = worker_adapters(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A group spread over pods (or torchrun processes): rank 0 serves gRPC, the others follow it.
    ranks = ranks_on_this_host(engine_config.world_size)
    if ranks is not None and ranks[0] != 0:
        # Each rank loads its shard of every adapter: a follower needs their directories too.
        engine_config = engine_config.updated(adapters={**engine_config.adapters, **resolve_adapters(adapters)})
        serve_follower(args.model, engine_config, ranks, port=args.port, host=args.host)
        return 0
    rank_group = None if ranks is None else functools.partial(_join_other_hosts, args.model, ranks)
    try:
        asyncio.run(serve_worker(args.model, engine_config, port=args.port, host=args.host, replica=args.replica,
                                 allow_terminate=args.allow_terminate, generation_defaults=defaults,
                                 metrics_port=args.metrics_port, show_progress=True, rank_group=rank_group,
                                 served_model_name=args.served_model_name, http_port=args.http_port,
                                 drain_timeout=args.drain_timeout, adapter_sources=adapters,
                                 tool_call_parser=args.tool_call_parser))
    except KeyboardInterrupt:
        pass
    except TerminatedWhileLoading as stopped:
        logging.getLogger("kubellm.worker").info("%s", stopped)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)  # without waiting for the loading thread
    return 0

"""A follower pod: the ranks of a multi-host group other than rank 0, run under rank 0's direction."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kubellm.runtime.config import EngineConfig

log = logging.getLogger("kubellm.worker")


def serve_follower(model, engine_config: EngineConfig, ranks: list[int], port: int, host: str = "0.0.0.0") -> None:
    """A pod of a multi-host group that does not hold rank 0: run `ranks` (the first in this process,
    the rest as children) under rank 0's direction. Answers gRPC health (SERVING once this rank's
    shard is loaded) so the pod's probes work; exits when rank 0 goes away or the group breaks.

    SIGTERM (the group's pods deleted: a rolling update, a scale-down) while following is logged and
    otherwise ignored: rank 0 drains its requests first, which needs every rank, and this pod exits when rank
    0 goes away. The grace period (spec.drain) bounds the wait. Before the shard is loaded it exits at once."""
    from grpc_health.v1 import health

    from kubellm.runtime.executor.rank_group import master_address, serve_remote_rank, start_remote_rank
    from kubellm.runtime.engine.engine import session_len_for
    from kubellm.runtime.executor.loader import check_model_dir, load_hf_config
    from kubellm.runtime.hub.embedded import resolve_model

    path = check_model_dir(resolve_model(model))
    session_len = session_len_for(load_hf_config(path), engine_config)
    addr, master_port = master_address()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    port += int(os.environ.get("LOCAL_RANK", 0))  # torchrun: several followers on one host
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"port: cannot listen on {host}:{port}; pick a free port")
    server.start()
    for rank in ranks[1:]:
        start_remote_rank(rank, addr, master_port, path, engine_config, session_len)
    log.info("ranks %s following rank 0 at %s:%d; loading %s", ranks, addr, master_port, path)
    started = time.monotonic()

    following = False

    def on_sigterm(signum, _frame):
        if not following:
            sys.exit(128 + signum)
        log.info("ranks %s: SIGTERM; following rank 0 while it drains its requests, until it stops", ranks)
        checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    signal.signal(signal.SIGTERM, on_sigterm)

    def on_ready():
        nonlocal following
        log.info("ranks %s: shard of %s loaded in %.1f s; health SERVING on port %d", ranks, path,
                 time.monotonic() - started, port)
        following = True
        checker.set("", health_pb2.HealthCheckResponse.SERVING)

    serve_remote_rank(ranks[0], addr, master_port, path, engine_config, session_len, on_ready=on_ready,
                      show_progress=True)

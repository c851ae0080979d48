"""`kubellm router`: the router pod's entry point (no torch: the router image has none)."""

from __future__ import annotations

import asyncio
import logging

from kubellm.runtime.serving.auth import ApiKeys
from kubellm.runtime.serving.limits import Limits
from kubellm.runtime.serving.router import serve
from kubellm.runtime.serving.tls import ServerTls


def router(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Both checked before anything listens: a wrong path or a key that does not match its certificate is a
    # message naming the flag, not a crash at the first handshake.
    api_keys = ApiKeys.from_sources(args.api_keys_dir)   # + $KUBELLM_API_KEY; None: no key asked for
    tls = ServerTls.load(args.tls_cert, args.tls_key)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_streams_per_connection=args.max_streams_per_connection,
                    rate_limit=args.rate_limit, rate_limit_burst=args.rate_limit_burst,
                    max_prompts_per_request=args.max_prompts_per_request)
    asyncio.run(serve(args.leaders, port=args.port, host=args.host, deployment_name=args.deployment_name,
                      rest_port=args.rest_port, metrics_port=args.metrics_port,
                      allow_terminate=args.allow_terminate, health_interval=args.health_interval,
                      resolve_interval=args.resolve_interval, wait_for_replica=args.wait_for_replica,
                      policy=args.policy, prefix_length=args.prefix_length, load_factor=args.load_factor,
                      drain_timeout=args.drain_timeout, scale_from_zero=args.scale_from_zero,
                      max_waiting=args.max_waiting, model_name=args.model_name, api_keys=api_keys, tls=tls,
                      limits=limits, tool_call_parser=args.tool_call_parser))
    return 0

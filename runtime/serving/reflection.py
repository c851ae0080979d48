"""gRPC server reflection for the worker and the router (no torch), so that `grpcurl list` / `describe`
and clients in any language find kubellm.v1.LLM without the .proto.

The services are described from the descriptors compiled into llm_pb2 and health_pb2, never from what a
server registered: the router forwards raw bytes through generic handlers, so it answers reflection
itself from the same descriptors. grpcio-reflection is an extra (`kubellm[runtime]`, `kubellm[router]`);
a server without it still starts, with one warning.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.unparsed import add_reflection_servicer

log = logging.getLogger("kubellm.reflection")

LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name            # kubellm.v1.LLM
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name   # grpc.health.v1.Health
_warned = False


def add_reflection(server: grpc.aio.Server) -> bool:
    """Serve reflection of kubellm.v1.LLM, grpc.health.v1.Health and itself on `server`; False (and a
    warning, once per process) where grpcio-reflection is not installed."""
    global _warned
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        if not _warned:
            _warned = True
            log.warning("grpcio-reflection is not installed: serving without gRPC reflection (grpcurl needs "
                        "-proto kubellm/v1/llm.proto); pip install 'grpcio-reflection>=1.85'")
        return False
    from grpc_reflection.v1alpha import reflection_pb2

    # Every service named here lives in the default pool, where llm_pb2 and health_pb2 registered their files.
    # Registered as enable_server_reflection does, but a request that does not parse is INVALID_ARGUMENT.
    servicer = reflection.aio.ReflectionServicer((LLM_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME))
    add_reflection_servicer(servicer, server, reflection_pb2)
    return True

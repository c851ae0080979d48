"""Requests that do not parse, on the router's own gRPC methods (no torch): INVALID_ARGUMENT saying so, where
grpcio would end the call UNKNOWN ("Unexpected DecodeError"): bad UTF-8 in a string field, a corrupt wire format.

    handler = grpc.unary_unary_rpc_method_handler(refusing_unparsed(method), request_deserializer=parser(Msg))
    add_health_servicer(health_servicer, server)    # grpc.health.v1, as health_pb2_grpc registers it
    add_reflection_servicer(reflection_servicer, server, reflection_pb2)   # grpc.reflection.v1alpha

The LLM methods the router forwards are not parsed here at all (raw bytes); the worker refuses what does not
parse (serving/service.py, the same rule).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2


@dataclass
class Unparsed:
    """What a request that did not parse becomes: the handler ends its call INVALID_ARGUMENT with `message`."""

    message: str


def parser(message_type):
    """A request deserializer that answers Unparsed instead of raising."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as err:   # protobuf checks proto3 strings are UTF-8 (surrogates included)
            return Unparsed(f"the request is not a valid {message_type.DESCRIPTOR.full_name} ({err}); "
                            "send a protobuf message of that type, with UTF-8 strings")
    return parse


def refusing_unparsed(method):
    """`method(request, context)` (a coroutine), ending the call INVALID_ARGUMENT first if the request did not parse."""
    @functools.wraps(method)
    async def checked(request, context):
        if isinstance(request, Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)
    return checked


def add_health_servicer(servicer, server) -> None:
    """Serve grpc.health.v1.Health (an aio HealthServicer) on `server`, a request that does not parse refused."""
    request = parser(health_pb2.HealthCheckRequest)
    reply = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(refusing_unparsed(servicer.Check), request_deserializer=request,
                                                     response_serializer=reply),
        # Watch writes its replies through context.write: a coroutine handler, not a generator.
        "Watch": grpc.unary_stream_rpc_method_handler(refusing_unparsed(servicer.Watch), request_deserializer=request,
                                                      response_serializer=reply),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers),))
    server.add_registered_method_handlers("grpc.health.v1.Health", handlers)


def add_reflection_servicer(servicer, server, reflection_pb2) -> None:
    """Serve grpc-reflection's aio ReflectionServicer on `server` (its ServerReflectionInfo stream), a request
    that does not parse ending the call INVALID_ARGUMENT. `reflection_pb2`: grpc_reflection's generated module
    (grpcio-reflection is an extra: imported by the caller)."""
    service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name

    async def info(request_iterator, context):
        async def checked():
            async for request in request_iterator:
                if isinstance(request, Unparsed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield request
        async for reply in servicer.ServerReflectionInfo(checked(), context):
            yield reply

    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        info, request_deserializer=parser(reflection_pb2.ServerReflectionRequest),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)

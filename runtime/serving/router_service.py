"""The router's gRPC face: the LLM service answered by forwarding to the replicas (no torch).

Generate, GenerateStream and ModelInfo requests and replies stay serialized bytes end to end: the methods
are registered with identity (de)serializers, so the hot path never parses a protobuf. The caller's
metadata (less the transport's own keys and the caller's `authorization`) and deadline go along.

With a rate limit (the router's `limits.rate_limit`), each Generate and GenerateStream call takes a token of
its caller's bucket (the API key's id where auth is on, else the peer's address), shared with the REST
gateway's requests; past it, RESOURCE_EXHAUSTED with `retry-after` (whole seconds) as trailing metadata.
"""

from __future__ import annotations

import math

import grpc

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.auth import current_key_id
from kubellm.runtime.serving.limits import caller_key, rate_limited_message
from kubellm.runtime.serving.replicas import SERVICE_NAME
from kubellm.runtime.serving.unparsed import parser, refusing_unparsed
from kubellm.runtime.serving.upstream import UpstreamError

# Metadata keys that belong to the transport, not to the caller; and the caller's API key, which is the
# router's to check and never leaves it (a replica neither needs nor logs it).
_HOP_BY_HOP = {"user-agent", "content-type", "te", "host", "authority", "accept-encoding", "authorization"}


def _forwardable(metadata) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((m.key, m.value) for m in (metadata or ())
                 if not m.key.startswith((":", "grpc-")) and m.key not in _HOP_BY_HOP)


def _fail(context, err: UpstreamError) -> None:
    """End the call with `err`'s code and message (its retry-after, seconds, as trailing metadata) once the handler
    returns. Not context.abort: the exception it raises stays on the call's state, in a reference cycle with the
    handler's frames (and the request's bytes in them) that only a full collection frees, so that under a flood of
    refused megabyte requests the router's memory grew by tens of MB (found by `kubellm bench fuzz`)."""
    if err.retry_after is not None:
        context.set_trailing_metadata((("retry-after", str(math.ceil(err.retry_after))),))
    context.set_code(err.code)
    context.set_details(err.details)


class RouterServicer:
    """The LLM service, answered by forwarding to the replicas: requests and replies of Generate,
    GenerateStream and ModelInfo stay serialized bytes end to end (identity (de)serializers)."""

    def __init__(self, router):   # a serving.router.Router
        self.router = router

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Generate": grpc.unary_unary_rpc_method_handler(self.Generate),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(self.GenerateStream),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(self.ModelInfo),
            "Terminate": grpc.unary_unary_rpc_method_handler(
                refusing_unparsed(self.Terminate), request_deserializer=parser(llm_pb2.TerminateRequest),
                response_serializer=llm_pb2.TerminateResponse.SerializeToString),
        }

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = self.method_handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def _rate_limited(self, context) -> UpstreamError | None:
        """The error of a call past its caller's rate limit, else None (the call took its token)."""
        limiter = self.router.rate_limiter
        if limiter is None:
            return None
        wait = limiter.wait_time(caller_key(current_key_id.get(), context.peer()))
        if wait is None:
            return None
        return UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, rate_limited_message(self.router.limits, wait),
                             retry_after=wait)

    async def _unary(self, method: str, request: bytes, context) -> bytes:
        if method == "Generate" and (err := self._rate_limited(context)):
            _fail(context, err)
            return b""   # not sent: the status is not OK
        try:
            return await self.router.forward_unary(method, request, _forwardable(context.invocation_metadata()),
                                                   context.time_remaining(), raw=True)
        except UpstreamError as err:
            _fail(context, err)
            return b""

    async def Generate(self, request: bytes, context) -> bytes:
        return await self._unary("Generate", request, context)

    async def ModelInfo(self, request: bytes, context) -> bytes:
        return await self._unary("ModelInfo", request, context)

    async def GenerateStream(self, request: bytes, context):
        if err := self._rate_limited(context):
            _fail(context, err)
            return
        stream = self.router.forward_stream(request, _forwardable(context.invocation_metadata()),
                                            context.time_remaining(), raw=True)
        try:
            async for message in stream:
                yield message
        except UpstreamError as err:
            _fail(context, err)
        finally:
            await stream.aclose()

    async def Terminate(self, request, context):
        try:
            return llm_pb2.TerminateResponse(accepted=await self.router.terminate())
        except UpstreamError as err:
            _fail(context, err)
            return llm_pb2.TerminateResponse()

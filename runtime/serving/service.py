"""The kubellm.v1.LLM servicer: each RPC is one of the worker's engine calls (engine_calls.py), whose
failures end the RPC with their status; Terminate stops the worker when it is allowed to.

`add_to_server` registers it as the generated `add_LLMServicer_to_server` does, except that a request which
does not parse (bad UTF-8 in a string field, a corrupt wire format: the router forwards bytes unparsed) ends
INVALID_ARGUMENT saying so, where grpcio would end it UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving.engine_calls import EngineCalls
from kubellm.runtime.serving.engine_loop import CallFailed
from kubellm.runtime.serving.unparsed import Unparsed
from kubellm.runtime.serving.unparsed import parser as _parser

log = logging.getLogger("kubellm.worker")


def _fail(context, err: CallFailed) -> None:
    """End the call with `err`'s status once the handler returns. Not context.abort: the exception it raises stays
    on the call's state in a reference cycle with the handler's frames, which hold the request and its prompts (a
    refused 5000-message chat is megabytes) until a full collection, rare in a process of torch's size; under a
    flood of such requests a worker grew by hundreds of MB (found by `kubellm bench fuzz`)."""
    context.set_code(err.code)
    context.set_details(err.message)


async def _refuse_unparsed(request, context) -> None:
    if isinstance(request, Unparsed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, worker):
        self.worker = worker   # the worker's state (serving.worker.Worker): its engine loop, defaults, metrics
        self.calls = EngineCalls(worker)

    async def Generate(self, request, context):
        await _refuse_unparsed(request, context)
        try:
            return await self.calls.generate(request)
        except CallFailed as err:
            _fail(context, err)
            return llm_pb2.GenerateResponse()   # not sent: the status is not OK

    async def GenerateStream(self, request, context):
        await _refuse_unparsed(request, context)
        stream = self.calls.generate_stream(request)
        try:
            async for message in stream:
                yield message
        except CallFailed as err:
            _fail(context, err)
        finally:
            await stream.aclose()

    async def ModelInfo(self, request, context):
        await _refuse_unparsed(request, context)
        try:
            return self.calls.model_info()
        except CallFailed as err:
            await context.abort(err.code, err.message)

    async def Terminate(self, request, context):
        await _refuse_unparsed(request, context)
        if not self.worker.allow_terminate:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Terminate is disabled on this worker; start it with allow_terminate=True "
                                "(kubellm worker --allow-terminate) or stop it through its deployment")
        log.info("Terminate accepted; shutting down")
        asyncio.get_running_loop().call_later(0.05, self.worker.terminated.set)
        return llm_pb2.TerminateResponse(accepted=True)


def add_to_server(service: LLMService, server) -> None:
    """Serve `service` as kubellm.v1.LLM on `server`, with requests that do not parse refused (see above)."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            service.Generate, request_deserializer=_parser(llm_pb2.GenerateRequest),
            response_serializer=llm_pb2.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            service.GenerateStream, request_deserializer=_parser(llm_pb2.GenerateRequest),
            response_serializer=llm_pb2.GenerateStreamResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            service.ModelInfo, request_deserializer=_parser(llm_pb2.ModelInfoRequest),
            response_serializer=llm_pb2.ModelInfoResponse.SerializeToString),
        "Terminate": grpc.unary_unary_rpc_method_handler(
            service.Terminate, request_deserializer=_parser(llm_pb2.TerminateRequest),
            response_serializer=llm_pb2.TerminateResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kubellm.v1.LLM", handlers),))
    server.add_registered_method_handlers("kubellm.v1.LLM", handlers)

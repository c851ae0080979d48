"""The kubellm.v1.LLM servicer: each RPC is one of the worker's engine calls (engine_calls.py), whose
failures end the RPC with their status; Terminate stops the worker when it is allowed to.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving.engine_calls import EngineCalls
from kubellm.runtime.serving.engine_loop import CallFailed

log = logging.getLogger("kubellm.worker")


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, worker):
        self.worker = worker   # the worker's state (serving.worker.Worker): its engine loop, defaults, metrics
        self.calls = EngineCalls(worker)

    async def Generate(self, request, context):  # noqa: N802 (gRPC naming)
        try:
            return await self.calls.generate(request)
        except CallFailed as err:
            await context.abort(err.code, err.message)

    async def GenerateStream(self, request, context):  # noqa: N802
        stream = self.calls.generate_stream(request)
        try:
            async for message in stream:
                yield message
        except CallFailed as err:
            await context.abort(err.code, err.message)
        finally:
            await stream.aclose()

    async def ModelInfo(self, request, context):  # noqa: N802
        try:
            return self.calls.model_info()
        except CallFailed as err:
            await context.abort(err.code, err.message)

    async def Terminate(self, request, context):  # noqa: N802
        if not self.worker.allow_terminate:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Terminate is disabled on this worker; start it with allow_terminate=True "
                                "(kubellm worker --allow-terminate) or stop it through its deployment")
        log.info("Terminate accepted; shutting down")
        asyncio.get_running_loop().call_later(0.05, self.worker.terminated.set)
        return llm_pb2.TerminateResponse(accepted=True)

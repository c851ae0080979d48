"""The kubellm.v1.LLM servicer: each RPC posts its work to the engine thread and awaits its events.

A handler that ends for any reason — finished, client gone, deadline expired, task cancelled —
aborts whatever of its requests is still in the engine, so their KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import traceback

import grpc

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving import protocol
from kubellm.runtime.serving.engine_loop import CallFailed, EngineLoop, ErrorEvent, EventSink, TokenEvent

log = logging.getLogger("kubellm.worker")


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, worker):
        self.worker = worker   # the worker's state (serving.worker.Worker): its engine loop, defaults, metrics

    # -- helpers ----------------------------------------------------------------------------------
    def _engine_loop(self) -> EngineLoop:
        w = self.worker
        if w.engine_loop is None:
            if w.load_error is not None:
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"the model failed to load: {w.load_error}")
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if w.engine_loop.error is not None or not w.engine_loop.is_alive():
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, w.engine_loop.unavailable_message())
        return w.engine_loop

    async def _submit(self, request, stream: bool):
        loop_ = self._engine_loop()
        prompts, gens = protocol.prompts_and_configs(request, self.worker.generation_defaults)
        sink = EventSink(asyncio.get_running_loop(), stream)
        rids = await asyncio.wrap_future(loop_.add(prompts, gens, sink))
        return loop_, sink, rids

    async def _fail(self, context, exc: BaseException):
        code, message = protocol.status_of(exc)
        self.worker.metrics.request_done(code.name)
        if code is grpc.StatusCode.INTERNAL:
            log.error("request failed:\n%s", "".join(traceback.format_exception(exc)))
        await context.abort(code, message)

    # -- RPCs -------------------------------------------------------------------------------------------
    async def Generate(self, request, context):  # noqa: N802 (gRPC naming)
        rids: list[str] = []
        engine_loop = None
        finished = False
        try:
            engine_loop, sink, rids = await self._submit(request, stream=False)
            results: dict[int, TokenEvent] = {}
            while len(results) < len(rids):
                event = await sink.queue.get()
                if isinstance(event, ErrorEvent):
                    raise CallFailed(event.code, event.message)
                results[event.index] = event
            finished = True
            self.worker.metrics.request_done("OK")
            return protocol.generate_response(self.worker.replica, [results[i] for i in range(len(rids))])
        except asyncio.CancelledError:
            self.worker.metrics.request_done("CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            await self._fail(context, exc)
        finally:
            if not finished and rids and engine_loop is not None:
                engine_loop.abort(rids)

    async def GenerateStream(self, request, context):  # noqa: N802
        rids: list[str] = []
        engine_loop = None
        finished = False
        try:
            engine_loop, sink, rids = await self._submit(request, stream=True)
            done = 0
            while done < len(rids):
                event = await sink.queue.get()
                if isinstance(event, ErrorEvent):
                    raise CallFailed(event.code, event.message)
                if event.finish_reason:
                    done += 1
                yield protocol.stream_response(self.worker.replica, event)
            finished = True
            self.worker.metrics.request_done("OK")
        except (asyncio.CancelledError, GeneratorExit):
            self.worker.metrics.request_done("CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, exc)
        finally:
            if not finished and rids and engine_loop is not None:
                engine_loop.abort(rids)

    async def ModelInfo(self, request, context):  # noqa: N802
        try:
            engine = self._engine_loop().engine
            return protocol.model_info_response(self.worker.model_name, self.worker.replica, engine)
        except Exception as exc:  # noqa: BLE001
            code, message = protocol.status_of(exc)
            await context.abort(code, message)

    async def Terminate(self, request, context):  # noqa: N802
        if not self.worker.allow_terminate:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Terminate is disabled on this worker; start it with allow_terminate=True "
                                "(kubellm worker --allow-terminate) or stop it through its deployment")
        log.info("Terminate accepted; shutting down")
        asyncio.get_running_loop().call_later(0.05, self.worker.terminated.set)
        return llm_pb2.TerminateResponse(accepted=True)

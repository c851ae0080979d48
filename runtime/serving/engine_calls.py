"""A worker's calls on its engine thread, shared by its two faces: the gRPC servicer (service.py) and the
OpenAI HTTP port (worker_http.py, through the REST gateway).

Each call posts its prompts to the engine thread and awaits their events. A call that ends for any reason
— finished, client gone, deadline expired, task cancelled — aborts whatever of its requests is still in
the engine, so their KV blocks are freed at once. Failures leave as `CallFailed` (a gRPC status code and a
message for the caller), already counted and, when internal, logged with their trace.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator

import grpc

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving import protocol
from kubellm.runtime.serving.engine_loop import CallFailed, EngineLoop, ErrorEvent, EventSink, TokenEvent

log = logging.getLogger("kubellm.worker")


class EngineCalls:
    def __init__(self, worker):
        self.worker = worker   # serving.worker.Worker: its engine loop, defaults, replica name, metrics

    def engine_loop(self) -> EngineLoop:
        """The running engine loop, or CallFailed(UNAVAILABLE) saying why there is none."""
        w = self.worker
        if w.stopping:   # new calls only: those in flight keep their engine loop until it stops
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, "this worker is shutting down; retry on another replica")
        if w.engine_loop is None:
            if w.load_error is not None:
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"the model failed to load: {w.load_error}")
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if w.engine_loop.error is not None or not w.engine_loop.is_alive():
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, w.engine_loop.unavailable_message())
        return w.engine_loop

    async def _submit(self, request: llm_pb2.GenerateRequest, stream: bool):
        """Post the request's engine requests: each prompt's n (or best_of) choices, one engine request each."""
        engine_loop = self.engine_loop()
        prompts, gens = protocol.prompts_and_configs(request, self.worker.generation_defaults, engine_loop.engine.config)
        choices = protocol.Choices.of(prompts, gens, stream)
        if any(g.guided_fields() for g in gens):   # compiled here, in a thread, not on the engine thread
            await asyncio.get_running_loop().run_in_executor(None, engine_loop.engine.prepare, gens)
        sink = EventSink(asyncio.get_running_loop(), stream)
        rids = await asyncio.wrap_future(engine_loop.add(choices.prompts, choices.gens, sink))
        return engine_loop, sink, rids, choices

    def _failed(self, exc: BaseException) -> CallFailed:
        code, message = protocol.status_of(exc)
        self.worker.metrics.request_done(code.name)
        if code is grpc.StatusCode.INTERNAL:
            log.error("request failed:\n%s", "".join(traceback.format_exception(exc)))
        return CallFailed(code, message)

    async def generate(self, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse:
        """The whole batch's reply, once every prompt has finished."""
        rids: list[str] = []
        engine_loop = None
        finished = False
        self.worker.in_flight += 1   # a draining worker waits for it
        try:
            engine_loop, sink, rids, choices = await self._submit(request, stream=False)
            results: dict[int, TokenEvent] = {}
            while len(results) < len(rids):
                event = await sink.queue.get()
                if isinstance(event, ErrorEvent):
                    raise CallFailed(event.code, event.message)
                results[event.index] = event
            finished = True
            self.worker.metrics.request_done("OK")
            return protocol.generate_response(self.worker.replica, [results[i] for i in range(len(rids))], choices,
                                              engine_loop.engine.tokenizer)
        except asyncio.CancelledError:
            self.worker.metrics.request_done("CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            raise self._failed(exc) from exc
        finally:
            self.worker.in_flight -= 1
            if not finished and rids and engine_loop is not None:
                engine_loop.abort(rids)

    async def generate_stream(self, request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        """Each prompt's tokens as they come; ends once every prompt has finished."""
        rids: list[str] = []
        engine_loop = None
        finished = False
        self.worker.in_flight += 1
        try:
            engine_loop, sink, rids, choices = await self._submit(request, stream=True)
            done = 0
            while done < len(rids):
                event = await sink.queue.get()
                if isinstance(event, ErrorEvent):
                    raise CallFailed(event.code, event.message)
                if event.finish_reason:
                    done += 1
                yield protocol.stream_response(self.worker.replica, event, choices, tokenizer=engine_loop.engine.tokenizer)
            finished = True
            self.worker.metrics.request_done("OK")
        except (asyncio.CancelledError, GeneratorExit):
            self.worker.metrics.request_done("CANCELLED")
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc) from exc
        finally:
            self.worker.in_flight -= 1
            if not finished and rids and engine_loop is not None:
                engine_loop.abort(rids)

    def model_info(self) -> llm_pb2.ModelInfoResponse:
        try:
            engine = self.engine_loop().engine
            return protocol.model_info_response(self.worker.model_name, self.worker.replica, engine)
        except Exception as exc:  # noqa: BLE001
            raise CallFailed(*protocol.status_of(exc)) from exc

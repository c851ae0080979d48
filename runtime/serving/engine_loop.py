"""The engine thread: the one thread that owns the engine, steps it, and feeds gRPC calls their events.

The engine is not thread-safe, so it lives in one dedicated thread (`EngineLoop`) that steps it
while there is work and otherwise sleeps on a condition. gRPC handlers never touch it: they
post commands (add a batch, abort, run a function) that the engine thread executes between
steps, and receive each request's events through an asyncio.Queue fed with
`loop.call_soon_threadsafe` (an `EventSink`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import grpc

from kubellm.runtime.errors import ExecutorBrokenError
from kubellm.runtime.serving.metrics import EngineState, FinishedRequest, WorkerMetrics

log = logging.getLogger("kubellm.worker")


class CallFailed(Exception):
    """A request failed with a gRPC status (raised on the asyncio side)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- events from the engine thread --------------------------------------------------------------
@dataclass
class TokenEvent:
    index: int
    text: str
    token_ids: list[int]
    prompt_length: int
    generated_length: int
    finish_reason: str = ""   # set on the request's last event
    # filled in on the last event only:
    full_text: str = ""
    all_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # the engine Sequence, for protocol.py's top and prompt logprobs (append-only lists, read on the asyncio side)
    seq: object = None


@dataclass
class ErrorEvent:
    code: grpc.StatusCode
    message: str


class EventSink:
    """Where one gRPC call's events go: an asyncio.Queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stream = stream

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def deliver(batch: list[tuple[EventSink, object]]) -> None:
    """Hand a step's events to their event loops: one call_soon_threadsafe per loop."""
    by_loop: dict = {}
    for sink, event in batch:
        by_loop.setdefault(sink.loop, []).append((sink.queue, event))
    for loop, items in by_loop.items():
        def put_all(items=items):
            for queue, event in items:
                queue.put_nowait(event)
        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass
class _Live:
    """Engine-thread bookkeeping of one request."""

    seq: object
    sink: EventSink
    index: int
    arrived: float
    first_token: float | None = None
    last_token: float | None = None


class EngineLoop(threading.Thread):
    """Owns the engine; runs its steps and the commands posted by the gRPC handlers."""

    def __init__(self, engine, metrics: WorkerMetrics):
        super().__init__(name="kubellm-engine", daemon=True)
        self.engine = engine
        self.metrics = metrics
        self._cond = threading.Condition()
        self._commands: list = []
        self._stopping = False
        self._live: dict[str, _Live] = {}
        self.error: BaseException | None = None   # set if the thread died
        self.on_death = None                       # callback(exc), called from the engine thread
        self.stop_message = ""                     # what requests cut by stop() are told (the worker sets it)

    # -- called from any thread -------------------------------------------------------------------
    def _post(self, fn) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.error is not None or self._stopping:
                future.set_exception(CallFailed(grpc.StatusCode.UNAVAILABLE, self.unavailable_message()))
                return future
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    def unavailable_message(self) -> str:
        if self.error is not None:
            return (f"the engine of this worker stopped ({type(self.error).__name__}: {self.error}); "
                    "retry on another replica")
        return self.stop_message or "this worker is shutting down; retry on another replica"

    def add(self, prompts: list, gens: list, sink: EventSink) -> concurrent.futures.Future:
        """Queue a batch (all or nothing); the future holds the request ids."""
        arrived = time.monotonic()
        return self._post(lambda: self._add(prompts, gens, sink, arrived))

    def abort(self, request_ids: list[str]) -> concurrent.futures.Future:
        return self._post(lambda: self._abort(request_ids))

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread (for inspection, e.g. by tests)."""
        return self._post(lambda: fn(self.engine))

    def stop(self, timeout: float | None = 10) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead engine thread must be reported, not vanish
            log.error("the engine thread died:\n%s", traceback.format_exc())
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            commands, self._commands = self._commands, []
        message = self.unavailable_message()
        for _, future in commands:
            if not future.done():
                future.set_exception(CallFailed(grpc.StatusCode.UNAVAILABLE, message))
        for live in list(self._live.values()):
            live.sink.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, message))
        self._live.clear()
        if self.on_death is not None:
            try:
                self.on_death(exc)
            except Exception:  # noqa: BLE001
                log.exception("on_death callback failed")

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not engine.has_unfinished():
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            for fn, future in commands:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            if engine.has_unfinished():
                self._step()
            self._publish_state()
        # Stopping: whoever still waits learns why.
        with self._cond:
            commands, self._commands = self._commands, []
        for _, future in commands:
            if not future.done():
                future.set_exception(CallFailed(grpc.StatusCode.UNAVAILABLE, self.unavailable_message()))
        for rid, live in list(self._live.items()):
            engine.abort(rid)
            self.metrics.request_ended_early("abort")
            live.sink.put(ErrorEvent(grpc.StatusCode.UNAVAILABLE, self.unavailable_message()))
        self._live.clear()

    def _publish_state(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        running = waiting = ()
        if self.engine.config.adapters:   # vllm:lora_requests_info: each adapter once, in queue order
            running = tuple(dict.fromkeys(s.gen.adapter for s in scheduler.running if s.gen.adapter))
            waiting = tuple(dict.fromkeys(s.gen.adapter for queue in (scheduler.waiting, scheduler.swapped)
                                          for s in queue if s.gen.adapter))
        self.metrics.set_engine_state(EngineState(len(scheduler.running), len(scheduler.waiting), float(blocks.usage),
                                                  blocks.prefix_queries, blocks.prefix_hits, scheduler.num_preemptions,
                                                  len(scheduler.swapped), blocks.swapped_out_blocks,
                                                  blocks.swapped_in_blocks, scheduler.num_swap_fallbacks,
                                                  running, waiting, time.time()))

    def _add(self, prompts, gens, sink: EventSink, arrived: float) -> list[str]:
        added = []
        try:
            for i, (prompt, gen) in enumerate(zip(prompts, gens)):
                rid = uuid.uuid4().hex
                seq = self.engine.add_request(prompt, gen, request_id=rid, field=f"prompts[{i}]")
                added.append(rid)
                self._live[rid] = _Live(seq, sink, i, arrived)
        except BaseException:
            for rid in added:  # all or nothing: no orphans
                self.engine.abort(rid)
                self._live.pop(rid, None)
            raise
        self.metrics.add_tokens(prompt=sum(self._live[r].seq.num_prompt_tokens for r in added))
        self.metrics.adapter_requests([gen.adapter for gen in gens])
        return added

    def _abort(self, request_ids: list[str]) -> int:
        n = 0
        for rid in request_ids:
            if self._live.pop(rid, None) is not None and self.engine.abort(rid):
                n += 1
                self.metrics.request_ended_early("abort")
        return n

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except ExecutorBrokenError:
            raise  # a rank is gone: this engine cannot step again; dying turns health NOT_SERVING
        except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
            log.error("engine step failed:\n%s", traceback.format_exc())
            message = f"the engine failed while generating ({type(exc).__name__}: {exc})"
            for rid, live in list(self._live.items()):
                self.engine.abort(rid)   # if this raises too, the thread dies (and health says so)
                self.metrics.request_ended_early("error")
                live.sink.put(ErrorEvent(grpc.StatusCode.INTERNAL, message))
            self._live.clear()
            return
        now = time.monotonic()
        batch: list[tuple[EventSink, object]] = []   # one wake-up of the event loop per step, not per token
        generated, gaps = 0, []                       # metrics: one update per step, not per token
        for out in outputs:
            seq = out.seq
            live = self._live.get(seq.request_id)
            if live is None:
                continue
            if out.new_token_ids:
                generated += len(out.new_token_ids)
                if live.first_token is None:
                    live.first_token = now
                    self.metrics.first_token(now - live.arrived, seq.num_prompt_tokens)
                else:
                    gaps.append(now - live.last_token)
                live.last_token = now
            if out.finished:
                del self._live[seq.request_id]
                self.metrics.request_finished(FinishedRequest(
                    seq.finish_reason or "stop", live.arrived, seq.first_scheduled or live.arrived,
                    live.first_token or now, now, seq.num_prompt_tokens, seq.num_generated))
                batch.append((live.sink, TokenEvent(
                    live.index, out.delta_text, list(out.new_token_ids), seq.num_prompt_tokens, seq.num_generated,
                    seq.finish_reason or "stop", seq.text, list(seq.generated_ids),
                    [float(x) for x in seq.logprobs] if seq.gen.logprobs is not None else [],
                    seq.cumulative_logprob, seq)))
            elif live.sink.stream:
                batch.append((live.sink, TokenEvent(live.index, out.delta_text, list(out.new_token_ids),
                                                seq.num_prompt_tokens, seq.num_generated,
                                                cumulative_logprob=seq.cumulative_logprob, seq=seq)))
        self.metrics.add_tokens(generated=generated)
        self.metrics.inter_token_latencies(gaps)
        deliver(batch)


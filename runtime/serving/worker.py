"""The worker: an asyncio gRPC server (kubellm.v1.LLM + grpc.health.v1) in front of one engine.

The engine is not thread-safe, so it lives in one dedicated thread (`EngineLoop`) that steps it
while there is work and otherwise sleeps on a condition. gRPC handlers never touch it: they
post commands (add a batch, abort, run a function) that the engine thread executes between
steps, and receive each request's events through an asyncio.Queue fed with
`loop.call_soon_threadsafe`. A handler that ends for any reason — finished, client gone,
deadline expired, task cancelled — aborts whatever of its requests is still in the engine, so
their KV blocks are freed at once.

    await serve_worker("smollm2-135m", EngineConfig(), port=50051)          # runs until terminated

    worker = WorkerServer(model_path, EngineConfig(num_kv_blocks=256)).start()   # tests
    worker.wait_ready(); ...; worker.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.config import ConfigError, EngineConfig, generation_config
from kubellm.runtime.errors import EngineFullError, RequestError
from kubellm.runtime.serving.metrics import WorkerMetrics

log = logging.getLogger("kubellm.worker")

SERVICE_NAME = "kubellm.v1.LLM"

_GEN_SCALARS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                "ignore_eos", "random_seed", "skip_special_tokens", "logprobs", "max_length")
_GEN_LISTS = ("stop_words", "bad_words")


class _Failure(Exception):
    """A request failed with a gRPC status (raised on the asyncio side)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- events from the engine thread --------------------------------------------------------------
@dataclass
class _Token:
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


@dataclass
class _Error:
    code: grpc.StatusCode
    message: str


class _Sink:
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


def _deliver(batch: list[tuple[_Sink, object]]) -> None:
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
    sink: _Sink
    index: int
    arrived: float
    first_token: float | None = None


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

    # -- called from any thread -------------------------------------------------------------------
    def _post(self, fn) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.error is not None or self._stopping:
                future.set_exception(_Failure(grpc.StatusCode.UNAVAILABLE, self._unavailable_message()))
                return future
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    def _unavailable_message(self) -> str:
        if self.error is not None:
            return (f"the engine of this worker stopped ({type(self.error).__name__}: {self.error}); "
                    "retry on another replica")
        return "this worker is shutting down; retry on another replica"

    def add(self, prompts: list, gens: list, sink: _Sink) -> concurrent.futures.Future:
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
        message = self._unavailable_message()
        for _, future in commands:
            if not future.done():
                future.set_exception(_Failure(grpc.StatusCode.UNAVAILABLE, message))
        for live in list(self._live.values()):
            live.sink.put(_Error(grpc.StatusCode.UNAVAILABLE, message))
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
                future.set_exception(_Failure(grpc.StatusCode.UNAVAILABLE, self._unavailable_message()))
        for rid, live in list(self._live.items()):
            engine.abort(rid)
            live.sink.put(_Error(grpc.StatusCode.UNAVAILABLE, self._unavailable_message()))
        self._live.clear()

    def _publish_state(self) -> None:
        engine = self.engine
        self.metrics.set_engine_state(len(engine.scheduler.running), len(engine.scheduler.waiting),
                                      float(engine.block_manager.usage))

    def _add(self, prompts, gens, sink: _Sink, arrived: float) -> list[str]:
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
        return added

    def _abort(self, request_ids: list[str]) -> int:
        n = 0
        for rid in request_ids:
            if self._live.pop(rid, None) is not None:
                n += self.engine.abort(rid)
        return n

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
            group = getattr(self.engine, "rank_group", None)
            if group is not None and group.broken:
                raise  # a rank is gone: this engine cannot step again; dying turns health NOT_SERVING
            log.error("engine step failed:\n%s", traceback.format_exc())
            message = f"the engine failed while generating ({type(exc).__name__}: {exc})"
            for rid, live in list(self._live.items()):
                self.engine.abort(rid)   # if this raises too, the thread dies (and health says so)
                live.sink.put(_Error(grpc.StatusCode.INTERNAL, message))
            self._live.clear()
            return
        now = time.monotonic()
        batch: list[tuple[_Sink, object]] = []   # one wake-up of the event loop per step, not per token
        for out in outputs:
            seq = out.seq
            live = self._live.get(seq.request_id)
            if live is None:
                continue
            self.metrics.add_tokens(generated=len(out.new_token_ids))
            if live.first_token is None and out.new_token_ids:
                live.first_token = now
                self.metrics.observe_ttft(now - live.arrived)
            if out.finished:
                del self._live[seq.request_id]
                if seq.num_generated > 1 and live.first_token is not None:
                    self.metrics.observe_tpot((now - live.first_token) / (seq.num_generated - 1))
                batch.append((live.sink, _Token(
                    live.index, out.delta_text, list(out.new_token_ids), seq.num_prompt_tokens, seq.num_generated,
                    seq.finish_reason or "stop", seq.text, list(seq.generated_ids),
                    [float(x) for x in seq.logprobs] if seq.gen.logprobs is not None else [])))
            elif live.sink.stream:
                batch.append((live.sink, _Token(live.index, out.delta_text, list(out.new_token_ids),
                                                seq.num_prompt_tokens, seq.num_generated)))
        _deliver(batch)


# -- the gRPC service ------------------------------------------------------------------------------
def _prompt_from_proto(prompt: llm_pb2.Prompt, i: int):
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return prompt.text
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
    if kind == "token_ids":
        return list(prompt.token_ids.ids)
    raise RequestError(f"prompts[{i}]: empty prompt; set one of text, chat or token_ids")


def gen_options_from_proto(config: llm_pb2.GenerationConfig) -> dict:
    """The fields a request set (proto3 optional), as GenerationConfig options."""
    options = {name: getattr(config, name) for name in _GEN_SCALARS if config.HasField(name)}
    for name in _GEN_LISTS:
        values = list(getattr(config, name))
        if values:
            options[name] = values
    return options


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, worker: "_Worker"):
        self.worker = worker

    # -- helpers ----------------------------------------------------------------------------------
    def _engine_loop(self) -> EngineLoop:
        w = self.worker
        if w.engine_loop is None:
            if w.load_error is not None:
                raise _Failure(grpc.StatusCode.UNAVAILABLE, f"the model failed to load: {w.load_error}")
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if w.engine_loop.error is not None or not w.engine_loop.is_alive():
            raise _Failure(grpc.StatusCode.UNAVAILABLE, w.engine_loop._unavailable_message())
        return w.engine_loop

    def _parse(self, request: llm_pb2.GenerateRequest):
        if not request.prompts:
            raise RequestError("prompts: empty list; pass at least one prompt")
        prompts = [_prompt_from_proto(p, i) for i, p in enumerate(request.prompts)]
        options = gen_options_from_proto(request.config) if request.HasField("config") else {}
        gen = generation_config(self.worker.generation_defaults, options)
        return prompts, [gen] * len(prompts)

    async def _submit(self, request, stream: bool):
        loop_ = self._engine_loop()
        prompts, gens = self._parse(request)
        sink = _Sink(asyncio.get_running_loop(), stream)
        rids = await asyncio.wrap_future(loop_.add(prompts, gens, sink))
        return loop_, sink, rids

    async def _fail(self, context, exc: BaseException):
        code, message = _status_of(exc)
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
            results: dict[int, _Token] = {}
            while len(results) < len(rids):
                event = await sink.queue.get()
                if isinstance(event, _Error):
                    raise _Failure(event.code, event.message)
                results[event.index] = event
            finished = True
            self.worker.metrics.request_done("OK")
            return llm_pb2.GenerateResponse(replica=self.worker.replica, responses=[
                llm_pb2.Response(text=r.full_text, prompt_length=r.prompt_length,
                                 generated_length=r.generated_length, finish_reason=r.finish_reason,
                                 index=r.index, token_ids=r.all_token_ids, logprobs=r.logprobs)
                for r in (results[i] for i in range(len(rids)))])
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
                if isinstance(event, _Error):
                    raise _Failure(event.code, event.message)
                if event.finish_reason:
                    done += 1
                yield llm_pb2.GenerateStreamResponse(
                    index=event.index, text=event.text, token_ids=event.token_ids,
                    finish_reason=event.finish_reason, prompt_length=event.prompt_length,
                    generated_length=event.generated_length, replica=self.worker.replica)
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
            cfg = engine.config
            archs = getattr(engine.hf_config, "architectures", None) or [getattr(engine.hf_config, "model_type", "")]
            return llm_pb2.ModelInfoResponse(
                model=str(self.worker.model_name or engine.model_path), architecture=str(archs[0] or ""),
                tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel,
                max_batch_size=cfg.max_batch_size, session_len=engine.session_len,
                replica=self.worker.replica, version=_version())
        except Exception as exc:  # noqa: BLE001
            code, message = _status_of(exc)
            await context.abort(code, message)

    async def Terminate(self, request, context):  # noqa: N802
        if not self.worker.allow_terminate:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Terminate is disabled on this worker; start it with allow_terminate=True "
                                "(kubellm worker --allow-terminate) or stop it through its deployment")
        log.info("Terminate accepted; shutting down")
        asyncio.get_running_loop().call_later(0.05, self.worker.terminated.set)
        return llm_pb2.TerminateResponse(accepted=True)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, _Failure):
        return exc.code, exc.message
    if isinstance(exc, EngineFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (RequestError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); the worker keeps serving"


def _version() -> str:
    from kubellm import __version__

    return __version__


# -- the worker process ----------------------------------------------------------------------------------
class _Worker:
    """A running worker's state, shared by the service and its owner (serve_worker / WorkerServer)."""

    def __init__(self, model, engine_config: EngineConfig | dict | None, port: int, host: str, replica: str | None,
                 allow_terminate: bool, generation_defaults, metrics_port: int | None, show_progress: bool,
                 load_gate: threading.Event | None = None, rank_group=None):
        if isinstance(engine_config, dict) or engine_config is None:
            engine_config = EngineConfig.build(**(engine_config or {}))
        self.model = model
        self.model_name = str(model)
        self.engine_config = engine_config
        self.host, self.port = host, port
        self.replica = replica
        self.allow_terminate = allow_terminate
        # Validated now: a bad deployment default is a startup error, not a per-request one.
        self.generation_defaults = generation_config(generation_defaults).model_dump(exclude_unset=True) \
            if generation_defaults else {}
        self.metrics_port = metrics_port
        self.show_progress = show_progress
        self.load_gate = load_gate   # tests: the model starts loading only once this is set
        self.rank_group = rank_group  # callable joining the ranks on other hosts (see cmd_worker)
        self.metrics = WorkerMetrics()
        self.engine_loop: EngineLoop | None = None
        self.stopping = False
        self.load_error: BaseException | None = None
        self.server: grpc.aio.Server | None = None
        self.health: health_aio.HealthServicer | None = None
        self.metrics_server = None
        self.terminated: asyncio.Event | None = None
        self.ready: asyncio.Event | None = None

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.terminated = asyncio.Event()
        self.ready = asyncio.Event()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        llm_pb2_grpc.add_LLMServicer_to_server(LLMService(self), self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(False)
        bound = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if not bound:
            raise OSError(f"port: cannot listen on {self.host}:{self.port}; pick a free port")
        self.port = bound
        if self.replica is None:
            self.replica = f"{socket.gethostname()}:{self.port}"
        await self.server.start()
        if self.metrics_port is not None:
            self.metrics_server = self.metrics.serve(self.metrics_port, self.host)
            self.metrics_port = self.metrics_server.server_port
        log.info("worker %s listening on %s:%d; loading %s", self.replica, self.host, self.port, self.model_name)
        loop.create_task(self._load())

    async def _load(self) -> None:
        from kubellm.runtime.engine.engine import LLMEngine

        loop = asyncio.get_running_loop()
        try:
            if self.load_gate is not None:
                while not await loop.run_in_executor(None, self.load_gate.wait, 0.1):
                    if self.stopping:
                        return
            started = time.monotonic()
            engine = await loop.run_in_executor(None, lambda: LLMEngine(
                self.model, self.engine_config, self.show_progress,
                rank_group=self.rank_group() if self.rank_group else None))
            log.info("model %s loaded in %.1f s (%s, %s on %s, %d KV blocks of %d tokens)", self.model_name,
                     time.monotonic() - started, engine.model_path, engine.runner.dtype, engine.runner.device,
                     engine.block_manager.num_blocks, engine.config.block_size)
        except Exception as exc:  # noqa: BLE001 - reported through health and every request
            detail = str(exc) if isinstance(exc, ValueError) else traceback.format_exc()  # bad config: no trace
            log.error("the model failed to load: %s", detail)
            self.load_error = exc
            self.ready.set()
            return
        engine_loop = EngineLoop(engine, self.metrics)

        def on_death(exc):
            loop.call_soon_threadsafe(lambda: loop.create_task(self._set_health(False)))

        engine_loop.on_death = on_death
        engine_loop.start()
        self.engine_loop = engine_loop
        await self._set_health(True)
        log.info("worker %s serving on port %d", self.replica, self.port)
        self.ready.set()

    async def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        if self.health is not None:
            await self._set_health(False)
        if self.server is not None:
            await self.server.stop(grace)
        if self.engine_loop is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine_loop.stop)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


class TerminatedWhileLoading(Exception):
    """SIGTERM arrived before the model was loaded; the loading thread cannot be interrupted, so the
    caller exits the process (nothing is in flight yet)."""


async def serve_worker(model, engine_config: EngineConfig | dict | None = None, port: int = 50051,
                       host: str = "0.0.0.0", replica: str | None = None, allow_terminate: bool = False,
                       generation_defaults: dict | None = None, metrics_port: int | None = None,
                       show_progress: bool = False, rank_group=None) -> None:
    """Serve `model` on host:port until Terminate (if allowed) or cancellation; raises if the model fails to load.
    `rank_group`: a callable that joins the group's ranks on other hosts (rank 0 of a multi-host group)."""
    worker = _Worker(model, engine_config, port, host, replica, allow_terminate, generation_defaults,
                     metrics_port, show_progress, rank_group=rank_group)
    await worker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):   # Kubernetes stops pods with SIGTERM: drain, then exit
        try:
            loop.add_signal_handler(sig, worker.terminated.set)
        except (NotImplementedError, RuntimeError, ValueError):   # not the main thread, or Windows
            pass
    try:
        # SIGTERM while the weights still load (a pod deleted early) stops at once, not after the load.
        waits = [asyncio.ensure_future(worker.ready.wait()), asyncio.ensure_future(worker.terminated.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if worker.terminated.is_set() and not worker.ready.is_set():
            raise TerminatedWhileLoading(f"worker {worker.replica} terminated while loading")
        if worker.load_error is not None:
            # A ValueError is the user's configuration (the CLI prints it and exits 2); others are faults.
            error = ValueError if isinstance(worker.load_error, ValueError) else RuntimeError
            raise error(f"model: {worker.model_name} failed to load: {worker.load_error}") from worker.load_error
        await worker.terminated.wait()
    finally:
        await worker.stop()


def serve_follower(model, engine_config: EngineConfig, ranks: list[int], port: int, host: str = "0.0.0.0") -> None:
    """A pod of a multi-host group that does not hold rank 0: run `ranks` (the first in this process,
    the rest as children) under rank 0's direction. Answers gRPC health (SERVING once this rank's
    shard is loaded) so the pod's probes work; exits when rank 0 goes away or the group breaks."""
    from grpc_health.v1 import health

    from kubellm.runtime.executor.rank_group import master_address, serve_remote_rank, start_remote_rank
    from kubellm.runtime.engine.engine import session_len_for
    from kubellm.runtime.executor.loader import check_model_dir, load_hf_config
    from kubellm.runtime.hub.model_hub import resolve_model

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

    def on_ready():
        log.info("ranks %s: shard of %s loaded in %.1f s; health SERVING on port %d", ranks, path,
                 time.monotonic() - started, port)
        checker.set("", health_pb2.HealthCheckResponse.SERVING)

    serve_remote_rank(ranks[0], addr, master_port, path, engine_config, session_len, on_ready=on_ready,
                      show_progress=True)


class WorkerServer:
    """A worker in a background thread with its own event loop (tests, notebooks).

        worker = WorkerServer(path, {"num_kv_blocks": 256}, metrics_port=0).start()
        worker.wait_ready(); Client(worker.address) ...; worker.stop()
    """

    def __init__(self, model, engine_config: EngineConfig | dict | None = None, port: int = 0,
                 host: str = "127.0.0.1", replica: str | None = None, allow_terminate: bool = False,
                 generation_defaults: dict | None = None, metrics_port: int | None = None,
                 show_progress: bool = False, load_gate: threading.Event | None = None):
        self._worker = _Worker(model, engine_config, port, host, replica, allow_terminate, generation_defaults,
                               metrics_port, show_progress, load_gate)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self._worker.port

    @property
    def address(self) -> str:
        return f"{self._worker.host}:{self._worker.port}"

    @property
    def metrics_port(self) -> int | None:
        return self._worker.metrics_port

    @property
    def replica(self) -> str:
        return self._worker.replica

    @property
    def metrics(self) -> WorkerMetrics:
        return self._worker.metrics

    def start(self, timeout: float = 30) -> "WorkerServer":
        started = threading.Event()
        failure: list[BaseException] = []

        def main():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._worker.start())
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)
                started.set()
                loop.close()
                self._stopped.set()
                return
            started.set()
            try:
                loop.run_until_complete(self._worker.terminated.wait())
                loop.run_until_complete(self._worker.stop(grace=1.0))
            finally:
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=main, name="kubellm-worker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("the worker did not start listening in time")
        if failure:
            raise failure[0]
        return self

    def wait_ready(self, timeout: float = 120) -> "WorkerServer":
        """Block until the model is loaded (raises if it failed to load)."""
        deadline = time.monotonic() + timeout
        while self._worker.engine_loop is None and self._worker.load_error is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the model did not load in time")
            time.sleep(0.02)
        if self._worker.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self._worker.load_error}")
        return self

    def call_engine(self, fn, timeout: float = 30):
        """fn(engine) run on the engine thread, between steps; its result."""
        if self._worker.engine_loop is None:
            raise RuntimeError("the engine is not loaded yet")
        return self._worker.engine_loop.call(fn).result(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait_stopped(self, timeout: float = 30) -> bool:
        return self._stopped.wait(timeout)

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and not self._stopped.is_set():
            try:
                self._loop.call_soon_threadsafe(self._worker.terminated.set)
            except RuntimeError:
                pass
        self._stopped.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

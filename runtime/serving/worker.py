"""The worker: an asyncio gRPC server (kubellm.v1.LLM + grpc.health.v1) in front of one engine.

The engine runs in its own thread (serving.engine_loop); the RPCs are serving.service; the
config ↔ proto mapping is serving.protocol. This module owns the process: listen, load the
model (health SERVING once loaded, NOT_SERVING if the engine dies), drain on SIGTERM.

    await serve_worker("smollm2-135m", EngineConfig(), port=50051)          # runs until terminated

    worker = WorkerServer(model_path, EngineConfig(num_kv_blocks=256)).start()   # tests
    worker.wait_ready(); ...; worker.stop()
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
import traceback

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from kubellm.runtime.config import EngineConfig, generation_config
from kubellm.runtime.serving.draining import drain, until_idle
from kubellm.runtime.serving.engine_loop import EngineLoop
from kubellm.runtime.serving.metrics import WorkerMetrics
from kubellm.runtime.serving.reflection import add_reflection
from kubellm.runtime.serving.service import LLMService, add_to_server
from kubellm.runtime.serving.unparsed import add_health_servicer
from kubellm.runtime.serving.worker_http import start_http

log = logging.getLogger("kubellm.worker")

SERVICE_NAME = "kubellm.v1.LLM"
# A load slower than this is logged as a WARNING naming its slowest phase: a minute is well past what a
# cached model of a few billion parameters takes, so something (a download, a cold disk) deserves a look.
SLOW_LOAD_SECONDS = 60.0
SLOW_PHASE_HINTS = {
    "download": "keep the model in a persistent cache (kubellm models pull / download) so a restart skips it",
    "weights": "the checkpoint is read slowly: a faster or local disk helps",
    "warmup": "CUDA graph capture (on CPU with compile: the decode step's compile) and the KV cache",
}
# How long a terminated worker lets its requests in flight finish (`kubellm worker --drain-timeout`); the
# pod's terminationGracePeriodSeconds covers it (operator/resources.py, spec.drain.timeoutSeconds).
DRAIN_TIMEOUT = 30.0


class Worker:
    """A running worker's state, shared by the service and its owner (serve_worker / WorkerServer)."""

    def __init__(self, model, engine_config: EngineConfig | dict | None, port: int, host: str, replica: str | None,
                 allow_terminate: bool, generation_defaults, metrics_port: int | None, show_progress: bool,
                 load_gate: threading.Event | None = None, rank_group=None, served_model_name: str | None = None,
                 http_port: int | None = None, drain_timeout: float = DRAIN_TIMEOUT,
                 adapter_sources: dict[str, str] | None = None, tool_call_parser: str | None = None):
        if isinstance(engine_config, dict) or engine_config is None:
            engine_config = EngineConfig.build(**(engine_config or {}))
        self.model = model
        self.model_name = str(model)
        # The name clients and dashboards know the model by (the metrics' model_name label); the
        # operator passes the LLMDeployment's name.
        self.served_model_name = served_model_name or self.model_name
        self.tool_call_parser = tool_call_parser   # its OpenAI port's format of tool calls (None: the chat template's)
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
        self.rank_group = rank_group  # callable(engine_config) joining the ranks on other hosts (see cli/worker.py)
        # LoRA adapters by name -> a directory or hf://... (`--lora`), resolved (downloaded) as the model loads,
        # into engine_config.adapters.
        self.adapter_sources = dict(adapter_sources or {})
        self.metrics = WorkerMetrics(model_name=self.served_model_name)
        self.engine_loop: EngineLoop | None = None
        self.stopping = False
        self.drain_timeout = drain_timeout
        self.in_flight = 0   # engine calls (gRPC and HTTP) not ended yet: what a drain waits for
        self.load_error: BaseException | None = None
        self.server: grpc.aio.Server | None = None
        self.health: health_aio.HealthServicer | None = None
        self.metrics_server = None
        self.http_port = http_port   # OpenAI HTTP + /metrics (serving.worker_http); None: gRPC only
        self.http_runner = None
        self.http_upstream = None
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
        add_to_server(LLMService(self), self.server)   # a request that does not parse: INVALID_ARGUMENT
        self.health = health_aio.HealthServicer()
        add_health_servicer(self.health, self.server)   # a request that does not parse: INVALID_ARGUMENT
        add_reflection(self.server)
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
        if self.http_port is not None:
            self.http_runner, self.http_upstream, self.http_port = await start_http(self, self.host, self.http_port)
            log.info("worker %s serving OpenAI HTTP on port %d", self.replica, self.http_port)
        log.info("worker %s listening on %s:%d; loading %s", self.replica, self.host, self.port, self.model_name)
        loop.create_task(self._load())

    def _build_engine(self):
        """The engine, its load timed by phase (rank 0's; a multi-host group's joining counts as weights)."""
        from kubellm.runtime.engine.engine import LLMEngine
        from kubellm.runtime.executor.load_times import LoadTimes

        from kubellm.runtime.hub.adapters import resolve_adapters

        times = LoadTimes()
        started = time.monotonic()
        if self.adapter_sources:
            with times.phase("download"):   # hf:// adapters are fetched like the model, in the same phase
                adapters = resolve_adapters(self.adapter_sources)
            self.engine_config = self.engine_config.updated(adapters={**self.engine_config.adapters, **adapters})
            log.info("LoRA adapters: %s", ", ".join(f"{n} ({p})" for n, p in adapters.items()))
        with times.phase("weights"):
            group = self.rank_group(self.engine_config) if self.rank_group else None
        engine = LLMEngine(self.model, self.engine_config, self.show_progress, rank_group=group, load_times=times)
        times.total = time.monotonic() - started
        return engine

    def _report_load(self, engine) -> None:
        times = engine.load_times
        self.metrics.set_load_times(times.total, times.phases)
        self.metrics.engine_loaded(engine.config.block_size, engine.block_manager.num_blocks,
                                   engine.config.enable_prefix_caching, engine.session_len)
        self.metrics.adapters_loaded(list(engine.config.adapters), time.time())
        log.info("model %s loaded in %s: %s, %s on %s, %d KV blocks of %d tokens", self.model_name,
                 times.describe(), engine.model_path, engine.runner.dtype, engine.runner.device,
                 engine.block_manager.num_blocks, engine.config.block_size)
        if times.total > SLOW_LOAD_SECONDS:
            log.warning("model %s took %.0f s to load (over %.0f s); most of it in %s (%.0f s): %s", self.model_name,
                        times.total, SLOW_LOAD_SECONDS, times.slowest, times.phases[times.slowest],
                        SLOW_PHASE_HINTS[times.slowest])

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.load_gate is not None:
                while not await loop.run_in_executor(None, self.load_gate.wait, 0.1):
                    if self.stopping:
                        return
            engine = await loop.run_in_executor(None, self._build_engine)
            self._report_load(engine)
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

    async def drain(self, timeout: float) -> bool:
        """Let the calls in flight finish, up to `timeout` s; True if they all did. New calls are already
        refused (`stopping`: UNAVAILABLE, so the router retries them on another replica)."""
        return await drain(lambda: self.in_flight, timeout, f"worker {self.replica}", log)

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: health NOT_SERVING and new calls refused at once, the calls in flight
        finish up to `grace` s (default: the drain timeout); then the engine loop stops, which ends what
        is left with UNAVAILABLE naming this worker (an SSE stream: an error event, then [DONE])."""
        self.stopping = True
        if self.health is not None:
            await self._set_health(False)
        timeout = self.drain_timeout if grace is None else grace
        if self.engine_loop is not None:
            self.engine_loop.stop_message = (f"worker {self.replica} is shutting down and its drain timeout "
                                             f"({timeout:g} s) ran out: the response is incomplete")
        await self.drain(timeout)
        if self.engine_loop is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine_loop.stop)
        # The last replies and the cut calls' statuses reach their clients; then the ports close.
        closing = []
        if self.server is not None:
            closing.append(self.server.stop(1.0))
        if self.http_upstream is not None:
            closing.append(until_idle(lambda: self.http_upstream.in_flight, 1.0))   # its last bytes written
        await asyncio.gather(*closing)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


class TerminatedWhileLoading(Exception):
    """SIGTERM arrived before the model was loaded; the loading thread cannot be interrupted, so the
    caller exits the process (nothing is in flight yet)."""


async def serve_worker(model, engine_config: EngineConfig | dict | None = None, port: int = 50051,
                       host: str = "0.0.0.0", replica: str | None = None, allow_terminate: bool = False,
                       generation_defaults: dict | None = None, metrics_port: int | None = None,
                       show_progress: bool = False, rank_group=None, served_model_name: str | None = None,
                       http_port: int | None = None, drain_timeout: float = DRAIN_TIMEOUT,
                       adapter_sources: dict[str, str] | None = None, tool_call_parser: str | None = None) -> None:
    """Serve `model` on host:port until Terminate (if allowed), SIGTERM or cancellation; raises if the model fails
    to load. On SIGTERM it drains: new calls refused, those in flight finish up to `drain_timeout` s.
    `rank_group`: a callable that joins the group's ranks on other hosts (rank 0 of a multi-host group).
    `served_model_name`: the name the model is served as (default: `str(model)`).
    `http_port`: also serve OpenAI HTTP (and /metrics) there (serving.worker_http); `tool_call_parser`: the format
    of the model's tool calls there (default: its chat template's).
    `adapter_sources`: LoRA adapters by name -> directory or hf://org/name[@revision] (downloaded while loading)."""
    worker = Worker(model, engine_config, port, host, replica, allow_terminate, generation_defaults,
                     metrics_port, show_progress, rank_group=rank_group, served_model_name=served_model_name,
                     http_port=http_port, drain_timeout=drain_timeout, adapter_sources=adapter_sources,
                     tool_call_parser=tool_call_parser)
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



class WorkerServer:
    """A worker in a background thread with its own event loop (tests, notebooks).

        worker = WorkerServer(path, {"num_kv_blocks": 256}, metrics_port=0).start()
        worker.wait_ready(); Client(worker.address) ...; worker.stop()
    """

    def __init__(self, model, engine_config: EngineConfig | dict | None = None, port: int = 0,
                 host: str = "127.0.0.1", replica: str | None = None, allow_terminate: bool = False,
                 generation_defaults: dict | None = None, metrics_port: int | None = None,
                 show_progress: bool = False, load_gate: threading.Event | None = None,
                 served_model_name: str | None = None, http_port: int | None = None, drain_timeout: float = 1.0,
                 adapter_sources: dict[str, str] | None = None, tool_call_parser: str | None = None):
        self._worker = Worker(model, engine_config, port, host, replica, allow_terminate, generation_defaults,
                               metrics_port, show_progress, load_gate, served_model_name=served_model_name,
                               http_port=http_port, drain_timeout=drain_timeout, adapter_sources=adapter_sources,
                               tool_call_parser=tool_call_parser)
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
    def http_port(self) -> int | None:
        return self._worker.http_port

    @property
    def served_model_name(self) -> str:
        return self._worker.served_model_name

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
                loop.run_until_complete(self._worker.stop())
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

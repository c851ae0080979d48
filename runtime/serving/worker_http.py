"""A worker's own OpenAI HTTP port (`kubellm worker --http-port N`): the REST gateway in front of this
worker's engine, so that a Gateway's inference extension can send traffic straight to the leader pods.

    POST /v1/completions, /v1/chat/completions (stream too), GET /v1/models, GET /health, GET /metrics

The gateway is the router's (serving.gateway); its upstream here runs each request on the worker's engine
thread in-process (serving.engine_calls, as the gRPC servicer does), with no gRPC hop to itself. Unlike the
router's, this gateway checks `model`: the served model name or the model's own name (vLLM accepts its
served names only; both are accepted here, since a local path is the model's own name until one is given).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from aiohttp import web

from kubellm.metrics import CONTENT_TYPE
from kubellm.runtime.serving.engine_calls import EngineCalls
from kubellm.runtime.serving.engine_loop import CallFailed
from kubellm.runtime.serving.gateway import build_app
from kubellm.runtime.serving.tool_parsers import parser_from_chat_template
from kubellm.runtime.serving.upstream import UpstreamError


def served_models(worker) -> list[str]:
    """The names `model` may take on this worker, the served name first (what replies and /v1/models say)."""
    names = [worker.served_model_name, worker.model_name]
    return list(dict.fromkeys(n for n in names if n))


def tool_call_parser(worker):
    """The format of the model's tool calls: `worker.tool_call_parser` where set (--tool-call-parser), else its chat
    template's once the model has loaded (a callable, asked per request; None until then: auto)."""
    if getattr(worker, "tool_call_parser", None):
        return worker.tool_call_parser
    found: list[str | None] = []

    def from_template() -> str | None:
        if not found:
            engine = getattr(worker.engine_loop, "engine", None)
            if engine is None:
                return None
            template = getattr(engine.tokenizer.hf, "chat_template", None)
            if isinstance(template, dict):   # named templates: "default", "tool_use", ...
                template = "\n".join(t for t in template.values() if isinstance(t, str))
            found.append(parser_from_chat_template(template if isinstance(template, str) else None))
        return found[0]
    return from_template


class WorkerUpstream:
    """The gateway's upstream on a worker (serving.upstream.Upstream): its own engine, in-process."""

    def __init__(self, worker):
        self.worker = worker   # serving.worker.Worker
        self.calls = EngineCalls(worker)
        self.replicas = (worker,)
        self.in_flight = 0   # HTTP calls not yet ended: a stopping worker waits for their last bytes

    @property
    def deployment_name(self) -> str:
        return self.worker.served_model_name

    @property
    def model_info(self):
        try:
            return self.calls.model_info()
        except CallFailed:
            return None

    def healthy_replicas(self) -> tuple:
        try:
            self.calls.engine_loop()   # loaded, alive, not stopping
        except CallFailed:
            return ()
        return self.replicas

    async def forward_unary(self, method: str, request, metadata=(), timeout: float | None = None):
        self.in_flight += 1
        try:
            if method == "Generate":
                return await asyncio.wait_for(self.calls.generate(request), timeout)
            if method == "ModelInfo":
                return self.calls.model_info()
            raise UpstreamError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served over HTTP")
        except CallFailed as err:
            raise UpstreamError(err.code, err.message) from None
        except asyncio.TimeoutError:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        finally:
            self.in_flight -= 1

    async def forward_stream(self, request, metadata=(), timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        self.in_flight += 1
        stream = self.calls.generate_stream(request)
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    message = await asyncio.wait_for(stream.__anext__(), left)
                except StopAsyncIteration:
                    return
                yield message
        except CallFailed as err:
            raise UpstreamError(err.code, err.message) from None
        except asyncio.TimeoutError:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        finally:
            await stream.aclose()
            self.in_flight -= 1

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.worker.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})


async def start_http(worker, host: str, port: int) -> tuple[web.AppRunner, WorkerUpstream, int]:
    """Serve the worker's OpenAI HTTP port; the runner, the upstream and the bound port (0 picks one)."""
    upstream = WorkerUpstream(worker)
    app = build_app(upstream, models=served_models(worker), mii=False, tool_call_parser=tool_call_parser(worker))
    # handler_cancellation: a client that goes away cancels its handler, which aborts its engine requests.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=False)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise OSError(f"http_port: cannot listen on {host}:{port} ({err.strerror}); pick a free port "
                      f"(kubellm worker --http-port N)") from err
    return runner, upstream, runner.addresses[0][1]

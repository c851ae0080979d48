"""What the REST gateway sends its calls to, and what such a call ends with when it cannot be answered (no torch).

Two upstreams satisfy `Upstream`: the router (its replicas, over gRPC) and a worker's own engine
(serving.worker_upstream, in-process). A call that cannot be answered raises `UpstreamError`; the
router's gRPC servicer aborts with its code, the gateway turns it into the HTTP error of the same
meaning. A module of its own so that the gateway, which the router serves, needs nothing from the
router's module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc

if TYPE_CHECKING:
    from aiohttp import web

    from kubellm.protos.v1 import llm_pb2


class UpstreamError(Exception):
    """A request could not be answered: a gRPC status code and a message for the caller; `retry_after`:
    seconds the caller should wait before retrying, where known (REST: a `Retry-After` header)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_after: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after


class Upstream(Protocol):
    """The calls of the REST gateway (typed messages in and out; failures raise UpstreamError)."""

    @property
    def deployment_name(self) -> str: ...   # the name the MII route and a reply without a model use

    @property
    def model_info(self) -> llm_pb2.ModelInfoResponse | None: ...   # known without a call, else None

    @property
    def replicas(self) -> Sequence: ...

    def healthy_replicas(self) -> Sequence: ...   # none: /health answers 503

    async def forward_unary(self, method: str, request, metadata=(), timeout: float | None = None): ...

    def forward_stream(self, request: llm_pb2.GenerateRequest, metadata=(),
                       timeout: float | None = None) -> AsyncIterator[llm_pb2.GenerateStreamResponse]: ...

    async def metrics_handler(self, request: web.Request) -> web.Response: ...

"""The router: one gRPC endpoint in front of a deployment's replica leaders (no torch).

One class, about 550 lines: resolving, health, the hold and retry rules and forwarding share its
replica state (the replicas themselves are replicas.py, the routing policies balancing.py, its gRPC
face router_service.py).

    router = Router("dns:///llm-leaders.ns.svc.cluster.local:50051", deployment_name="llm")
    port = await router.start(port=50051, rest_port=28080)   # gRPC (+ REST gateway and /metrics)
    await router.wait_for_termination()

Leaders come from a static list (`"h1:50051,h2:50051"`) or a DNS name (`dns:///name:port`,
re-resolved every `resolve_interval` seconds; every A record is a leader, ordered by address
so the order is stable). Each leader is health-checked (grpc.health.v1) every
`health_interval` seconds; only SERVING ones take requests. The routing policy (balancing.py)
orders the healthy leaders for each request: round_robin (the default: in turn, one step per
request), least_loaded (fewest requests in flight, as the router counts them) or prefix_affinity
(consistent hashing with bounded load over the prompt's leading text). A unary call that fails
with UNAVAILABLE (the replica went away) is retried on the next leader in that order; so is a
stream that fails before its first message.
While no leader is healthy (a lone group restarting, the gap between two groups of a rolling
update, a replaced pod not yet resolved, a deployment scaled to zero) a request is held up to
`wait_for_replica` seconds (and its own deadline) for one, re-resolving and checking meanwhile, and
is then served; only past that does it fail with UNAVAILABLE ("no healthy replica ... (scaled to zero,
or its replicas are starting or restarting); retry later"), telling the client to retry after
RETRY_AFTER (5 s: `retry-after` trailing metadata on gRPC, a `Retry-After` header on REST). At most
`max_waiting` calls are held at once; past that a new call fails at once, UNAVAILABLE, naming the
bound. `kubellm_router_requests_waiting` counts the calls held, from the moment each is held until
it gets a replica or fails: with `kubellm_router_in_flight`, what an autoscaler reads to scale the
deployment from zero.
With `scale_from_zero` (`--scale-from-zero`: the deployment's autoscaler may take it to 0 replicas)
the router's readiness stays SERVING while no replica is healthy, so that its Service keeps its
endpoints and the router holds the calls while the first group starts; ModelInfo then answers at
once from the router itself (the last ModelInfo a replica gave, else `model_name` with `replica=""`).
A stream cut after its first message ends with UNAVAILABLE naming the replica (its own name, learned
from ModelInfo, and its address). Other errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) pass
through unchanged. Metadata and deadlines are passed on; a cancelled client cancels the upstream call.

gRPC requests and replies are forwarded as raw bytes: the router registers the LLM methods with
identity (de)serializers on both sides, so the hot path never parses or re-serializes a
protobuf (prefix_affinity alone parses the request, for its prompt). The REST gateway uses the
same forwarding with typed messages (`raw=False`).

The router's own grpc.health.v1: "" and "kubellm.v1.LLM" are SERVING while at least one
replica is, or always with `scale_from_zero` (readiness; never while draining); "liveness" is SERVING
while the process runs (liveness probes).

On SIGTERM the router drains (`drain_and_stop`): readiness goes NOT_SERVING at once (liveness stays
SERVING), new calls are refused with UNAVAILABLE (a client retrying through the Service reaches
another router), and the calls it is forwarding finish, up to `drain_timeout` seconds; then it exits.
`/metrics` (Prometheus text) is on the REST port when the gateway is enabled, and on `metrics_port`;
the metrics port, always plain HTTP, also answers `/readyz` (200 while "" is SERVING, else 503) and
`/livez` (200 while the process runs): probes for a router whose gRPC port speaks TLS, which the
kubelet's gRPC probe cannot.

With `api_keys` (auth.ApiKeys: `--api-keys-dir`, $KUBELLM_API_KEY) the LLM methods need
`authorization: Bearer <key>` metadata and REST the same header (health, reflection, /health and
/metrics stay open); the key is never passed on to a replica. With `tls` (tls.ServerTls: `--tls-cert`,
`--tls-key`) the gRPC port serves TLS and the REST port HTTPS. docs/security.md.

`limits` (serving/limits.py; docs/limits.md): a gRPC request past `max_request_bytes` is refused by gRPC
itself (RESOURCE_EXHAUSTED), a connection carries at most `max_streams_per_connection` calls at once, and with
`rate_limit` each caller (its key's id, else its address) has one token bucket for Generate, GenerateStream
and the REST gateway's generation routes together.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import time

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from kubellm.metrics import CONTENT_TYPE
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.auth import ApiKeys, GrpcApiKeys
from kubellm.runtime.serving.balancing import make_balancer
from kubellm.runtime.serving.draining import drain
from kubellm.runtime.serving.gateway import build_app
from kubellm.runtime.serving.limits import Limits
from kubellm.runtime.serving.metrics import RouterMetrics
from kubellm.runtime.serving.reflection import add_reflection
from kubellm.runtime.serving.replicas import (MAX_MESSAGE, SERVICE_NAME, Replica, join_host_port, parse_leaders, resolve,
                                             upstream_call)
from kubellm.runtime.serving.router_service import RouterServicer
from kubellm.runtime.serving.tls import ServerTls
from kubellm.runtime.serving.unparsed import add_health_servicer
from kubellm.runtime.serving.upstream import UpstreamError

log = logging.getLogger("kubellm.router")

# Always SERVING while the process runs: for a liveness probe, which must not restart the router
# just because no replica is ready yet ("" and SERVICE_NAME follow the replicas: readiness).
LIVENESS_SERVICE = "liveness"

# Codes that mean "this replica did not handle the call": safe to send it to another one.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
# Codes that mean "the replica went away" when they end a stream that already sent messages.
_CUT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL}

SLOW_CHECKS_TO_FAIL = 3
LEAVING_GRACE = 60.0  # seconds a leader that left the Service keeps its calls in flight
# What a call that found no replica tells its client to wait before retrying (Retry-After): a replica
# takes seconds to minutes to start, and the retried call is itself held, so a short pause is enough.
RETRY_AFTER = 5.0
_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """The gRPC server's options: a request past max_request_bytes is refused by gRPC itself
    (RESOURCE_EXHAUSTED) before the router reads it; past max_streams_per_connection concurrent calls on one
    connection, the client's next call waits for one to end (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS)."""
    return [*_SERVER_OPTIONS, ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection)]



# --------------------------------------------------------------------------- router


class Router:
    """Balances over healthy replica leaders by `policy` (balancing.POLICIES). `forward_*` are usable
    without gRPC (the gateway)."""

    def __init__(self, leaders, deployment_name: str = "kubellm", *, allow_terminate: bool = False,
                 health_interval: float = 2.0, health_timeout: float = 1.0, resolve_interval: float = 5.0,
                 wait_for_replica: float = 30.0, policy: str = "round_robin", prefix_length: int = 256,
                 load_factor: float = 1.25, drain_timeout: float = 30.0, scale_from_zero: bool = False,
                 max_waiting: int = 1024, model_name: str = "", api_keys: ApiKeys | None = None,
                 tls: ServerTls | None = None, limits: Limits | None = None, tool_call_parser: str | None = None):
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting (--max-waiting) {max_waiting!r}: give a whole number, 0 or more "
                             "(the calls held at once while no replica is healthy; 0 holds none)")
        self.deployment_name = deployment_name
        self.model_name = model_name   # what the deployment serves: ModelInfo's answer before any replica gave one
        self.api_keys = api_keys   # None: no key asked for
        self.tool_call_parser = tool_call_parser   # the REST gateway's format of tool calls (None: auto)
        self.tls = tls             # None: plaintext gRPC and HTTP
        # Request size, streams per connection, the per-key rate limit (one bucket per caller for gRPC and REST).
        self.limits = limits or Limits()
        self.rate_limiter = self.limits.rate_limiter()
        # Readiness stays SERVING with no healthy replica: the deployment may be scaled to zero, and the
        # calls this router holds are what makes its autoscaler start a group.
        self.scale_from_zero = scale_from_zero
        self.max_waiting = max_waiting
        self._waiting = 0   # calls held for a healthy replica now (kubellm_router_requests_waiting)
        self.drain_timeout = drain_timeout
        self._draining = False
        self._active = 0   # forward_* calls not ended yet (holding, retrying or streaming): what a drain waits for
        self.policy = policy
        self.balancer = make_balancer(policy, prefix_length=prefix_length, load_factor=load_factor)
        self._order = self.balancer.order   # bound once: round robin's hot path costs what it did
        # While no replica is healthy (a group restarting, a rolling update between groups, a
        # replica that has just left), a request waits this long for one before UNAVAILABLE.
        self.wait_for_replica = wait_for_replica
        self._refresh_lock = asyncio.Lock()
        self._leaving: dict[asyncio.Task, Replica] = {}  # leaders that left, their channels closing with grace
        self.allow_terminate = allow_terminate
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.resolve_interval = resolve_interval
        self.dns_target, self._static = parse_leaders(leaders)
        self.replicas: list[Replica] = []
        self.metrics = RouterMetrics()
        # Read at each scrape from the router's own counts: nothing extra per request.
        self.metrics.registry.gauge("kubellm_router_in_flight", "Requests sent to the replica and not ended yet.",
                                    ("replica",), function=lambda: {(r.address,): r.in_flight for r in self.replicas})
        # With in_flight, what an autoscaler reads to scale a deployment from zero.
        self.metrics.registry.gauge("kubellm_router_requests_waiting",
                                    "Requests held waiting for a healthy replica (scale from zero, restarts).",
                                    function=lambda: self._waiting)
        self._tasks: list[asyncio.Task] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http_runners: list = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._last_resolve = 0.0
        self._resolve_error = ""
        self.model_info: llm_pb2.ModelInfoResponse | None = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self.metrics_port: int | None = None

    # ---- leaders and health

    async def _resolve(self) -> None:
        if self.dns_target is None:
            addresses = self._static
        else:
            try:
                addresses = await asyncio.get_running_loop().run_in_executor(None, resolve, self.dns_target)
            except OSError as err:
                # A headless Service with no ready pod has no name at all: expected while the groups
                # start, so said once per change rather than every few seconds.
                if str(err) != self._resolve_error:
                    log.warning("resolving %s failed: %s (keeping %d leaders; no ready leader pod yet?)",
                                self.dns_target, err, len(self.replicas))
                self._resolve_error = str(err)
                return
            self._resolve_error = ""
        current = {r.address: r for r in self.replicas}
        if list(current) == addresses:
            return
        replicas = [current.pop(a) if a in current else Replica.connect(a) for a in addresses]
        self.replicas = replicas
        self.balancer.update(replicas)
        for gone in current.values():
            log.info("leader %s left", gone.label)
            self.metrics.replicas.pop(gone.address, None)
            # A leader leaves the Service as soon as its pod terminates, while it still drains: let
            # its calls in flight finish (or fail on their own) before the channel goes.
            task = asyncio.ensure_future(gone.channel.close(grace=LEAVING_GRACE))
            self._leaving[task] = gone
            task.add_done_callback(lambda t: self._leaving.pop(t, None))
        log.info("leaders of %s: %s", self.deployment_name, ", ".join(addresses) or "none")

    async def _check(self, replica: Replica) -> None:
        try:
            reply = await replica.health_stub.Check(health_pb2.HealthCheckRequest(service=""),
                                                    timeout=self.health_timeout)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            reason = "" if ok else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as err:
            ok, reason = False, f"{err.code().name}: {err.details()}"
            # A busy replica may answer a check late; only a run of timeouts makes it unhealthy
            # (a refused connection or NOT_SERVING does at once).
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and replica.healthy:
                replica.slow_checks += 1
                if replica.slow_checks < SLOW_CHECKS_TO_FAIL:
                    return
        except Exception as err:  # noqa: BLE001 - a broken replica must not stop the loop
            ok, reason = False, repr(err)
        replica.slow_checks = 0
        if ok and not replica.healthy:  # (back) in service: learn its name, which a restart may change
            with contextlib.suppress(grpc.aio.AioRpcError):
                info = await replica.stub.ModelInfo(llm_pb2.ModelInfoRequest(), timeout=self.health_timeout)
                self.model_info = info   # what ModelInfo answers once the deployment is at zero again
                if info.replica != replica.name:
                    replica.name = info.replica
                    self.balancer.update(self.replicas)   # prefix_affinity places replicas by name
        if ok != replica.healthy:
            log.info("replica %s is %s", replica.address, "healthy" if ok else f"unhealthy ({reason})")
        replica.healthy, replica.reason = ok, reason
        self.metrics.replicas[replica.address] = ok

    async def refresh(self) -> None:
        """Resolve the leaders (if due, or while none is healthy) and health-check every one now."""
        now = time.monotonic()
        if not self.healthy_replicas() or now - self._last_resolve >= self.resolve_interval:
            self._last_resolve = now
            await self._resolve()
        await asyncio.gather(*(self._check(r) for r in list(self.replicas)))
        await self._publish_health()

    @property
    def ready(self) -> bool:
        """What readiness ("" and kubellm.v1.LLM health, /readyz) says: a replica to send to, or holding calls
        for one (scale from zero), and not draining."""
        return bool(self.scale_from_zero or self.healthy_replicas()) and not self._draining

    async def _publish_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001
                log.exception("refreshing the leaders failed")

    def healthy_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    @property
    def scaled_to_zero(self) -> bool:
        """No healthy replica, yet taking calls (holding them): a scale-from-zero router (REST /health: 200)."""
        return self.scale_from_zero and not self._draining and not self.healthy_replicas()

    def own_model_info(self) -> llm_pb2.ModelInfoResponse:
        """ModelInfo answered by the router itself (no replica to ask): the last one a replica gave, else
        the deployment's model with no replica."""
        if self.model_info is not None:
            return self.model_info
        return llm_pb2.ModelInfoResponse(model=self.model_name or self.deployment_name, replica="")

    def _candidates(self, key: int | None) -> list[Replica]:
        """The healthy replicas in the policy's order for one request (the first is its choice)."""
        return self._order([r for r in self.replicas if r.healthy], key)

    def _key(self, method: str, request, raw: bool) -> int | None:
        """What the policy hashes (prefix_affinity: the prompt's prefix), else None without a look."""
        if method == "ModelInfo":
            return None
        try:
            message = llm_pb2.GenerateRequest.FromString(request) if raw else request
        except Exception:  # noqa: BLE001 - not ours to judge: the worker answers INVALID_ARGUMENT
            return None
        return self.balancer.key(message)

    def _no_replica(self, last: tuple[Replica, grpc.aio.AioRpcError] | None, waited: float) -> UpstreamError:
        msg = f"no healthy replica of deployment {self.deployment_name}"
        if waited >= 0.05:
            msg += f" after waiting {waited:.0f} s"
        if last is not None:
            msg += f" (last error from replica {last[0].label}: {last[1].details()})"
        msg += ": it has no ready replica (scaled to zero, or its replicas are starting or restarting); retry later"
        return UpstreamError(grpc.StatusCode.UNAVAILABLE, msg, retry_after=RETRY_AFTER)

    async def _hold(self, until: float) -> bool:
        """Hold a call until a replica is healthy or `until` passes (True if one is), counted in
        `_waiting` all along; refused at once past `max_waiting` calls held."""
        if self._waiting >= self.max_waiting:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                f"{self.max_waiting} requests already waiting for a replica of deployment "
                                f"{self.deployment_name} (max_waiting); retry later", retry_after=RETRY_AFTER)
        self._waiting += 1
        try:
            return await self._await_healthy(until)
        finally:
            self._waiting -= 1

    async def _await_healthy(self, until: float) -> bool:
        """Wait until some replica is healthy or `until` passes; True if one is. One waiter at a
        time refreshes (resolve + health checks); the others poll what it finds."""
        while not self.healthy_replicas():
            if time.monotonic() >= until:
                return False
            if not self._refresh_lock.locked():
                async with self._refresh_lock:
                    await self.refresh()
            if not self.healthy_replicas():
                await asyncio.sleep(min(0.25, max(0.0, until - time.monotonic())))
        return True

    async def _mark_down(self, replica: Replica, err: grpc.aio.AioRpcError) -> None:
        if replica.healthy:
            log.warning("replica %s failed (%s: %s); skipping it until it is healthy again",
                        replica.label, err.code().name, err.details())
        self._last_resolve = 0.0  # it may have been replaced: look the leaders up again at once
        replica.healthy, replica.reason = False, f"{err.code().name}: {err.details()}"
        self.metrics.replicas[replica.address] = False
        await self._publish_health()

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left

    # ---- forwarding (used by the gRPC servicer and by the REST gateway)

    async def _attempts(self, method: str, timeout: float | None, key: int | None = None):
        """(replica, per-call timeout) in the policy's order; every attempt after the first is a retry.
        When every healthy replica has been tried (or none is), holds the call (`_hold`) up to
        `wait_for_replica` for one to become healthy and goes on; the caller stops at the first success.
        A scale-from-zero router's ModelInfo is never held: it ends here, for the router to answer."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        hold_until = min(start + self.wait_for_replica, deadline or math.inf)
        attempt = 0
        while True:
            for replica in self._candidates(key):
                if attempt:
                    self.metrics.retry(method)
                attempt += 1
                yield replica, self._remaining(deadline)
            # Every healthy replica tried (or none is): held, only now (the hot path never gets here).
            if not self.healthy_replicas():
                if method == "ModelInfo" and self.scale_from_zero:
                    return   # the router answers it itself (_forward_unary)
                if not await self._hold(hold_until):
                    return

    async def _retry_or_raise(self, replica: Replica, method: str, err: grpc.aio.AioRpcError, retryable: bool):
        """Record a failed call; return (replica, err) when the next replica should be tried, else raise."""
        self.metrics.request(replica.address, method, err.code())
        if retryable and err.code() in _RETRYABLE:
            await self._mark_down(replica, err)
            return replica, err
        raise UpstreamError(err.code(), err.details() or err.code().name) from None

    def _succeeded(self, replica: Replica, method: str, start: float) -> None:
        self.metrics.request(replica.address, method, grpc.StatusCode.OK)
        self.metrics.observe(method, time.monotonic() - start)

    async def forward_unary(self, method: str, request, metadata=(), timeout: float | None = None, *,
                            raw: bool = False):
        """Send `request` to `method` ("Generate", "ModelInfo") of the next healthy replica.

        `raw`: `request` and the reply are serialized bytes (the gRPC front end), else messages."""
        self._admit()
        try:
            return await self._forward_unary(method, request, metadata, timeout, raw)
        finally:
            self._active -= 1

    def _admit(self) -> None:
        """Count a new call in, or refuse it while draining (another router of the Service takes its retry)."""
        if self._draining:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                f"this router of deployment {self.deployment_name} is shutting down; retry "
                                "(the Service sends it to another router)")
        self._active += 1

    async def _forward_unary(self, method: str, request, metadata, timeout: float | None, raw: bool):
        start, last = time.monotonic(), None
        key = self._key(method, request, raw) if self.balancer.needs_key else None
        async for replica, remaining in self._attempts(method, timeout, key):
            stub = replica.raw_unary[method] if raw else getattr(replica.stub, method)
            call = stub(request, metadata=metadata, timeout=remaining)
            try:
                with upstream_call(replica, call):
                    response = await call
            except grpc.aio.AioRpcError as err:
                last = await self._retry_or_raise(replica, method, err, retryable=True)
                continue
            self._succeeded(replica, method, start)
            if method == "ModelInfo":
                self.model_info = llm_pb2.ModelInfoResponse.FromString(response) if raw else response
            return response
        if method == "ModelInfo" and self.scale_from_zero:   # never held: the router knows the answer
            info = self.own_model_info()
            return info.SerializeToString() if raw else info
        raise self._no_replica(last, time.monotonic() - start)

    async def forward_stream(self, request, metadata=(), timeout: float | None = None, *, raw: bool = False):
        """Async iterator over GenerateStream messages (bytes if `raw`) of the next healthy replica."""
        method = "GenerateStream"
        self._admit()
        try:
            start, last = time.monotonic(), None
            key = self._key(method, request, raw) if self.balancer.needs_key else None
            async for replica, remaining in self._attempts(method, timeout, key):
                stub = replica.raw_stream if raw else replica.stub.GenerateStream
                call = stub(request, metadata=metadata, timeout=remaining)
                received = False
                try:
                    with upstream_call(replica, call):
                        # call.read() rather than `async for`: one async generator less per message.
                        message = await call.read()
                        while message is not grpc.aio.EOF:
                            received = True
                            yield message
                            message = await call.read()
                except grpc.aio.AioRpcError as err:
                    if received and err.code() in _CUT:
                        self.metrics.request(replica.address, method, err.code())
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            await self._mark_down(replica, err)
                        raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                            f"replica {replica.label} of deployment {self.deployment_name} "
                                            f"failed mid-stream ({err.code().name}: {err.details()}); "
                                            f"the response is incomplete") from None
                    # Before the first message nothing reached the client, so another replica may answer.
                    last = await self._retry_or_raise(replica, method, err, retryable=not received)
                    continue
                finally:
                    if not call.done():
                        call.cancel()  # the client went away (or stopped reading): stop the replica's work
                self._succeeded(replica, method, start)
                return
            raise self._no_replica(last, time.monotonic() - start)
        finally:
            self._active -= 1

    async def terminate(self) -> bool:
        """Terminate every replica, then stop the router (only if allowed)."""
        if not self.allow_terminate:
            raise UpstreamError(grpc.StatusCode.PERMISSION_DENIED,
                                f"deployment {self.deployment_name} was not started with allow_terminate")

        async def one(replica: Replica):
            try:
                await replica.stub.Terminate(llm_pb2.TerminateRequest(), timeout=10)
            except grpc.aio.AioRpcError as err:
                log.warning("terminating replica %s: %s", replica.address, err.details())

        await asyncio.gather(*(one(r) for r in list(self.replicas)))
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self.stop(grace=1.0)))
        return True

    # ---- lifecycle

    async def start(self, port: int = 50051, host: str = "0.0.0.0", *, rest_port: int | None = None,
                    metrics_port: int | None = None) -> int:
        """Resolve and check the leaders once, then serve gRPC on `port` (0 picks one); returns it."""
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.refresh()
        interceptors = [GrpcApiKeys(self.api_keys)] if self.api_keys is not None else []
        server = grpc.aio.server(options=server_options(self.limits), interceptors=interceptors)
        RouterServicer(self).add_to_server(server)
        add_health_servicer(self._health, server)   # a request that does not parse: INVALID_ARGUMENT, not UNKNOWN
        add_reflection(server)   # from llm_pb2's descriptors: the LLM methods themselves pass raw bytes
        address = join_host_port(host, port)
        self.grpc_port = (server.add_secure_port(address, self.tls.grpc_credentials()) if self.tls is not None
                          else server.add_insecure_port(address))
        if not self.grpc_port:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        self._tasks.append(asyncio.create_task(self._refresh_loop()))
        if rest_port is not None:
            self.rest_port = await self._serve_http(build_app(self, api_keys=self.api_keys, limits=self.limits,
                                                              rate_limiter=self.rate_limiter,
                                                              tool_call_parser=self.tool_call_parser),
                                                    host, rest_port,
                                                    tls=self.tls)
            self.metrics_port = self.rest_port
        if metrics_port is not None:
            app = web.Application()
            app.router.add_get("/metrics", self.metrics_handler)
            app.router.add_get("/readyz", self.readyz)
            app.router.add_get("/livez", self.livez)
            self.metrics_port = await self._serve_http(app, host, metrics_port)   # plain HTTP: probes, Prometheus
        log.info("router of %s on :%d (%d/%d leaders healthy, policy %s, API keys %s, %s)", self.deployment_name,
                 self.grpc_port, len(self.healthy_replicas()), len(self.replicas), self.policy,
                 "required" if self.api_keys is not None else "off", "TLS" if self.tls is not None else "plaintext")
        return self.grpc_port

    async def metrics_handler(self, request):
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def readyz(self, request):
        """The metrics port's readiness probe: the "" health as HTTP (a TLS gRPC port cannot be probed by gRPC)."""
        ok = self.ready
        return web.Response(text="ok\n" if ok else "not ready\n", status=200 if ok else 503)

    async def livez(self, request):
        return web.Response(text="ok\n")

    async def _serve_http(self, app, host: str, port: int, tls: ServerTls | None = None) -> int:
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls.ssl_context() if tls is not None else None)
        await site.start()
        self._http_runners.append(runner)
        return runner.addresses[0][1]   # the bound (host, port, ...) of its one site: port 0 resolved

    async def drain_and_stop(self, timeout: float | None = None) -> bool:
        """SIGTERM: readiness NOT_SERVING and new calls refused at once; the calls in flight finish up to
        `timeout` s (default `drain_timeout`), then the router stops. True if they all finished."""
        if self._draining or self._stopping:
            return True
        timeout = self.drain_timeout if timeout is None else timeout
        self._draining = True
        await self._publish_health()
        drained = await drain(lambda: self._active, timeout, f"router of {self.deployment_name}", log)
        await self.stop(grace=1.0)
        return drained

    async def stop(self, grace: float | None = None) -> None:
        if self._stopping:
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        for runner in self._http_runners:
            await runner.cleanup()
        if self._server is not None:
            await self._server.stop(grace)
        for replica in [*self.replicas, *self._leaving.values()]:
            await replica.channel.close(grace=None)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def serve(leaders, *, port: int = 50051, host: str = "0.0.0.0", deployment_name: str = "kubellm",
                rest_port: int | None = None, metrics_port: int | None = None, allow_terminate: bool = False,
                health_interval: float = 2.0, resolve_interval: float = 5.0, wait_for_replica: float = 30.0,
                policy: str = "round_robin", prefix_length: int = 256, load_factor: float = 1.25,
                drain_timeout: float = 30.0, scale_from_zero: bool = False, max_waiting: int = 1024,
                model_name: str = "", api_keys: ApiKeys | None = None, tls: ServerTls | None = None,
                limits: Limits | None = None, tool_call_parser: str | None = None) -> None:
    """Run a router until SIGTERM/SIGINT (it drains, up to `drain_timeout` s) or an allowed Terminate (the
    `kubellm router` command)."""
    router = Router(leaders, deployment_name, allow_terminate=allow_terminate, health_interval=health_interval,
                    resolve_interval=resolve_interval, wait_for_replica=wait_for_replica, policy=policy,
                    prefix_length=prefix_length, load_factor=load_factor, drain_timeout=drain_timeout,
                    scale_from_zero=scale_from_zero, max_waiting=max_waiting, model_name=model_name,
                    api_keys=api_keys, tls=tls, limits=limits, tool_call_parser=tool_call_parser)
    await router.start(port, host, rest_port=rest_port, metrics_port=metrics_port)
    # Everything allocated so far (modules, gRPC, protobuf, aiohttp) lives as long as the process:
    # keep it out of the collector's full passes, which otherwise walk it again and again under load.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(router.drain_and_stop()))
        except (NotImplementedError, RuntimeError):
            pass
    await router.wait_for_termination()

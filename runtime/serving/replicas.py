"""The router's replicas: where the leaders are (a static list or a DNS name, re-resolved), and one
connection per leader with its health and the raw (bytes in, bytes out) methods the router forwards on.
No torch."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from kubellm.protos.v1 import llm_pb2_grpc

SERVICE_NAME = "kubellm.v1.LLM"
MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    # Come back quickly once a replica returns (the default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
_UNARY_METHODS = ("Generate", "ModelInfo")

def parse_leaders(spec: str | list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """`"dns:///name:port"` -> (that target, []); `"a:1,b:2"` or a list -> (None, [addresses])."""
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("dns:"):
            target = spec[len("dns:"):].lstrip("/")
            if "/" in target:  # dns://authority/name:port: the authority (a DNS server) is not supported
                target = target.rsplit("/", 1)[1]
            host, port = _split_host_port(target)
            if not host or not port:
                raise ValueError(f"--leaders {spec!r}: expected dns:///NAME:PORT")
            return f"{host}:{port}", []
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [s.strip() for s in spec if s and s.strip()]
    if not items:
        raise ValueError("--leaders: give at least one host:port, or dns:///NAME:PORT")
    for item in items:
        host, port = _split_host_port(item)
        if not host or not port:
            raise ValueError(f"--leaders: {item!r} is not host:port")
    return None, items


def _split_host_port(target: str) -> tuple[str, int | None]:
    if target.startswith("["):  # [v6]:port
        host, _, rest = target[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = target.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return host, None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(target: str) -> list[str]:
    """Every leader behind `host:port`: the A records (AAAA only if there is no A), sorted, deduplicated."""
    host, port = _split_host_port(target)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET}, key=ipaddress.ip_address)
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6}, key=ipaddress.ip_address)
    return [join_host_port(ip, port) for ip in (v4 or v6)]




def _cancelled_by_caller() -> bool:
    """Whether a CancelledError is this task being cancelled (the client went away), rather than
    an upstream call cancelled under it (its channel closed)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0


@contextlib.contextmanager
def upstream_call(replica: "Replica", call):
    """Around awaiting an upstream `call` (a whole stream included): counts it in the replica's
    `in_flight` while it lasts (what least_loaded and prefix_affinity weigh), and turns a
    CancelledError that is not the caller's own (the call's channel was closed under it) into
    UNAVAILABLE from that replica, never a silent cancel."""
    replica.in_flight += 1
    try:
        yield
    except asyncio.CancelledError:
        call.cancel()
        if _cancelled_by_caller():
            raise
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details=f"the connection to replica {replica.label} was closed") from None
    finally:
        replica.in_flight -= 1


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: llm_pb2_grpc.LLMStub            # typed messages (the REST gateway, Terminate)
    health_stub: health_pb2_grpc.HealthStub
    raw_unary: dict                        # method -> bytes-in, bytes-out multicallable (gRPC forwarding)
    raw_stream: grpc.aio.UnaryStreamMultiCallable
    healthy: bool = False
    reason: str = "not checked yet"
    slow_checks: int = 0   # consecutive health checks that timed out
    name: str = ""         # what the replica calls itself (ModelInfo.replica, e.g. llm-g0-0:50051)
    in_flight: int = 0     # calls sent to it that have not ended (the router's own count)

    @property
    def label(self) -> str:
        """How errors name the replica: its own name and, behind it, its address."""
        return f"{self.name} ({self.address})" if self.name and self.name != self.address else self.address

    @classmethod
    def connect(cls, address: str) -> "Replica":
        channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        # No serializers: requests and replies stay bytes. Registered methods spare gRPC core
        # from interning the method path on every call (`_registered_method` is private, as in the
        # generated stubs: grpcio is pinned and tests/protos/test_grpc_private_api.py guards it).
        raw_unary = {m: channel.unary_unary(f"/{SERVICE_NAME}/{m}", _registered_method=True)
                     for m in _UNARY_METHODS}
        raw_stream = channel.unary_stream(f"/{SERVICE_NAME}/GenerateStream", _registered_method=True)
        return cls(address, channel, llm_pb2_grpc.LLMStub(channel), health_pb2_grpc.HealthStub(channel),
                   raw_unary, raw_stream)

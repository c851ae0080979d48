"""gRPC server reflection (serving/reflection.py) on a bare asyncio server, read with grpcio-reflection's
own client; and a server without grpcio-reflection, which still starts and warns once."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from kubellm.runtime.serving import reflection

pytest.importorskip("grpc_reflection")

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase  # noqa: E402


async def _serve_and(probe):
    """A bare asyncio server (health + reflection, no LLM servicer), probe(port) run in a thread against it;
    (what add_reflection returned, what probe returned)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    added = reflection.add_reflection(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return added, await asyncio.to_thread(probe, port)
    finally:
        await server.stop(0)


def _described(port: int):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        return set(db.get_services()), db.FindFileContainingSymbol("kubellm.v1.LLM")


def _health_answers(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        return True


def test_reflection_lists_and_describes_the_llm_service_from_its_descriptors():
    # No LLM servicer is registered at all: what the router has (generic handlers of raw bytes) is enough.
    added, (services, proto) = asyncio.run(_serve_and(_described))
    assert added
    assert services == {"kubellm.v1.LLM", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert proto.name == "kubellm/v1/llm.proto" and proto.package == "kubellm.v1"
    assert [m.name for m in proto.service[0].method] == ["Generate", "GenerateStream", "ModelInfo", "Terminate"]


def test_without_grpcio_reflection_a_server_starts_and_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "grpc_reflection.v1alpha", None)   # the import fails as if not installed
    monkeypatch.setattr(reflection, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="kubellm.reflection"):
        for _ in range(2):
            assert asyncio.run(_serve_and(_health_answers)) == (False, True)
    warnings = [r for r in caplog.records if "grpcio-reflection is not installed" in r.getMessage()]
    assert len(warnings) == 1

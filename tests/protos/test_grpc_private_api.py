"""grpc's private `_registered_method` keyword, which the generated stubs (grpcio-tools emits it)
and the router's raw-bytes channels pass, and the private version helper the generated module
imports: this fails if grpc moves either, before the stubs break at import or call time.

pyproject.toml pins grpcio (<2: generated code must keep working on newer 1.x runtimes) and
grpcio-tools (the generator of the committed code); widen a pin only with this test passing.
"""

import importlib.metadata
import inspect
import tomllib
from pathlib import Path

import grpc
import grpc.aio
import grpc.experimental
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def requirements(extra: str) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["optional-dependencies"][extra])}


def test_installed_grpc_is_within_the_pins():
    for extra in ("runtime", "router"):
        grpcio = requirements(extra)["grpcio"]
        assert not grpcio.specifier.contains("2.0.0"), f"[{extra}] grpcio has an upper bound"
        assert grpcio.specifier.contains(grpc.__version__)
    tools = requirements("dev")["grpcio-tools"]
    assert tools.specifier.contains(importlib.metadata.version("grpcio-tools"))


@pytest.mark.parametrize("channel_class", [grpc.Channel, grpc.aio.Channel], ids=["sync", "aio"])
def test_channels_take_registered_method(channel_class):
    for kind in KINDS:
        assert "_registered_method" in inspect.signature(getattr(channel_class, kind)).parameters, kind


def test_concrete_channels_take_registered_method():
    sync = grpc.insecure_channel("localhost:1")
    try:
        for kind in KINDS:
            getattr(sync, kind)("/kubellm.v1.LLM/Generate", _registered_method=True)
    finally:
        sync.close()


async def _aio_channel_takes_it():
    channel = grpc.aio.insecure_channel("localhost:1")
    try:
        for kind in KINDS:
            getattr(channel, kind)("/kubellm.v1.LLM/Generate", _registered_method=True)
    finally:
        await channel.close()


def test_aio_channel_takes_registered_method():
    import asyncio

    asyncio.run(_aio_channel_takes_it())


def test_experimental_calls_and_version_helper_of_the_generated_module():
    from grpc._utilities import first_version_is_lower

    for kind in KINDS:
        assert "_registered_method" in inspect.signature(getattr(grpc.experimental, kind)).parameters, kind
    assert first_version_is_lower("1.84.0", "1.85.1") and not first_version_is_lower("1.85.1", "1.85.1")
    from kubellm.protos.v1 import llm_pb2_grpc

    assert not first_version_is_lower(grpc.__version__, llm_pb2_grpc.GRPC_GENERATED_VERSION)
    generated = (ROOT / "protos" / "v1" / "llm_pb2_grpc.py").read_text()
    assert "from grpc._utilities import first_version_is_lower" in generated and "_registered_method=True" in generated

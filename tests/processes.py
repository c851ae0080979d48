"""Helpers for tests that run real processes: free ports, waiting for gRPC health, a read-only root."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc


def e2e_binary(name: str) -> str | None:
    """`name` on PATH, else as e2e/build-control-plane.sh builds it (${KUBELLM_E2E_CACHE:-~/.cache/kubellm/e2e}/
    <k8s version>/bin); None where neither has it."""
    if shutil.which(name):
        return shutil.which(name)
    cache = os.environ.get("KUBELLM_E2E_CACHE", os.path.expanduser("~/.cache/kubellm/e2e"))
    found = [p for p in sorted(glob.glob(os.path.join(cache, "*", "bin", name))) if os.access(p, os.X_OK)]
    return found[-1] if found else None


def grpcurl_runner(path: str):
    """run(address, *words, data=None) -> stdout of `grpcurl -plaintext [-d DATA] ADDRESS WORDS...`
    (list / describe SYMBOL / a method), asserting it succeeded."""
    def run(address: str, *words: str, data: str | None = None) -> str:
        cmd = [path, "-plaintext", *(["-d", data] if data is not None else []), address, *words]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"
        return result.stdout
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = 90) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} never became SERVING")


def read_only_root(writable: list[Path]) -> list[str] | None:
    """A command prefix that runs what follows with the root filesystem read-only and a fresh tmpfs on
    each of `writable` (the pod's emptyDirs), in a private mount namespace (`unshare -m`, as root);
    None where this machine does not allow it. Nothing outside the namespace changes."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    script = ("mount -o remount,bind,ro / && " + "".join(f"mount -t tmpfs tmpfs '{d}' && " for d in writable)
              + 'exec "$@"')
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", "sh", "-c",
                            "! touch /.kubellm-probe 2>/dev/null"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]

"""Fixtures shared by the tests of local deployments (serve(), client(), kubellm serve)."""

import os
import signal

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private registry (KUBELLM_CACHE, inherited by the child processes), no KUBELLM_API_KEY from the caller's
    environment; every pid in it (and any added to the yielded set) killed and reaped afterwards."""
    monkeypatch.setenv("KUBELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("KUBELLM_API_KEY", raising=False)
    seen: set[int] = set()
    yield seen
    from kubellm.runtime.local import deployments, registry

    for entry in deployments.list_deployments():
        seen.update(registry.entry_pids(entry))
    for pid in seen:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in seen:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

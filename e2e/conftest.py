"""Fixtures for the end-to-end tests: a real local Kubernetes control plane (see cluster.py).

The ``cluster`` fixture needs the binaries from ``e2e/build-control-plane.sh``. Without them
the e2e tests are skipped, naming the command that builds them, unless
``KUBELLM_E2E_REQUIRED=1`` is set (as CI does): then a missing build is a test error.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _load_cluster_module():
    # Loaded by file path under a unique name: tests/ has its own conftest.py and helper
    # modules, so nothing here relies on e2e/ being on sys.path or on any import mode.
    name = "kubellm_e2e_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "cluster.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


e2e_cluster = _load_cluster_module()
_startup: list[str] = []


def _unavailable(reason: str):
    if os.environ.get("KUBELLM_E2E_REQUIRED", "") not in ("", "0"):
        pytest.fail(f"KUBELLM_E2E_REQUIRED is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """A started ``LocalCluster`` shared by the session: two fake nodes with 8 nvidia.com/gpu each."""
    bin_dir = e2e_cluster.default_bin_dir()
    missing = e2e_cluster.missing_binaries(bin_dir)
    if missing:
        _unavailable(f"the e2e control plane is not built ({', '.join(missing)} missing from {bin_dir}); "
                     f"build it with: bash e2e/build-control-plane.sh")
    if shutil.which("openssl") is None:
        _unavailable("the e2e cluster needs the `openssl` command")
    with e2e_cluster.LocalCluster(bin_dir) as c:
        _startup.append(f"e2e cluster (Kubernetes {c.versions['K8S_VERSION']}) started in {c.startup_seconds:.1f} s")
        yield c


@pytest.fixture(scope="session")
def real_cluster():
    """A started ``LocalCluster`` with one real node (containerd + kubelet + kube-proxy + CoreDNS)
    that holds the kubellm images; no fake nodes, so every pod really runs."""
    bin_dir = e2e_cluster.default_bin_dir()
    problems = [f"{', '.join(m)} missing from {bin_dir} (build with: bash e2e/build-control-plane.sh)"
                for m in [e2e_cluster.missing_binaries(bin_dir)] if m]
    problems += e2e_cluster.sibling("node").missing_prerequisites(bin_dir)
    if problems:
        _unavailable("the real-node cluster cannot start: " + "; ".join(problems))
    with e2e_cluster.LocalCluster(bin_dir, gpu_nodes=0, real_node=True) as c:
        _startup.append(f"real-node cluster (Kubernetes {c.versions['K8S_VERSION']}) started in {c.startup_seconds:.1f} s")
        yield c


def pytest_terminal_summary(terminalreporter):
    for line in _startup:
        terminalreporter.write_line(line)

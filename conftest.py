"""Test tiers, for every test under tests/ and e2e/ (markers registered in pyproject.toml):

- unit: in one process, seconds each; what is not marked otherwise. `pytest -m unit` runs in under a minute.
- model: loads a tiny model in this process (the engine against transformers, the Python API, kernels under
  Triton's interpreter).
- multiprocess: starts real worker, router or rank processes (gRPC over loopback, gloo groups).
- e2e: against a real local Kubernetes control plane (everything under e2e/).
- realpods: real pods on a real node (containerd + kubelet); also e2e.
- gpu: needs a CUDA GPU; skipped without one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TIERS = ("model", "multiprocess", "e2e", "realpods", "gpu")
_ROOT = Path(__file__).resolve().parent
_E2E = _ROOT / "e2e"


def _root_last() -> None:
    """The checkout's folders are kubellm's sub-packages (pyproject's package-dir), not top-level packages; yet
    `python -m pytest` puts the checkout first on sys.path, where kernels/ shadows Hugging Face's `kernels`,
    which transformers imports. So the checkout goes last (e2e.* and tests.* still resolve there), and the
    processes the tests start do not put their working directory first either (PYTHONSAFEPATH, Python 3.11+)."""
    at_root = [entry for entry in sys.path if Path(entry or ".").resolve() == _ROOT]
    sys.path[:] = [entry for entry in sys.path if entry not in at_root] + [str(_ROOT)]
    os.environ["PYTHONSAFEPATH"] = "1"
    try:   # imported now, Hugging Face's `kernels` stays the one imported when a test puts the checkout first again
        import kernels  # noqa: F401
    except ImportError:
        pass


_root_last()


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        if _E2E in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("gpu"):
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)

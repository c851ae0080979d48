"""`pip install '.[router]'` into a fresh virtual environment, with no torch, runs the router and the client.

The venv gets what the router image gets (docker/router.Dockerfile): kubellm installed from a copy of
the sources with the router extra, then the packages the image deletes (its `drop=` list: the
benchmarks, the engine, the executor, the kernels) deleted. In it, `kubellm router` serves a real
worker started from this environment, and the venv's own client generates through it, over gRPC
and REST. The venv's dependencies are cached by a hash of pyproject.toml
(``~/.cache/kubellm/test-venvs``); kubellm itself is installed again each run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from processes import free_port, wait_serving

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "docker" / "router.Dockerfile"
RECIPE = "1"  # bump to rebuild the cached venvs
TIMINGS: dict[str, float] = {}


def dropped_packages() -> list[str]:
    """The package folders (under kubellm/) that docker/router.Dockerfile deletes after its install."""
    match = re.search(r'\bdrop="([^"]+)"', DOCKERFILE.read_text())
    assert match, f"{DOCKERFILE.name}: no drop=\"...\" list of the packages the router image deletes"
    return match.group(1).split()


def _copy_sources(dest: Path) -> Path:
    """pyproject.toml, the README it names and every package folder it maps: what `pip install .` builds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dest)
    shutil.copy2(ROOT / project["project"]["readme"], dest)
    for folder in sorted(set(project["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# The venv's processes run outside the checkout, whose folders would shadow modules on sys.path ('' or
# the script's directory: `operator/` is the standard library's operator there), and with none of this
# environment's paths.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(cmd: list, what: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, env=ENV,
                            cwd=tempfile.gettempdir())
    TIMINGS[what] = round(time.monotonic() - started, 1)
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@pytest.fixture(scope="module")
def router_venv(tmp_path_factory) -> Path:
    """A venv holding kubellm[router] as the router image does; created once per pyproject.toml."""
    key = hashlib.sha256(b"\0".join([RECIPE.encode(), sys.version.encode(), (ROOT / "pyproject.toml").read_bytes()]))
    cache = Path(os.environ.get("KUBELLM_TEST_VENVS") or Path.home() / ".cache" / "kubellm" / "test-venvs")
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"router-{key.hexdigest()[:16]}"
    src = _copy_sources(tmp_path_factory.mktemp("router-src") / "kubellm")
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
        if not (venv / ".complete").is_file():
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", venv], "python -m venv")
            # What the image runs: the project's build backend fetched by pip, then kubellm[router].
            _run([*pip, "install", "--quiet", f"{src}[router]"], "pip install .[router] (fresh venv)")
            # Later runs reinstall kubellm alone, without fetching the build backend again.
            build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
            _run([*pip, "install", "--quiet", *build], "pip install the build backend")
            (venv / ".complete").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            for old in cache.glob("router-*"):
                if old != venv:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            _run([*pip, "install", "--quiet", "--no-build-isolation", f"{src}[router]"], "pip install .[router] (cached venv)")
        site = _site_packages(venv) / "kubellm"
        for package in dropped_packages():
            shutil.rmtree(site / package)
    for what, seconds in TIMINGS.items():
        print(f"\n{what}: {seconds} s", end="")
    return venv


def test_the_router_venv_has_no_torch_and_none_of_what_the_image_drops(router_venv):
    python = router_venv / "bin" / "python"
    site = _site_packages(router_venv)
    assert (site / "kubellm" / "runtime" / "serving" / "router.py").is_file()  # installed, not a link to the checkout
    for module in ("torch", "transformers", "kubellm.runtime.engine", "kubellm.runtime.executor", "kubellm.kernels",
                   "kubellm.bench"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=60,
                               env=ENV, cwd=tempfile.gettempdir())
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (module, probe.stderr)
    # The entry point works there: the parser, and the router's own command (its help, without torch).
    _run([router_venv / "bin" / "kubellm", "--help"], "kubellm --help (venv)")
    _run([router_venv / "bin" / "kubellm", "router", "--help"], "kubellm router --help (venv)")


def test_the_proto_and_reflection_ship_with_the_package(router_venv):
    """What a Go or Java client generates its stubs from (docs/grpc.md), in a real (non-editable) install;
    and grpcio-reflection, which the router extra brings for `grpcurl list`."""
    proto = _site_packages(router_venv) / "kubellm" / "protos" / "kubellm" / "v1" / "llm.proto"
    assert proto.read_text() == (ROOT / "protos" / "kubellm" / "v1" / "llm.proto").read_text()
    found = _run([router_venv / "bin" / "python", "-c", "import importlib.resources as r, grpc_reflection; "
                  "print(r.files('kubellm.protos').joinpath('kubellm/v1/llm.proto').is_file())"], "the proto found")
    assert found.stdout.strip() == "True"


CLIENT = """
import json, sys, urllib.request
from kubellm.runtime.serving.client import Client
address, rest = sys.argv[1], sys.argv[2]
with Client(address, timeout=60) as client:
    [unary] = client.generate("Hello, world!", max_new_tokens=6, temperature=0.0)
    streamed = "".join(d.text for d in client.stream("Hello, world!", max_new_tokens=6, temperature=0.0))
body = json.dumps({"model": "tiny", "prompt": "Hello, world!", "max_tokens": 6, "temperature": 0}).encode()
request = urllib.request.Request(rest + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as reply:
    completion = json.load(reply)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy"))
print(json.dumps({"unary": unary.text, "replica": unary.replica, "tokens": unary.generate_token_len,
                  "streamed": streamed, "rest": completion["choices"][0]["text"], "heavy": heavy}))
"""


def test_router_and_client_from_the_venv_serve_a_real_worker(router_venv, tiny_llama, tmp_path):
    """A worker of this environment (torch) behind `kubellm router` of the venv, called by the venv's client."""
    worker_port, router_port, rest_port = free_port(), free_port(), free_port()
    config = tmp_path / "engine.json"
    config.write_text('{"num_kv_blocks": 128, "block_size": 4, "max_batch_size": 4, "device": "cpu"}')
    log = open(tmp_path / "processes.log", "wb")
    procs = []
    try:
        started = time.monotonic()
        procs.append(subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", "worker", "--model",
                                       str(tiny_llama), "--config", str(config), "--host", "127.0.0.1",
                                       "--port", str(worker_port), "--replica", "worker-0"],
                                      stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([router_venv / "bin" / "kubellm", "router", "--leaders",
                                       f"127.0.0.1:{worker_port}", "--host", "127.0.0.1", "--port", str(router_port),
                                       "--rest-port", str(rest_port), "--deployment-name", "tiny",
                                       "--health-interval", "0.3", "--policy", "prefix_affinity"],  # parses requests
                                      stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                      cwd=tmp_path))
        wait_serving(f"127.0.0.1:{worker_port}")
        wait_serving(f"127.0.0.1:{router_port}", timeout=30)  # SERVING once it sees the healthy worker
        TIMINGS["worker and router serving"] = round(time.monotonic() - started, 1)
        result = _run([router_venv / "bin" / "python", "-c", CLIENT, f"127.0.0.1:{router_port}",
                       f"http://127.0.0.1:{rest_port}"], "the venv's client: generate, stream, REST")
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["replica"] == "worker-0" and out["tokens"] == 6 and out["unary"], out
        assert out["streamed"] == out["unary"] == out["rest"], out
        assert out["heavy"] == [], out
        procs[1].terminate()  # SIGTERM, as the kubelet stops the router pod
        assert procs[1].wait(15) == 0, (tmp_path / "processes.log").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(15)
        log.close()
    print("\n" + ", ".join(f"{what}: {seconds} s" for what, seconds in TIMINGS.items()))

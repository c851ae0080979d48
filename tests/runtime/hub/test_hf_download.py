"""`kubellm models download hf://...` (the worker pods' init container) against a Hugging Face–compatible
endpoint: e2e/hf_mirror.py, a test fixture serving a tiny random checkpoint, with a token it checks.

Each download runs as a `kubellm` process, as the init container does: HF_ENDPOINT / HF_TOKEN /
HF_HOME as the operator sets them, HOME unwritable (the container's root is read-only), stderr not a
terminal. The downloaded model must load and give the same greedy tokens as the original directory.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

from e2e.hf_mirror import HFMirror  # noqa: E402
from kubellm.runtime.hub.cache import is_complete# noqa: E402

REPO, TOKEN = "org/tiny", "hf_s3cret-test-token"


pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def mirror(tiny_llama):
    with HFMirror(tiny_llama, REPO, token=TOKEN) as m:
        yield m


def download(source: str, dest: Path, endpoint: str, token: str | None = TOKEN, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE")) and k != "HOME"}
    env.update(HOME="/nonexistent", HF_ENDPOINT=endpoint, HF_HOME=str(dest.parents[2] / ".hf-home"), **extra_env)
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", "models", "download", source, "--dest",
                           str(dest)], env=env, capture_output=True, text=True, timeout=120)


def model_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def greedy(path) -> list[list[int]]:
    from kubellm import pipeline

    pipe = pipeline(str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4, show_progress=False)
    try:
        return [r.token_ids for r in pipe(["Hello, world!", "The capital of France is"], max_new_tokens=8,
                                          ignore_eos=True)]
    finally:
        pipe.destroy()


def test_download_with_the_token_loads_and_generates_as_the_original(mirror, tiny_llama, tmp_path):
    dest = tmp_path / "models" / "hf" / REPO
    before = len(mirror.requests)
    result = download(f"hf://{REPO}", dest, mirror.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dest)
    assert "\r" not in result.stderr and "downloaded org/tiny: " in result.stderr
    assert model_files(dest) == model_files(tiny_llama)   # every file, byte for byte; no resume metadata
    assert [p.name for p in dest.parent.iterdir()] == ["tiny"]   # the partial directory was renamed into place
    requests = mirror.requests[before:]
    assert requests and all(ok for _, _, ok in requests), requests   # the token went with every request
    paths = [path for _, path, _ in requests]
    assert any(p.startswith(f"/api/models/{REPO}/revision/main") for p in paths)
    assert any(f"/{REPO}/resolve/" in p and p.endswith("model.safetensors") for p in paths)
    assert not any("agent-harnesses" in p for p in paths)   # no telemetry calls
    assert greedy(dest) == greedy(tiny_llama)

    # A complete destination is kept: nothing is fetched, even offline (a restarted pod on a cache PVC).
    before = len(mirror.requests)
    again = download(f"hf://{REPO}", dest, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and again.stdout.strip() == str(dest), again.stderr
    assert len(mirror.requests) == before


def test_a_pinned_revision_and_a_missing_one(mirror, tmp_path):
    dest = tmp_path / "models" / "hf" / REPO
    result = download(f"hf://{REPO}@{mirror.commit}", dest, mirror.url)
    assert result.returncode == 0 and is_complete(dest), result.stderr
    missing = download(f"hf://{REPO}@v9", tmp_path / "other" / "hf" / REPO, mirror.url)
    assert missing.returncode == 2 and "revision 'v9'" in missing.stderr, missing.stderr
    unknown = download("hf://org/nope", tmp_path / "nope" / "hf" / "org" / "nope", mirror.url)
    assert unknown.returncode == 2 and "no repository org/nope" in unknown.stderr, unknown.stderr


@pytest.mark.parametrize("token, says", [(None, "no token was sent"), ("hf_wrong", "the token in HF_TOKEN was refused")])
def test_a_missing_or_wrong_token_fails_clearly_and_leaves_no_model(mirror, tmp_path, token, says):
    dest = tmp_path / "models" / "hf" / REPO
    result = download(f"hf://{REPO}", dest, mirror.url, token=token)
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("kubellm: error: ") and "Traceback" not in result.stderr
    assert "HTTP 401" in message and says in message and "HF_TOKEN" in message and "tokenSecret" in message, message
    assert mirror.url in message
    assert not dest.exists()
    leftovers = [p for p in dest.parent.iterdir()] if dest.parent.exists() else []
    assert not any(is_complete(p) for p in leftovers), leftovers


def test_an_unreachable_endpoint_is_named(tmp_path):
    result = download(f"hf://{REPO}", tmp_path / "models" / "hf" / REPO, "http://127.0.0.1:9")
    assert result.returncode == 2 and "cannot reach http://127.0.0.1:9 (HF_ENDPOINT" in result.stderr, result.stderr
    assert not (tmp_path / "models" / "hf" / REPO).exists()


def local_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (a pod reaches the mirror on the node's)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[3].split("/")[0] for line in out.splitlines()
            if len(line.split()) > 3 and not line.split()[3].startswith("127.")]


def test_the_mirror_as_a_command_on_a_non_loopback_address(tiny_llama, tmp_path):
    addresses = local_addresses()
    host = addresses[0] if addresses else "127.0.0.1"   # loopback only: still the command line
    proc = subprocess.Popen([sys.executable, str(ROOT / "e2e" / "hf_mirror.py"), str(tiny_llama), REPO,
                             "--token", TOKEN, "--host", host, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "test fixture" in line, line
        url = line.split(" on ")[1].split()[0]
        assert url.startswith(f"http://{host}:")
        dest = tmp_path / "models" / "hf" / REPO
        result = download(f"hf://{REPO}", dest, url)
        assert result.returncode == 0 and model_files(dest) == model_files(tiny_llama), result.stderr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_download_cut_midway_leaves_no_model_at_dest_and_resumes(tiny_llama, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name, data in model_files(tiny_llama).items():
        (served / name).write_bytes(data)
    dest = tmp_path / "models" / "hf" / REPO
    with HFMirror(served, REPO, token=TOKEN) as m:
        weights = (served / "model.safetensors").read_bytes()
        (served / "model.safetensors").unlink()   # listed by the mirror, then fails with HTTP 500
        result = download(f"hf://{REPO}", dest, m.url)
        assert result.returncode == 2 and "HTTP 500" in result.stderr, result.stderr
        assert not dest.exists()   # the files that did arrive wait in a hidden partial directory
        [partial] = dest.parent.iterdir()
        assert partial.name.startswith(".tiny.partial-") and (partial / "config.json").is_file()
        (served / "model.safetensors").write_bytes(weights)
        again = download(f"hf://{REPO}", dest, m.url)
        assert again.returncode == 0, again.stderr
    assert model_files(dest) == model_files(tiny_llama) and [p.name for p in dest.parent.iterdir()] == ["tiny"]


@pytest.mark.parametrize("read_only", [False, True], ids=["home-unwritable", "read-only-root"])
def test_the_rendered_init_container_then_the_rendered_worker(mirror, tiny_llama, tmp_path, read_only):
    """The hf:// pod as the operator renders it: the init container's command and env (the endpoint, the
    token from the Secret) download into the models volume, then the worker's command loads its --model.
    read-only-root: both in one private mount namespace with / read-only and tmpfs emptyDirs (/models,
    /tmp), as under readOnlyRootFilesystem."""
    from kubellm.operator import resources as R
    from kubellm.api.spec import LLMDeploymentSpec
    from kubellm.runtime.serving.client import Client
    from processes import free_port, wait_serving
    from processes import read_only_root

    spec = LLMDeploymentSpec.model_validate({
        "model": {"source": f"hf://{REPO}", "endpoint": mirror.url, "tokenSecret": "hf-token"}, "device": "cpu",
        "engine": {"dtype": "float32", "blockSize": 4, "sessionLen": 64, "kvCacheFraction": 0.02}})
    owner = R.Owner("tiny", "team-a", "uid")
    pod = R.worker_statefulset(owner, spec, 0)["spec"]["template"]["spec"]
    cm = R.engine_configmap(owner, spec)
    volumes = {R.MODELS_MOUNT: tmp_path / "models", R.SCRATCH: tmp_path / "tmp", R.CONFIG_MOUNT: tmp_path / "config"}
    for path in volumes.values():
        path.mkdir()
    for key, text in cm["data"].items():
        (volumes[R.CONFIG_MOUNT] / key).write_text(text)
    prefix = read_only_root([volumes[R.MODELS_MOUNT], volumes[R.SCRATCH]]) if read_only else []
    if prefix is None:
        pytest.skip("no private mount namespace here (needs root and unshare)")

    def local(value: str) -> str:
        for mount, path in volumes.items():
            if value == mount or value.startswith(mount + "/"):
                return str(path) + value[len(mount):]
        return value

    def environment(container) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HOME"}
        for var in container["env"]:
            if "value" in var:
                env[var["name"]] = local(var["value"])
            elif var["name"] == "HF_TOKEN":
                assert var["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
                env["HF_TOKEN"] = TOKEN   # what the kubelet reads from the Secret
            elif var["name"] == "POD_INDEX":
                env["POD_INDEX"] = "0"
        env.update(HOME="/nonexistent", CUDA_VISIBLE_DEVICES="")   # the image's home is on a read-only root
        return env

    [init] = pod["initContainers"]
    [worker] = pod["containers"]
    init_command = [sys.executable, "-m", "kubellm.runtime.cli.main", *map(local, init["command"][1:])]
    command = [local(a) for a in worker["command"][1:]]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    command[command.index("--metrics-port") + 1] = str(free_port())
    worker_command = [sys.executable, "-m", "kubellm.runtime.cli.main", *command]
    # The pod: the init container to completion, then the worker, each with its own environment.
    init_env = [f"{k}={v}" for k, v in environment(init).items()]
    script = f"env -i {shlex.join(init_env)} {shlex.join(init_command)} && exec {shlex.join(worker_command)}"
    log = tmp_path / "pod.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*prefix, "sh", "-c", script], env=environment(worker), stdout=out, stderr=out)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            got = [r.token_ids for r in client.generate(["Hello, world!", "The capital of France is"],
                                                        max_new_tokens=8, ignore_eos=True)]
        assert got == greedy(tiny_llama)
        text = log.read_text()
        assert "downloaded org/tiny: 6 files" in text and "Read-only file system" not in text, text
        if not read_only:
            model = Path(command[command.index("--model") + 1])
            assert model_files(model) == model_files(tiny_llama)
    except BaseException:
        print(log.read_text())
        raise
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_repository_with_only_a_pytorch_checkpoint(tiny_llama, tmp_path):
    """Older Hub models (and PiPPy's examples) have pytorch_model*.bin and no safetensors: fetched and served."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime" / "executor"))
    from test_pytorch_checkpoints import save_bin

    bin_only = save_bin(tiny_llama, tmp_path / "bin-only", max_shard_size=60_000)
    with HFMirror(bin_only, REPO, token=TOKEN) as bin_mirror:
        dest = tmp_path / "models" / "hf" / REPO
        result = download(f"hf://{REPO}", dest, bin_mirror.url)
        assert result.returncode == 0, result.stderr
        assert model_files(dest) == model_files(bin_only)
        assert is_complete(dest) and not list(dest.glob("*.safetensors"))
    assert greedy(dest) == greedy(tiny_llama)

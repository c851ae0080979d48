"""The worker and router pods exactly as the operator renders them.

Without a cluster: the rendered worker command is parsed by `kubellm worker`'s own argparse parser,
every file it is told to read must be a key of the ConfigMap mounted there (and every key must be
read: a setting written but never passed is silently ignored on Kubernetes, as `spec.generation`
once was), and the files' JSON must turn, through the worker's own code, into the runtime's
EngineConfig / GenerationConfig with the spec's values.

Then the rendered commands run as real processes on a tiny checkpoint, with the ConfigMap's two
files written to a temporary directory, stdout/stderr piped (as in a pod, not a terminal), HOME
unwritable and only a scratch directory writable — with the whole root filesystem read-only (a
private mount namespace) where the machine allows it: the generation defaults take effect, and
the log shows the load with progress, as `kubectl logs` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kubellm.operator import resources as R
from kubellm.api.spec import EngineSpec, GenerationSpec, LLMDeploymentSpec
from kubellm.runtime.cli.main import build_parser, command as command_of
from kubellm.runtime.cli.router import router as cmd_router
from kubellm.runtime.cli.worker import worker as cmd_worker, worker_configs
from kubellm.runtime.config import GenerationConfig

OWNER = R.Owner("demo", "team-a", "uid-1")
SPECS = {
    "defaults": {"model": {"source": "hf://org/name"}},
    "cpu-generation": {"model": {"source": "/opt/models/tiny"}, "device": "cpu",
                       "generation": {"maxNewTokens": 17, "temperature": 0.7, "topP": 0.9, "topK": 40,
                                      "repetitionPenalty": 1.1},
                       "engine": {"dtype": "float32", "maxBatchSize": 8, "blockSize": 32, "kvCacheFraction": 0.5,
                                  "maxNumBatchedTokens": 1024, "enablePrefixCaching": False}},
    "pvc-two-pod-group": {"model": {"source": "pvc://weights/llama/8b"}, "tensorParallel": 2, "gpusPerPod": 1,
                          "generation": {"maxNewTokens": 5}},
    "hf-gated-pipeline": {"model": {"source": "hf://org/gated@v2", "tokenSecret": "hf-token",
                                    "endpoint": "http://mirror.example:8080", "cachePVC": "cache"},
                          "pipelineParallel": 2, "replicas": 2,
                          "engine": {"sessionLen": 4096, "dtype": "bfloat16"}, "generation": {"temperature": 1.3}},
    "known-name": {"model": {"source": "smollm2-135m"}, "device": "cpu", "restApi": {"enabled": True}},
}


pytestmark = pytest.mark.multiprocess


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def rendered(spec: LLMDeploymentSpec) -> tuple[dict, dict]:
    """(the ConfigMap, the pod spec of group 0), both taken from R.children as the operator applies them."""
    children = R.children(OWNER, spec)
    [cm] = [c for c in children if c["kind"] == "ConfigMap"]
    sts = next(c for c in children if c["kind"] == "StatefulSet")
    return cm, sts["spec"]["template"]["spec"]


def parse(command: list[str], func):
    assert command[0] == "kubellm"
    args = build_parser().parse_args(command[1:])
    assert command_of(args) is func, command
    return args


def mount_of(container: dict, pod: dict, path: str) -> tuple[dict, dict] | None:
    """(volumeMount, volume) under which `path` lies in this container, the deepest mount first."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return mount, next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return None


@pytest.mark.parametrize("name", SPECS)
def test_every_file_the_worker_reads_is_mounted_and_every_configmap_key_is_read(name):
    spec = LLMDeploymentSpec.model_validate(SPECS[name])
    cm, pod = rendered(spec)
    [worker] = pod["containers"]
    args = parse(worker["command"], cmd_worker)
    read_from_configmap = set()
    for option, value in vars(args).items():
        if not (isinstance(value, str) and value.startswith("/")):
            continue
        found = mount_of(worker, pod, value)
        if option == "model":  # a directory: on the models volume (hf://, pvc://) or in the image
            if spec.model.kind in ("hf", "pvc"):
                assert found and found[1]["name"] == "models", (value, found)
            else:
                assert found is None, f"--model {value} is hidden under the mount {found}"
            continue
        # Any other path is a file the worker opens: only the ConfigMap puts files there.
        assert found is not None, f"--{option.replace('_', '-')} {value} is on no volume of the worker"
        mount, volume = found
        assert volume.get("configMap", {}).get("name") == cm["metadata"]["name"], (option, volume)
        key = value[len(mount["mountPath"]):].lstrip("/")
        assert key in cm["data"], f"--{option.replace('_', '-')} {value}: the ConfigMap has no key {key!r}"
        read_from_configmap.add(key)
    unread = set(cm["data"]) - read_from_configmap
    assert not unread, f"the ConfigMap's {sorted(unread)} is mounted but the worker is never told to read it"
    assert args.generation_defaults, "the worker is not passed the generation defaults"


@pytest.mark.parametrize("name", SPECS)
def test_the_configmaps_json_is_the_specs_engine_and_generation_through_the_workers_code(name, tmp_path):
    spec = LLMDeploymentSpec.model_validate(SPECS[name])
    cm, pod = rendered(spec)
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
    args = parse([a.replace(R.CONFIG_MOUNT, str(tmp_path)) for a in pod["containers"][0]["command"]], cmd_worker)
    engine, defaults = worker_configs(args)   # what cmd_worker does with the files
    generation = GenerationConfig.build(**defaults)
    for field in GenerationSpec.model_fields:   # every spec field reaches the runtime, by its snake_case name
        assert getattr(generation, snake(field)) == getattr(spec.generation, field), field
    for field in EngineSpec.model_fields:
        assert getattr(engine, snake(field)) == getattr(spec.engine, field), field
    assert (engine.tensor_parallel, engine.pipeline_parallel) == (spec.tensorParallel, spec.pipelineParallel)
    assert engine.device == ("cpu" if spec.device == "cpu" else "auto")


# -- the rendered commands as processes ------------------------------------------------------------
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from kubellm.runtime.serving.client import Client  # noqa: E402
from processes import free_port, read_only_root, wait_serving  # noqa: E402

POD_SPEC = {"device": "cpu", "restApi": {"enabled": True},
            "engine": {"dtype": "float32", "maxBatchSize": 4, "blockSize": 4, "sessionLen": 64,
                       "kvCacheFraction": 0.02},
            "generation": {"maxNewTokens": 7, "temperature": 1.5, "topK": 50}}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (what the kubelet sends), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pod_environment(container: dict, scratch: Path) -> dict:
    """The container's env as the kubelet would set it (POD_INDEX 0), its scratch paths moved to
    `scratch`, HOME unwritable (the image's home is on a read-only root) and only TMPDIR writable."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TMPDIR")}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"].replace(R.SCRATCH, str(scratch), 1) \
                if var["value"].startswith(R.SCRATCH) else var["value"]
        elif "POD_INDEX" == var["name"]:
            env["POD_INDEX"] = "0"
    env.update(HOME="/nonexistent", TMPDIR=str(scratch), CUDA_VISIBLE_DEVICES="")
    return env


def with_ports(command: list[str], ports: dict[str, int]) -> list[str]:
    command = list(command)
    for flag, port in ports.items():
        command[command.index(flag) + 1] = str(port)
    return command


@pytest.fixture(scope="module")
def pod(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    config_dir, scratch = root / "etc-kubellm", root / "tmp"
    config_dir.mkdir()
    scratch.mkdir()
    spec = LLMDeploymentSpec.model_validate({"model": {"source": str(tiny_llama)}, **POD_SPEC})
    cm, pod_spec = rendered(spec)
    for key, text in cm["data"].items():
        (config_dir / key).write_text(text)
    [worker] = pod_spec["containers"]
    port, metrics_port = free_port(), free_port()
    command = with_ports([a.replace(R.CONFIG_MOUNT, str(config_dir)) for a in worker["command"]],
                         {"--port": port, "--metrics-port": metrics_port, "--http-port": free_port()})
    log_path = root / "worker.log"
    procs = []
    read_only = read_only_root([scratch])   # as readOnlyRootFilesystem, where this machine allows it
    with open(log_path, "wb") as log:   # a file: stderr is not a terminal, as in a pod
        procs.append(subprocess.Popen([*(read_only or []), sys.executable, "-m", "kubellm.runtime.cli.main",
                                       *command[1:]], stdout=log, stderr=log, env=pod_environment(worker, scratch),
                                      cwd=scratch))
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120)
        yield {"spec": spec, "port": port, "log": log_path, "scratch": scratch, "procs": procs,
               "read_only_root": read_only is not None,
               "router": R.router_deployment(OWNER, spec)["spec"]["template"]["spec"]["containers"][0]}
    finally:
        for proc in procs:
            stop(proc)


def test_generation_defaults_take_effect_in_the_rendered_worker(pod):
    max_new = pod["spec"].generation.maxNewTokens
    with Client(f"127.0.0.1:{pod['port']}", timeout=60) as client:
        # No max_new_tokens in the request: spec.generation.maxNewTokens (ignore_eos: a random model may end early).
        [reply] = client.generate("Hello", ignore_eos=True)
        assert reply.generated_length == max_new
        assert client.generate("Hello", ignore_eos=True, max_new_tokens=3)[0].generated_length == 3
        # temperature 1.5 / top-k 50 by default: seeded samples, not the greedy text
        greedy = client.generate("Once upon a time", ignore_eos=True, temperature=0.0)[0].token_ids
        sampled = [client.generate("Once upon a time", ignore_eos=True, random_seed=s)[0].token_ids for s in (1, 2, 3)]
        assert any(ids != greedy for ids in sampled), (greedy, sampled)
        assert client.generate("Once upon a time", ignore_eos=True, random_seed=1)[0].token_ids == sampled[0]


def test_the_worker_served_from_a_read_only_root(pod):
    if not pod["read_only_root"]:
        pytest.skip("no private mount namespace here (needs root and unshare): the worker ran with HOME "
                    "unwritable only")
    assert "Read-only file system" not in pod["log"].read_text()


def test_worker_log_shows_the_load_with_progress_in_plain_lines(pod):
    text = pod["log"].read_text()
    assert "\r" not in text, "a carriage-return progress bar in a pod's log"
    progress = re.findall(r"loading weights: (\d+)/(\d+) tensors \((\d+)%\), [\d.]+ [MG]B$", text, re.M)
    assert len(progress) >= 3, text
    done = [int(d) for d, _, _ in progress]
    assert done == sorted(done) and progress[-1][0] == progress[-1][1] and progress[-1][2] == "100", progress
    assert re.search(r"model \S+ loaded in \d+\.\d s", text), text
    assert re.search(rf"serving on port {pod['port']}$", text, re.M), text


def test_rendered_router_serves_the_worker_without_a_writable_home(pod, tmp_path):
    container = pod["router"]
    args = parse(container["command"], cmd_router)
    assert args.rest_port == pod["spec"].restApi.port
    port, rest_port, metrics_port = free_port(), free_port(), free_port()
    command = with_ports(container["command"], {"--port": port, "--rest-port": rest_port,
                                                "--metrics-port": metrics_port})
    command[command.index("--leaders") + 1] = f"127.0.0.1:{pod['port']}"   # no cluster DNS here
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with open(tmp_path / "router.log", "wb") as log:
        router = subprocess.Popen([*(read_only_root([scratch]) or []), sys.executable, "-m", "kubellm.runtime.cli.main",
                                   *command[1:]], stdout=log, stderr=log, env=pod_environment(container, scratch),
                                  cwd=scratch)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            assert client.generate("Hello", ignore_eos=True)[0].generated_length == pod["spec"].generation.maxNewTokens
        request = urllib.request.Request(f"http://127.0.0.1:{rest_port}/mii/{OWNER.name}", method="POST",
                                         data=json.dumps({"prompts": ["Hello"], "ignore_eos": True}).encode())
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    [out] = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert out["generated_length"] == pod["spec"].generation.maxNewTokens
    finally:
        stop(router)


def test_the_rendered_two_pod_group_logs_each_ranks_load_and_serves_as_one_process(tiny_llama, tmp_path):
    """tensorParallel 2, gpusPerPod 1: the StatefulSet's two pods as two processes (MASTER_ADDR on loopback
    instead of cluster DNS, a port each instead of a pod IP each)."""
    spec = LLMDeploymentSpec.model_validate({"model": {"source": str(tiny_llama)}, "tensorParallel": 2,
                                             "gpusPerPod": 1, **POD_SPEC})
    cm, pod_spec = rendered(spec)
    assert R.worker_statefulset(OWNER, spec, 0)["spec"]["replicas"] == 2
    config_dir = tmp_path / "etc-kubellm"
    config_dir.mkdir()
    for key, text in cm["data"].items():
        (config_dir / key).write_text(text)
    [worker] = pod_spec["containers"]
    master_port, procs, logs = free_port(), [], []
    ports = [free_port(), free_port()]
    for index in (1, 0):
        scratch = tmp_path / f"tmp-{index}"
        scratch.mkdir()
        env = pod_environment(worker, scratch)
        env.update(POD_INDEX=str(index), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        command = with_ports([a.replace(R.CONFIG_MOUNT, str(config_dir)) for a in worker["command"]],
                             {"--port": ports[index], "--metrics-port": free_port(),
                              "--http-port": free_port()})
        logs.append(tmp_path / f"pod-{index}.log")
        with open(logs[-1], "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *command[1:]], stdout=log,
                                          stderr=log, env=env, cwd=scratch))
    try:
        wait_serving(f"127.0.0.1:{ports[0]}", timeout=120)
        wait_serving(f"127.0.0.1:{ports[1]}", timeout=60)
        with Client(f"127.0.0.1:{ports[0]}", timeout=60) as client:
            got = client.generate("Once upon a time", ignore_eos=True, temperature=0.0)[0]
        assert got.generated_length == spec.generation.maxNewTokens
        from kubellm import pipeline

        pipe = pipeline(str(tiny_llama), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                        show_progress=False)
        try:
            assert got.token_ids == pipe("Once upon a time", max_new_tokens=spec.generation.maxNewTokens,
                                         ignore_eos=True)[0].token_ids
        finally:
            pipe.destroy()
        follower, leader = (path.read_text() for path in logs)
        for text in (leader, follower):
            assert "\r" not in text and re.search(r"loading weights: \d+/\d+ tensors \(100%\)", text), text
        assert re.search(rf"serving on port {ports[0]}$", leader, re.M), leader
        assert re.search(rf"ranks \[1\]: shard of \S+ loaded in \d+\.\d s; health SERVING on port {ports[1]}",
                         follower), follower
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to run the worker as PID 1 of a PID namespace, as in a container")
def test_worker_as_pid_1_exits_on_sigterm_while_it_still_starts(tiny_llama, tmp_path):
    """The kernel ignores SIGTERM for a PID 1 without a handler: a pod deleted while its worker was
    still importing torch or loading weights used to wait out its whole grace period. The worker
    handles SIGTERM before it even listens, and exits at once."""
    import socket

    port = free_port()
    # --kill-child: should the test fail, the worker (PID 1 of its namespace) goes with unshare.
    cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-m", "kubellm.runtime.cli.main", "worker",
           "--model", str(tiny_llama), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def pid_1_of_the_namespace() -> int | None:
            """The descendant of unshare (which may fork a helper first) that is PID 1 of the new
            namespace and runs Python."""
            todo = [proc.pid]
            while todo:
                pid = todo.pop()
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                    status = Path(f"/proc/{pid}/status").read_text()
                    if status.split("NSpid:\t")[1].split("\n")[0].split()[-1] == "1" and "python" in Path(f"/proc/{pid}/cmdline").read_text():
                        return pid
            return None
        deadline = time.monotonic() + 20
        pid1 = None
        while pid1 is None and time.monotonic() < deadline:
            pid1 = pid_1_of_the_namespace()
            time.sleep(0.005)
        assert pid1, "the worker never ran as PID 1"
        status = Path(f"/proc/{pid1}/status")

        def catches_sigterm() -> bool:
            mask = int(status.read_text().split("SigCgt:\t")[1].split()[0], 16)
            return bool(mask & (1 << (15 - 1)))
        while not catches_sigterm() and time.monotonic() < deadline:
            time.sleep(0.005)
        with socket.socket() as s:
            listening = s.connect_ex(("127.0.0.1", port)) == 0
        assert catches_sigterm() and not listening  # handled before the worker serves anything
        t0 = time.monotonic()
        os.kill(pid1, 15)
        assert proc.wait(timeout=15) == 128 + 15, proc.stderr.read()
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

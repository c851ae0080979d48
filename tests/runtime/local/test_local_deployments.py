"""Persistent local deployments: kubellm.serve / kubellm.client / kubellm serve|status|stop (real processes)."""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from processes import free_port

pytest.importorskip("grpc")
pytest.importorskip("torch")

ENGINE = {"device": "cpu", "num_kv_blocks": 64, "block_size": 4, "max_batch_size": 4, "session_len": 64}


pytestmark = pytest.mark.multiprocess


def _alive(pid: int) -> bool:
    from kubellm.runtime.local.registry import pid_alive as _pid_alive

    return _pid_alive(pid)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kubellm.runtime.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_serve_client_rest_status_terminate(tiny_llama, cache):
    import kubellm
    from kubellm.runtime.local import deployments, registry

    rest = free_port()
    c = kubellm.serve(str(tiny_llama), deployment_name="tiny", replica_num=2, enable_restful_api=True,
                      restful_api_port=rest, max_new_tokens=8, **ENGINE)
    entry = json.loads((deployments.registry_dir() / "tiny.json").read_text())
    pids = registry.entry_pids(entry)
    cache.update(pids)
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    assert entry["rest_port"] == rest and entry["address"] == c.address

    local = c.generate("Hello, world!", max_new_tokens=8)[0].text

    # a second Python process finds the deployment by name
    script = textwrap.dedent("""
        import json, sys, kubellm
        c = kubellm.client("tiny")
        out = [c.generate("Hello, world!", max_new_tokens=8)[0] for _ in range(4)]
        assert "torch" not in sys.modules, "the client side must stay torch-free"
        print(json.dumps([[r.text, r.replica] for r in out]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [t for t, _ in out] == [local] * 4 and local
    replicas = [r for _, r in out]
    assert set(replicas) == {"tiny-0", "tiny-1"} and replicas[0] != replicas[1] and replicas[:2] == replicas[2:]

    req = urllib.request.Request(f"http://127.0.0.1:{rest}/mii/tiny", method="POST",
                                 data=json.dumps({"prompts": ["Hello, world!"], "max_new_tokens": 8}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert body[0]["generated_text"] == local

    with pytest.raises(deployments.DeploymentError, match="already runs"):
        kubellm.serve(str(tiny_llama), deployment_name="tiny", **ENGINE)

    status = _cli("status")
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("tiny "))
    assert "alive" in line and c.address in line

    with pytest.raises(deployments.DeploymentError, match="running deployments: tiny"):
        kubellm.client("nope")

    start = time.monotonic()
    assert c.terminate_server()
    assert time.monotonic() - start < 15
    assert not any(_alive(p) for p in pids)
    assert not (deployments.registry_dir() / "tiny.json").exists()
    assert deployments.list_deployments() == []


def test_stale_entry_is_dead_and_replaced(tiny_llama, cache):
    from kubellm.runtime.local import deployments, registry

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.write_entry({"name": "stale", "model": "x", "address": "127.0.0.1:1", "replicas": 1,
                              "router_pid": dead.pid, "worker_pids": [dead.pid]})
    [entry] = deployments.list_deployments()
    assert entry["name"] == "stale" and entry["alive"] is False and entry["state"] == "dead"
    status = _cli("status")
    assert "dead" in next(ln for ln in status.stdout.splitlines() if ln.startswith("stale "))
    with pytest.raises(deployments.DeploymentError, match="not all running"):
        deployments.client("stale")

    c = deployments.serve(str(tiny_llama), deployment_name="stale", max_new_tokens=4, **ENGINE)
    cache.update(registry.entry_pids(c.entry))
    assert c.entry["router_pid"] != dead.pid
    assert c.generate("Hi")[0].generated_length == 4
    assert deployments.list_deployments()[0]["alive"] is True
    c.terminate_server()
    assert deployments.list_deployments() == []


def test_serve_validates_up_front(cache):
    import kubellm

    with pytest.raises(ValueError, match="max_batch_sise"):
        kubellm.serve("/nonexistent", max_batch_sise=4)
    with pytest.raises(ValueError, match="EngineConfig.max_batch_size"):
        kubellm.serve("/nonexistent", max_batch_size=0)
    with pytest.raises(ValueError, match="GenerationConfig.top_p"):
        kubellm.serve("/nonexistent", top_p=2.0)
    with pytest.raises(ValueError, match="tensor_parallel: must be an integer >= 1"):
        kubellm.serve("/nonexistent", tensor_parallel=0)
    with pytest.raises(ValueError, match="EngineConfig.pipeline_stage_bytes"):
        kubellm.serve("/nonexistent", pipeline_parallel=2, pipeline_split="threshold")
    with pytest.raises(ValueError, match="--policy: 'fastest' is not one of round_robin"):
        kubellm.serve("/nonexistent", policy="fastest")
    with pytest.raises(ValueError, match="--load-factor: must be a number >= 1"):
        kubellm.serve("/nonexistent", policy="prefix_affinity", load_factor=0)


def _children(pid: int) -> set[int]:
    out = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def test_serve_with_tensor_and_pipeline_parallel_ranks(tiny_llama, cache):
    """MII's serve(tensor_parallel=2): each replica's worker starts its rank processes; the answers are
    the single-process ones; terminate_server leaves no rank behind."""
    import kubellm
    from kubellm.runtime.local import registry
    from kubellm.runtime.pipeline import pipeline

    pipe = pipeline(str(tiny_llama), device="cpu", num_kv_blocks=64, block_size=4, session_len=64)
    try:
        expected = [r.token_ids for r in pipe(["Hello", "Once upon a time"], max_new_tokens=6, ignore_eos=True)]
    finally:
        pipe.destroy()
    c = kubellm.serve(str(tiny_llama), deployment_name="tp", tensor_parallel=2, pipeline_parallel=2, **ENGINE)
    cache.update(registry.entry_pids(c.entry))
    worker = c.entry["worker_pids"][0]
    ranks = _children(worker)
    assert len(ranks) >= 3  # tp 2 x pp 2: ranks 1, 2, 3 beside the worker (rank 0)
    cache.update(ranks)
    assert [r.token_ids for r in c.generate(["Hello", "Once upon a time"], max_new_tokens=6,
                                           ignore_eos=True)] == expected
    assert c.terminate_server()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks | {worker}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks | {worker})


def test_concurrent_serve_of_a_name_is_refused(cache):
    fcntl = pytest.importorskip("fcntl")
    from kubellm.runtime.local import deployments

    deployments.registry_dir().mkdir(parents=True)
    with open(deployments.registry_dir() / ".busy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        script = "import kubellm\ntry:\n    kubellm.serve('/nonexistent', deployment_name='busy')\n" \
                 "except Exception as e:\n    print(e)"
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env=os.environ.copy())
    assert "being started by another process" in proc.stdout, proc.stderr


def test_failed_start_reports_log_and_cleans_up(tmp_path, cache):
    from kubellm.runtime.local import deployments

    with pytest.raises(deployments.DeploymentError, match="exited") as err:
        deployments.serve(str(tmp_path / "no-such-model"), deployment_name="broken", startup_timeout=60, **ENGINE)
    assert "worker-0.log" in str(err.value)
    assert deployments.list_deployments() == []


def test_cli_serve_file_and_stop(tiny_llama, cache, tmp_path):
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(textwrap.dedent(f"""
        apiVersion: kubellm.io/v1alpha1
        kind: LLMDeployment
        metadata:
          name: tiny-yaml
        spec:
          model:
            source: {tiny_llama}
          replicas: 1
          engine:
            maxBatchSize: 4
            sessionLen: 64
            kvCacheFraction: 0.02
          generation:
            maxNewTokens: 6
          router:
            policy: prefix_affinity
            loadFactor: 2
    """))
    proc = _cli("serve", "-f", str(manifest), "--device", "cpu", "--prefix-length", "64")
    from kubellm.runtime.local import deployments, registry

    for e in deployments.list_deployments():
        cache.update(registry.entry_pids(e))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "tiny-yaml" in proc.stdout
    c = deployments.client("tiny-yaml")
    pids = registry.entry_pids(c.entry)
    with open(f"/proc/{c.entry['router_pid']}/cmdline") as f:
        router_args = f.read().split("\0")
    # the manifest's spec.router, the command line's --prefix-length over its default
    for flag, value in (("--policy", "prefix_affinity"), ("--load-factor", "2.0"), ("--prefix-length", "64")):
        assert router_args[router_args.index(flag) + 1] == value
    assert c.generate("Hello")[0].generated_length == 6   # the manifest's generation default
    c.close()
    stop = _cli("stop", "tiny-yaml")
    assert stop.returncode == 0, stop.stderr
    assert not any(_alive(p) for p in pids)
    assert deployments.list_deployments() == []
    again = _cli("stop", "tiny-yaml")
    assert again.returncode == 2 and "not registered" in again.stderr

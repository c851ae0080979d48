"""The real-pod tier: the chart and the README's deployments on a real node (containerd + kubelet),
running the images built from docker/*.Dockerfile, queried as a user would.

One release goes through its life in order (the tests share it and run in file order):
install and `helm test`; the CPU example (SmolLM2, 2 replicas, REST on) served through
`kubectl port-forward` to every client; its leaders as InferencePool endpoints (OpenAI HTTP on 8000,
the real GIE CRD); what a person sees; pod security; the network pinned to
the machine; a rank pod killed under load; a rolling update under load that also proves
`spec.generation` reaches the pods; an `hf://` model fetched by the init container from a local
mirror (a test fixture) and served by one pod and by a tensor-parallel group of two pods; that
group's rank-1 pod deleted, and the whole group restarted.

Figures (apply to first token, group restart, the tier's run time) are printed; docs/benchmarks.md
keeps them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.realpods]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubellm"
CPU_EXAMPLE = ROOT / "e2e" / "kind" / "smollm2-cpu.yaml"   # what e2e/kind/run.sh applies too
QUERY = ROOT / "e2e" / "kind" / "query.py"                  # the kind path's query script
SYSTEM = "kubellm-system"
NS = "llm"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
TIER_START = time.monotonic()
FIGURES: dict[str, float] = {}
sys.path.insert(0, str(ROOT / "tests"))


def app_version() -> str:
    return sys.modules["kubellm_e2e_cluster"].sibling("images").APP_VERSION  # the chart's appVersion


def get(cluster, *what, namespace=NS) -> dict:
    return json.loads(cluster.kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def phase(cluster, name) -> str:
    return (get(cluster, "llmd", name).get("status") or {}).get("phase", "")


def wait_ready(cluster, name, timeout=600) -> dict:
    def ready():
        status = get(cluster, "llmd", name).get("status") or {}
        return status if status.get("phase") == "Ready" else None
    try:
        return cluster.wait_for(ready, f"{NS}/{name} Ready", timeout=timeout, interval=1)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{diagnose(cluster)}") from None


def diagnose(cluster) -> str:
    parts = []
    for args in (("get", "llmd,pods,svc", "-A", "-o", "wide"), ("describe", "pods", "-n", NS),
                 ("logs", "-n", SYSTEM, "deploy/kubellm", "--tail=60"),
                 ("logs", "-n", NS, "-l", "app.kubernetes.io/part-of=kubellm", "--all-containers", "--prefix",
                  "--tail=40")):
        parts.append(cluster.kubectl(*args, check=False).stdout[-6000:])
    return "\n".join(parts)


@contextmanager
def port_forward(cluster, target: str, *ports: int, namespace=NS):
    """`kubectl port-forward` to `target` on random local ports; yields {remote port: local port}."""
    proc = subprocess.Popen([cluster.bin("kubectl"), f"--kubeconfig={cluster.kubeconfig}", "-n", namespace,
                             "port-forward", target, *(f":{p}" for p in ports)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    mapping: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while len(mapping) < len(ports):
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"port-forward {target} exited: {proc.stderr.read()}")
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            if m:
                mapping[int(m.group(2))] = int(m.group(1))
            if time.monotonic() > deadline:
                raise AssertionError(f"port-forward {target}: no ports after 60 s")
        yield mapping
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def apply(cluster, manifest: dict | str) -> None:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    cluster.kubectl("apply", "-n", NS, "-f", "-", input=text)


class Load:
    """Steady streaming requests from a few threads, each outcome recorded: the replica, whether a
    token had arrived, and how it ended."""

    def __init__(self, address: str, threads: int = 3, max_new_tokens: int = 24, timeout: float = 60):
        from kubellm.runtime.serving.client import Client

        self.client = Client(address, timeout=timeout)
        self.results: list[dict] = []
        self.stop = threading.Event()
        self.max_new_tokens, self.timeout = max_new_tokens, timeout
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        from kubellm.runtime.serving.client import ClientError

        n = 0
        while not self.stop.is_set():
            n += 1
            result = {"t": time.monotonic(), "started": False, "replica": "", "error": None, "code": None}
            try:
                for delta in self.client.stream(f"Request {i}.{n}: tell me about Kubernetes.",
                                                max_new_tokens=self.max_new_tokens, timeout=self.timeout):
                    result["started"], result["replica"] = True, delta.replica or result["replica"]
            except ClientError as err:
                result["error"], result["code"] = str(err), err.code
            result["end"] = time.monotonic()
            self.results.append(result)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 10)
        assert not any(t.is_alive() for t in self.threads), "a request hangs"
        self.client.close()

    def served_by(self, replica_prefix: str, since: float, until: float) -> int:
        return sum(1 for r in self.results if r["error"] is None and r["replica"].startswith(replica_prefix)
                   and since <= r["end"] <= until)


class PhaseWatch(threading.Thread):
    """Records each distinct phase of an LLMDeployment, in order, while it runs."""

    def __init__(self, cluster, name):
        super().__init__(daemon=True)
        self.cluster, self.name, self.phases, self.done = cluster, name, [], threading.Event()
        self.min_ready = 99

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = (get(self.cluster, "llmd", self.name).get("status") or {})
            except Exception:  # noqa: BLE001 - deleted at teardown
                return
            p = status.get("phase", "")
            self.min_ready = min(self.min_ready, status.get("readyReplicas", 0))
            if not self.phases or self.phases[-1] != p:
                self.phases.append(p)
            time.sleep(0.3)


# -- the release -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(real_cluster):
    c = real_cluster
    c.create_namespace(SYSTEM, RESTRICTED)
    version = app_version()
    # The workers run the CPU runtime image (the example's spec.image too), the routers the router image.
    c.helm("install", "kubellm", str(CHART), "--namespace", SYSTEM, "--set", f"runtimeImage.tag={version}-cpu",
           "--set", f"routerImage.tag={version}", "--set", "refreshIntervalSeconds=1", "--wait", "--timeout", "5m",
           timeout=400)
    c.create_namespace(NS, RESTRICTED)
    yield c
    c.kubectl("delete", "llmd", "--all", "-n", NS, "--wait", "--timeout=120s", check=False, timeout=180)
    c.helm("uninstall", "kubellm", "--namespace", SYSTEM, "--wait", check=False)
    total = time.monotonic() - TIER_START
    print(f"\nreal-pod tier figures: {json.dumps({**FIGURES, 'tier_seconds': round(total, 1)})}")


def test_operator_pod_runs_and_helm_test_passes(release):
    c = release
    pods = get(c, "pods", "-l", "app.kubernetes.io/name=kubellm", namespace=SYSTEM)["items"]
    operator = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    assert operator and all(s["ready"] for p in operator for s in p["status"]["containerStatuses"]), pods
    assert operator[0]["spec"]["containers"][0]["image"] == f"ghcr.io/kubellm/operator:{app_version()}"
    out = c.helm("test", "kubellm", "--namespace", SYSTEM, "--timeout", "3m", timeout=240).stdout
    assert "Phase:          Succeeded" in out or "Succeeded" in out, out


@pytest.fixture(scope="module")
def smollm2(release):
    """The CPU example applied as a user would; the time from `kubectl apply` to the first token
    through the Service is measured here."""
    c = release
    t0 = time.monotonic()
    apply(c, CPU_EXAMPLE.read_text())
    from kubellm.runtime.serving.client import Client, ClientError

    c.wait_for(lambda: any(p["status"].get("phase") == "Running" for p in
                           get(c, "pods", "-l", "app.kubernetes.io/component=router")["items"]),
               "router pod Running", timeout=300, interval=0.5)
    errors: list[Exception] = []

    def first_token():
        # A port-forward per try: kubectl's ends at the first connection the pod refuses ("lost connection
        # to pod"), which is what a try made before the router listens gets.
        try:
            with port_forward(c, "svc/smollm2", 50051) as ports, \
                    Client(f"127.0.0.1:{ports[50051]}", timeout=30) as client:
                return next(iter(client.stream("The capital of France is", max_new_tokens=4)), None)
        except (ClientError, AssertionError) as err:
            errors[:] = [err]
            return None
    try:
        c.wait_for(first_token, "a first token through svc/smollm2", timeout=600, interval=0.5)
    except TimeoutError as err:
        raise AssertionError(f"{err} (last error: {errors[-1] if errors else None})\n{diagnose(c)}") from None
    FIGURES["apply_to_first_token_s"] = round(time.monotonic() - t0, 1)
    print(f"\nkubectl apply -> first token through the Service: {FIGURES['apply_to_first_token_s']} s")
    wait_ready(c, "smollm2")
    # The router finds a new leader within its resolve interval (5 s) of the pod's readiness.
    with port_forward(c, "svc/smollm2", 28080) as ports:
        c.wait_for(lambda: "kubellm_router_healthy_replicas 2" in router_metrics(ports[28080]),
                   "the router sees both replicas", timeout=60, interval=0.5)
    return c


def router_metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def reflection_client():
    """grpcurl (built by e2e/build-control-plane.sh) as tests/processes.py's grpcurl_runner."""
    from processes import e2e_binary, grpcurl_runner

    path = e2e_binary("grpcurl")
    if path is None:
        pytest.fail("no grpcurl; run: bash e2e/build-control-plane.sh")
    return grpcurl_runner(path)


def test_cpu_example_serves_every_client(smollm2):
    c = smollm2
    with port_forward(c, "svc/smollm2", 50051, 28080) as ports:
        grpc_address, rest = f"127.0.0.1:{ports[50051]}", f"http://127.0.0.1:{ports[28080]}"
        proc = subprocess.run([sys.executable, str(QUERY), grpc_address, rest, "smollm2", "2"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(proc.stdout)
        # Requests alternate between the two replicas, and each response names its replica.
        from kubellm.runtime.serving.client import Client

        with Client(grpc_address) as client:
            replicas = [client.generate("Hello", max_new_tokens=2)[0].replica for _ in range(6)]
        assert len(set(replicas)) == 2 and all(replicas[i] != replicas[i + 1] for i in range(5)), replicas
        assert all(r.startswith("smollm2-g") for r in replicas), replicas
        # A client in any language: grpcurl learns the API from the router Service's own reflection.
        grpcurl = reflection_client()
        assert {"kubellm.v1.LLM", "grpc.health.v1.Health"} <= set(grpcurl(grpc_address, "list").split())
        assert "rpc GenerateStream" in grpcurl(grpc_address, "describe", "kubellm.v1.LLM")
        body = json.dumps({"prompts": [{"text": "Hello"}], "config": {"maxNewTokens": 2, "temperature": 0}})
        reply = json.loads(grpcurl(grpc_address, "kubellm.v1.LLM/Generate", data=body))
        assert reply["responses"][0]["generated_length"] == 2 and reply["replica"].startswith("smollm2-g"), reply
    # Served by the router image (no torch) in front of the CPU runtime image.
    images: dict[str, set[str]] = {}
    for pod in get(c, "pods", "-l", "app.kubernetes.io/instance=smollm2")["items"]:
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        images.setdefault(component, set()).update(x["image"] for x in pod["spec"]["containers"])
    assert images == {"router": {f"ghcr.io/kubellm/router:{app_version()}"},
                      "worker": {f"ghcr.io/kubellm/runtime:{app_version()}-cpu"}}, images


def test_leaders_are_inference_pool_endpoints_serving_openai_http(smollm2):
    """With the real InferencePool CRD installed, the operator's pool selects exactly the two leaders; each
    serves OpenAI HTTP on port 8000 to the host (/v1/models, a completion through the `openai` client) and
    vllm: metrics there. The status holds each group's time to ready, and the ModelLoaded Events the load
    phases the operator (in its pod) read from the leaders' metrics port."""
    import urllib.request

    import openai

    c = smollm2
    if sys.modules["kubellm_e2e_cluster"].inference_pool_crd(c.bin_dir) is None:
        pytest.fail("the InferencePool CRD is not fetched; run: bash e2e/build-control-plane.sh")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    c.install_inference_pool_crd()
    try:
        c.kubectl("patch", "llmd", "smollm2", "-n", NS, "--type=merge",
                  "-p", json.dumps({"spec": {"inferencePool": {"enabled": True}}}))
        pool = c.wait_for(lambda: (get(c, "inferencepools")["items"] or [None])[0], "the InferencePool", timeout=60)
        c.wait_for(lambda: any(x["type"] == "InferencePoolReady" and x["status"] == "True"
                               for x in get(c, "llmd", "smollm2")["status"]["conditions"]), "InferencePoolReady", 30)
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]
        match = ",".join(f"{k}={v}" for k, v in pool["spec"]["selector"]["matchLabels"].items())
        pods = get(c, "pods", "-l", match)["items"]
        assert sorted(p["metadata"]["name"] for p in pods) == ["smollm2-g0-0", "smollm2-g1-0"], pods
        for pod in pods:
            base = f"http://{pod['status']['podIP']}:8000"
            with direct.open(f"{base}/v1/models", timeout=30) as reply:
                assert json.loads(reply.read())["data"][0]["id"] == "smollm2"
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", timeout=120, max_retries=0)
            completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4)
            assert completion.model == "smollm2" and completion.choices[0].text and completion.usage.completion_tokens == 4
            with direct.open(f"{base}/metrics", timeout=30) as reply:
                metrics = reply.read().decode()
            assert re.search(r'^vllm:num_requests_running\{[^}]*model_name="smollm2"[^}]*\} \d', metrics, re.M), metrics[:2000]

        status = get(c, "llmd", "smollm2")["status"]
        assert [g["index"] for g in status["groups"]] == [0, 1]
        assert all(g["loadSeconds"] > 0 and g["scheduledAt"] <= g["loadStartedAt"] < g["readyAt"]
                   for g in status["groups"]), status["groups"]
        FIGURES["model_load_s"] = status["lastLoadSeconds"]
        wide = c.kubectl("get", "llmd", "smollm2", "-n", NS, "-o", "wide").stdout.splitlines()
        assert wide[1].split()[wide[0].split().index("LOAD-SECONDS")] == f"{status['lastLoadSeconds']:g}", wide
        loaded = [e["message"] for e in get(c, "events", "--field-selector", "involvedObject.name=smollm2")["items"]
                  if e["reason"] == "ModelLoaded"]
        print(f"\nModelLoaded: {loaded}")
        assert loaded and all(re.search(r"weights \d+\.\d s", m) for m in loaded), loaded
    finally:
        c.kubectl("patch", "llmd", "smollm2", "-n", NS, "--type=merge",
                  "-p", json.dumps({"spec": {"inferencePool": {"enabled": False}}}), check=False)
        c.remove_inference_pool_crd()


def test_what_a_person_sees(smollm2):
    c = smollm2
    logs = c.kubectl("logs", "-n", NS, "smollm2-g0-0").stdout
    assert re.search(r"load", logs, re.I) and re.search(r"\d+%", logs), logs[-3000:]
    assert re.search(r"serving|listening", logs, re.I), logs[-3000:]
    described = c.kubectl("describe", "llmd", "smollm2", "-n", NS).stdout
    events = described.split("Events:", 1)
    assert len(events) == 2 and events[1].strip() not in ("", "<none>"), described
    table = c.kubectl("get", "llmd", "-n", NS).stdout
    row = next(line for line in table.splitlines() if line.startswith("smollm2"))
    assert "2/2" in row and f"smollm2.{NS}.svc.cluster.local:50051" in row and "Ready" in row, table


def test_pods_run_as_built_under_restricted(smollm2):
    c = smollm2
    for namespace in (NS, SYSTEM):
        labels = get(c, "namespace", namespace, namespace="default")["metadata"]["labels"]
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"
        for pod in get(c, "pods", namespace=namespace)["items"]:
            if pod["status"].get("phase") != "Running":
                continue
            name = pod["metadata"]["name"]
            for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                sc = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
                assert sc.get("runAsNonRoot") and sc.get("allowPrivilegeEscalation") is False, (name, sc)
            container = pod["spec"]["containers"][0]
            uid = c.kubectl("exec", "-n", namespace, name, "-c", container["name"], "--", "id", "-u").stdout.strip()
            assert uid != "0", (name, uid)
            if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                probe = c.kubectl("exec", "-n", namespace, name, "-c", container["name"], "--",
                                  "touch", "/probe", check=False)
                assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (name, probe.stderr)
    # Nothing is refused silently: a privileged pod is rejected by the namespace's policy.
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
           "spec": {"containers": [{"name": "c", "image": f"ghcr.io/kubellm/runtime:{app_version()}-cpu",
                                    "securityContext": {"privileged": True}}]}}
    refused = c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr, refused.stderr


def test_pod_traffic_stays_on_the_machine(smollm2):
    """Cluster DNS answers cluster.local only; an address off the machine has no route from a pod."""
    c = smollm2
    script = (
        "import socket\n"
        "print('kubernetes', socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "for host in ('pypi.org', 'deb.debian.org'):\n"
        "    try: socket.getaddrinfo(host, 443); print('resolved', host)\n"
        "    except OSError as e: print('unresolved', host)\n"
        "for ip in ('192.0.2.1', '1.1.1.1', '8.8.8.8'):\n"
        "    try: socket.create_connection((ip, 443), timeout=3); print('reached', ip)\n"
        "    except OSError as e: print('unreachable', ip, e.errno)\n")
    out = c.kubectl("exec", "-n", NS, "smollm2-g0-0", "--", "python3", "-c", script).stdout
    assert "kubernetes 10.96.0.1" in out, out
    assert "resolved" not in out.replace("unresolved", "") and "reached" not in out.replace("unreachable", ""), out
    assert out.count("unreachable") == 3 and all(" 101" in line for line in out.splitlines()
                                                 if line.startswith("unreachable")), out  # ENETUNREACH


def test_rank_pod_killed_under_load(smollm2):
    """The operator restarts the group, the other replica keeps serving, no request that had not
    started streaming is lost, a cut stream ends UNAVAILABLE naming its replica, nothing hangs."""
    c = smollm2
    with port_forward(c, "svc/smollm2", 50051) as ports:
        watch = PhaseWatch(c, "smollm2")
        with Load(f"127.0.0.1:{ports[50051]}") as load:
            time.sleep(8)
            watch.start()
            t_kill = time.monotonic()
            c.kubectl("delete", "pod", "smollm2-g0-0", "-n", NS, "--wait=false")
            c.wait_for(lambda: "Degraded" in watch.phases or None, "phase Degraded", timeout=120)
            c.wait_for(lambda: watch.phases[-1] == "Ready" or None, "phase Ready again", timeout=600, interval=0.5)
            t_ready = time.monotonic()
            time.sleep(4)
        watch.done.set()
        from kubellm.runtime.serving.client import Client

        # The router finds the restarted leader within its resolve interval (5 s), then uses both again.
        with Client(f"127.0.0.1:{ports[50051]}", timeout=30) as client:
            c.wait_for(lambda: client.generate("again?", max_new_tokens=2)[0].replica.startswith("smollm2-g0"),
                       "the restarted replica serving through the router", timeout=60, interval=0.2)
    FIGURES["group_restart_s"] = round(t_ready - t_kill, 1)
    print(f"\ngroup restart after a pod kill: {FIGURES['group_restart_s']} s; phases {watch.phases}")
    results = load.results
    failed = [r for r in results if r["error"]]
    assert not [r for r in failed if not r["started"]], failed  # retried on the other replica
    for r in failed:
        assert r["code"] == "UNAVAILABLE" and "smollm2-g0" in r["error"], r
    assert load.served_by("smollm2-g1", t_kill, t_ready) > 0, results
    assert watch.phases.index("Degraded") < len(watch.phases) - 1 and watch.phases[-1] == "Ready", watch.phases


def test_rolling_update_under_load_and_generation_defaults(smollm2):
    """A spec change rolls the groups one at a time with real readiness; a steady client sees no
    failed request; the new spec.generation defaults then apply in the pods."""
    c = smollm2
    before = {p["metadata"]["uid"] for p in get(c, "pods", "-l", "app.kubernetes.io/component=worker")["items"]}
    with port_forward(c, "svc/smollm2", 50051) as ports:
        address = f"127.0.0.1:{ports[50051]}"
        watch = PhaseWatch(c, "smollm2")
        with Load(address) as load:
            time.sleep(5)
            watch.start()
            c.kubectl("patch", "llmd", "smollm2", "-n", NS, "--type=merge",
                      "-p", json.dumps({"spec": {"generation": {"maxNewTokens": 7}}}))

            def rolled():
                pods = get(c, "pods", "-l", "app.kubernetes.io/component=worker")["items"]
                fresh = [p for p in pods if p["metadata"]["uid"] not in before and
                         all(s["ready"] for s in p["status"].get("containerStatuses", []) or [{"ready": False}])]
                return len(fresh) == 2 and phase(c, "smollm2") == "Ready"
            c.wait_for(rolled, "both groups rolled and Ready", timeout=900, interval=1)
            time.sleep(3)
        watch.done.set()
        assert not [r for r in load.results if r["error"]], [r for r in load.results if r["error"]]
        assert watch.min_ready >= 1, watch.phases  # one group at a time: never both down
        from kubellm.runtime.serving.client import Client

        with Client(address) as client:
            # No max_new_tokens in the request: the deployment's default (7) applies.
            responses = [client.generate("Count: 1, 2, 3, 4, 5,")[0] for _ in range(2)]
    assert all(r.generated_length == 7 and r.finish_reason == "length" for r in responses), responses


def tiny_deployment(name: str, source: str, endpoint: str, secret: str, tensor_parallel: int) -> dict:
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
            "spec": {"model": {"source": source, "endpoint": endpoint, "tokenSecret": secret},
                     "device": "cpu", "replicas": 1, "tensorParallel": tensor_parallel, "gpusPerPod": 1,
                     "engine": {"dtype": "float32", "maxBatchSize": 4, "kvCacheFraction": 0.05},
                     "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}}}


def greedy_ids(address: str, prompts: list[str]) -> list[list[int]]:
    from kubellm.runtime.serving.client import Client

    with Client(address, timeout=60) as client:
        return [client.generate(p, max_new_tokens=12, temperature=0.0)[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def hf_model(release, tmp_path_factory):
    """A tiny random checkpoint served by a local Hugging Face-compatible mirror (a test fixture)
    on the node IP, checking the token that the `hf-token` Secret holds; with the local engine's
    greedy tokens for a few prompts. The mirror lives for the module: restarted pods download again."""
    from tiny_models import make_checkpoint

    import kubellm

    c = release
    e2e_cluster = sys.modules["kubellm_e2e_cluster"]  # loaded by conftest.py
    mirror_mod, node_ip = e2e_cluster.sibling("hf_mirror"), e2e_cluster.sibling("node").NODE_IP
    model_dir = make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama", "llama")
    prompts = ["The capital of France is", "Kubernetes schedules pods", "Once upon a time"]
    pipe = kubellm.pipeline(str(model_dir), device="cpu", dtype="float32")
    want = [r.token_ids for r in pipe(prompts, max_new_tokens=12, temperature=0.0)]
    pipe.destroy()
    token = "hf_e2e_token_checked_by_the_mirror"
    c.kubectl("create", "secret", "generic", "hf-token", "-n", NS, f"--from-literal=HF_TOKEN={token}")
    with mirror_mod.HFMirror(model_dir, "kubellm-e2e/tiny-llama", token=token, host=node_ip) as mirror:
        yield {"mirror": mirror, "source": "hf://kubellm-e2e/tiny-llama", "prompts": prompts, "want": want}


def test_hf_source_and_two_pod_tensor_parallel_group(release, hf_model):
    """The download init container fetches the tiny model from the mirror with the Secret's token;
    one pod serves it, and a tensor-parallel group of two pods (gloo over the pod network,
    MASTER_ADDR from cluster DNS) serves the same greedy tokens, which are the local engine's."""
    c, mirror = release, hf_model["mirror"]
    apply(c, tiny_deployment("tiny", hf_model["source"], mirror.url, "hf-token", 1))
    apply(c, tiny_deployment("tiny-tp2", hf_model["source"], mirror.url, "hf-token", 2))
    wait_ready(c, "tiny")
    wait_ready(c, "tiny-tp2")
    pods = get(c, "pods", "-l", "app.kubernetes.io/instance=tiny-tp2")["items"]
    assert len([p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]) == 2
    init_log = c.kubectl("logs", "-n", NS, "tiny-g0-0", "-c", "download-model").stdout
    assert "tiny-llama" in init_log, init_log
    files = [path for method, path, _ in mirror.requests if method == "GET" and "/resolve/" in path]
    assert files and all(authorized for _, _, authorized in mirror.requests), mirror.requests
    for name in ("tiny", "tiny-tp2"):
        with port_forward(c, f"svc/{name}", 50051) as ports:
            got = greedy_ids(f"127.0.0.1:{ports[50051]}", hf_model["prompts"])
        assert got == hf_model["want"], (name, got, hf_model["want"])
    c.kubectl("delete", "llmd", "tiny", "-n", NS, "--wait=false")


def test_killed_rank_restarts_the_whole_two_pod_group(release, hf_model):
    """Deleting rank 1's pod breaks the torch.distributed group: the operator restarts both pods
    (rank 0 too), the status goes Degraded then Ready, and the group serves the same tokens."""
    c = release
    if phase(c, "tiny-tp2") != "Ready":
        pytest.fail("needs the tiny-tp2 deployment of the previous test, Ready")
    pods = {p["metadata"]["name"]: p["metadata"]["uid"]
            for p in get(c, "pods", "-l", "app.kubernetes.io/instance=tiny-tp2,app.kubernetes.io/component=worker")["items"]}
    assert sorted(pods) == ["tiny-tp2-g0-0", "tiny-tp2-g0-1"], pods
    watch = PhaseWatch(c, "tiny-tp2")
    watch.start()
    t_kill = time.monotonic()
    c.kubectl("delete", "pod", "tiny-tp2-g0-1", "-n", NS, "--wait=false")
    c.wait_for(lambda: "Degraded" in watch.phases or None, "phase Degraded", timeout=120)

    def restarted():
        now = {p["metadata"]["name"]: p["metadata"]["uid"] for p in get(
            c, "pods", "-l", "app.kubernetes.io/instance=tiny-tp2,app.kubernetes.io/component=worker")["items"]}
        fresh = len(now) == 2 and not set(now.values()) & set(pods.values())
        return fresh and watch.phases[-1] == "Ready"
    try:
        c.wait_for(restarted, "both ranks replaced and Ready", timeout=300, interval=1)
    except TimeoutError as err:
        events = c.kubectl("get", "events", "-n", NS, "--sort-by=.lastTimestamp", check=False).stdout[-4000:]
        raise AssertionError(f"{err}; phases {watch.phases}\n{events}\n{diagnose(c)}") from None
    finally:
        watch.done.set()
    FIGURES["two_pod_group_restart_s"] = round(time.monotonic() - t_kill, 1)
    print(f"\ntwo-pod group restart after a rank pod kill: {FIGURES['two_pod_group_restart_s']} s")
    events = {e["reason"] for e in get(c, "events", "--field-selector", "involvedObject.name=tiny-tp2")["items"]}
    assert "GroupRestarted" in events, events
    with port_forward(c, "svc/tiny-tp2", 50051) as ports:
        assert greedy_ids(f"127.0.0.1:{ports[50051]}", hf_model["prompts"]) == hf_model["want"]
    c.kubectl("delete", "llmd", "tiny-tp2", "-n", NS, "--wait=false")

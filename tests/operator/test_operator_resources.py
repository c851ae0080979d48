"""Pure builders: LLMDeployment spec -> child manifests."""

import subprocess
import sys

import pytest

from kubellm.operator import resources as R
from kubellm.api.spec import LLMDeploymentSpec

OWNER = R.Owner("llama", "team-a", "uid-123")


def spec(**fields) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "hf://meta-llama/Llama-3-8B"}, **fields})


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_mii_style_example_children():
    s = spec(tensorParallel=2, replicas=2, restApi={"enabled": True, "ingress": {"host": "llm.example.com"}})
    objs = R.children(OWNER, s)
    assert [o["metadata"]["name"] for o in by_kind(objs, "StatefulSet")] == ["llama-g0", "llama-g1"]
    assert {o["metadata"]["name"] for o in by_kind(objs, "Service")} == {"llama-g0", "llama-g1", "llama-leaders", "llama"}
    assert len(by_kind(objs, "Deployment")) == len(by_kind(objs, "Ingress")) == len(by_kind(objs, "ConfigMap")) == 1
    assert len(by_kind(objs, "PodDisruptionBudget")) == 1
    for o in objs:  # every child is owned and labelled
        [ref] = o["metadata"]["ownerReferences"]
        assert ref["uid"] == "uid-123" and ref["controller"] and ref["kind"] == "LLMDeployment"
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "llama"
        assert o["metadata"]["namespace"] == "team-a"


def test_group_statefulset_shape():
    s = spec(tensorParallel=4, pipelineParallel=2, gpusPerPod=4, replicas=1)
    sts = R.worker_statefulset(OWNER, s, 0)
    assert sts["spec"]["replicas"] == 2  # 8 ranks, 4 GPUs per pod
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert sts["spec"]["serviceName"] == "llama-g0"
    pod = sts["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["WORLD_SIZE"] == "8" and env["KUBELLM_GPUS_PER_POD"] == "4"
    assert env["MASTER_ADDR"] == "llama-g0-0.llama-g0.team-a.svc.cluster.local"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert worker["command"][:2] == ["kubellm", "worker"]
    assert "--tensor-parallel" in worker["command"] and "4" in worker["command"]
    index_env = next(e for e in worker["env"] if e["name"] == "POD_INDEX")
    assert R.POD_INDEX_LABEL in index_env["valueFrom"]["fieldRef"]["fieldPath"]
    assert worker["startupProbe"]["grpc"]["port"] == 50051
    assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] >= s.startupTimeoutSeconds
    # The selector of one group never matches another group's pods.
    assert sts["spec"]["selector"]["matchLabels"][R.GROUP_LABEL] == "0"
    assert R.worker_statefulset(OWNER, s, 1)["spec"]["selector"]["matchLabels"][R.GROUP_LABEL] == "1"


@pytest.mark.parametrize("fields, size", [({"tensorParallel": 4, "gpusPerPod": 2}, "2"), ({"tensorParallel": 2}, "1")])
def test_worker_pods_carry_leaderworkerset_env(fields, size):
    """LWS's names and values: LWS_LEADER_ADDRESS <leader hostname>.<subdomain>.<namespace> (rank 0 in the group's
    headless Service), LWS_GROUP_SIZE the pods in the group, LWS_WORKER_INDEX this pod's index (its pod-index label,
    like POD_INDEX); kubellm's own variables stay."""
    [worker] = R.worker_statefulset(OWNER, spec(replicas=2, **fields), 1)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["LWS_LEADER_ADDRESS"]["value"] == "llama-g1-0.llama-g1.team-a"
    assert env["LWS_GROUP_SIZE"]["value"] == size
    assert env["LWS_WORKER_INDEX"]["valueFrom"] == env["POD_INDEX"]["valueFrom"] == {
        "fieldRef": {"fieldPath": f"metadata.labels['{R.POD_INDEX_LABEL}']"}}
    assert env["MASTER_ADDR"]["value"].startswith(env["LWS_LEADER_ADDRESS"]["value"] + ".")


def test_the_restart_budget_does_not_replace_pods():
    """maxGroupRestarts is the operator's alone: changing it must not roll every group."""
    assert R.worker_spec_hash(spec()) == R.worker_spec_hash(spec(maxGroupRestarts=3, groupRestartWindowSeconds=600))


SECURITY_SPECS = [
    {"restApi": {"enabled": True}},
    {"model": {"source": "hf://org/gated", "tokenSecret": "hf-token", "endpoint": "http://mirror:8080"},
     "tensorParallel": 2, "gpusPerPod": 1},
    {"model": {"source": "hf://org/cached", "cachePVC": "model-cache"}, "device": "cpu"},
    {"model": {"source": "pvc://weights/llama"}},
    {"model": {"source": "smollm2-135m"}, "device": "cpu"},
]


def pods_of(s) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in R.children(OWNER, s)
            if o["kind"] in ("StatefulSet", "Deployment")]


@pytest.mark.parametrize("fields", SECURITY_SPECS)
def test_restricted_pod_security_and_read_only_root_in_every_container(fields):
    pods = pods_of(spec(**fields))
    assert {name for name, _ in pods} >= {"llama-g0", "llama-router"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        containers = pod["containers"] + pod.get("initContainers", [])
        if fields.get("model", {}).get("source", "").startswith("hf://"):
            assert [c["name"] for c in pod.get("initContainers", [])] == (["download-model"] if "g0" in name else [])
        for c in containers:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc["runAsNonRoot"] is True and not sc.get("privileged"), c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            # What must be writable is an emptyDir (or the model cache PVC) mounted read-write ...
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")
                        and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])}
            assert R.SCRATCH in writable, c["name"]
            # ... and every directory the container is told to write to (HOME, HF_HOME) lies on one.
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["HOME"] == R.SCRATCH, c["name"]
            for var in ("HOME", "HF_HOME"):
                if var in env:
                    assert any(env[var] == w or env[var].startswith(w.rstrip("/") + "/") for w in writable), (c, var)


@pytest.mark.parametrize("source, mount_kind, path", [
    ("hf://org/model@v1", "emptyDir", "/models/hf/org/model"),
    ("pvc://weights/llama/8b", "persistentVolumeClaim", "/models/llama/8b"),
    ("/opt/models/llama", None, "/opt/models/llama"),
])
def test_model_sources(source, mount_kind, path):
    s = spec(model={"source": source})
    pod = R.worker_statefulset(OWNER, s, 0)["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--model") + 1] == path
    models = [v for v in pod["volumes"] if v["name"] == "models"]
    if mount_kind is None:
        assert not models and not pod["initContainers"]
    else:
        assert mount_kind in models[0]
    if source.startswith("hf://"):
        [init] = pod["initContainers"]
        assert init["command"][:3] == ["kubellm", "models", "download"] and source in init["command"]


def test_hf_token_secret_mirror_and_cache_pvc():
    s = spec(model={"source": "hf://org/gated", "tokenSecret": "hf-token", "endpoint": "https://mirror.example",
                    "cachePVC": "model-cache"})
    pod = R.worker_statefulset(OWNER, s, 0)["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert env["HF_ENDPOINT"]["value"] == "https://mirror.example"
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}} in pod["volumes"]


def test_router_finds_ready_leaders_and_exposes_rest_only_when_enabled():
    plain = spec()
    leaders = R.leaders_service(OWNER, plain)
    assert leaders["spec"]["clusterIP"] == "None" and leaders["spec"]["publishNotReadyAddresses"] is False
    assert leaders["spec"]["selector"][R.POD_INDEX_LABEL] == "0"
    router = R.router_deployment(OWNER, plain)["spec"]["template"]["spec"]["containers"][0]
    assert "llama-leaders.team-a.svc.cluster.local:50051" in " ".join(router["command"])
    assert "--rest-port" not in router["command"]
    assert [p["name"] for p in R.router_service(OWNER, plain)["spec"]["ports"]] == ["grpc"]
    assert R.ingress(OWNER, plain) is None and R.rest_endpoint(OWNER, plain) == ""
    rest = spec(restApi={"enabled": True, "port": 8080, "ingress": {"className": "nginx", "host": "llm.example.com",
                                                                    "tlsSecretName": "tls", "annotations": {"a": "b"}}})
    ing = R.ingress(OWNER, rest)
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["tls"][0]["secretName"] == "tls"
    assert ing["metadata"]["annotations"] == {"a": "b"}
    assert [p["port"] for p in R.router_service(OWNER, rest)["spec"]["ports"]] == [50051, 8080]
    assert R.rest_endpoint(OWNER, rest) == "https://llm.example.com"
    assert R.grpc_endpoint(OWNER, rest) == "llama.team-a.svc.cluster.local:50051"


def test_spec_hash_changes_only_when_workers_must_restart():
    base = spec(replicas=2)
    assert R.worker_spec_hash(base) == R.worker_spec_hash(spec(replicas=5))
    assert R.worker_spec_hash(base) == R.worker_spec_hash(spec(replicas=2, router={"replicas": 3}))
    assert R.worker_spec_hash(base) != R.worker_spec_hash(spec(replicas=2, engine={"maxBatchSize": 8}))
    assert R.worker_spec_hash(base) != R.worker_spec_hash(spec(replicas=2, image="other:1"))
    # The pool only selects the pods: turning it on or pointing it at a picker restarts no model.
    assert R.worker_spec_hash(base) == R.worker_spec_hash(spec(replicas=2, inferencePool={
        "enabled": True, "endpointPickerRef": {"name": "epp"}}))


# -- InferencePool endpoints ---------------------------------------------------------------------
def test_leaders_serve_openai_http_as_the_deployment_and_carry_the_engine_type():
    sts = R.worker_statefulset(OWNER, spec(tensorParallel=2, gpusPerPod=1), 0)
    [worker] = sts["spec"]["template"]["spec"]["containers"]
    command = worker["command"]
    assert command[command.index("--http-port") + 1] == "8000"
    assert command[command.index("--served-model-name") + 1] == "llama"   # requests' `model`, metrics' model_name
    assert {"name": "http", "containerPort": 8000} in worker["ports"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels["inference.networking.k8s.io/engine-type"] == labels["llm-d.ai/engine-type"] == "vllm"
    # The StatefulSet's selector (immutable) does not carry them.
    assert not set(R.ENGINE_TYPE_LABELS) & set(sts["spec"]["selector"]["matchLabels"])
    ports = {p["name"]: p["port"] for p in R.leaders_service(OWNER, spec())["spec"]["ports"]}
    assert ports == {"grpc": 50051, "http": 8000}


@pytest.mark.parametrize("pool, picker", [
    ({"enabled": True}, None),
    ({"enabled": True, "endpointPickerRef": {"name": "llama-epp"}},
     {"kind": "Service", "name": "llama-epp", "port": {"number": 9002}, "failureMode": "FailClose"}),
    ({"enabled": True, "endpointPickerRef": {"name": "epp", "port": 9003, "failureMode": "FailOpen"}},
     {"kind": "Service", "name": "epp", "port": {"number": 9003}, "failureMode": "FailOpen"}),
])
def test_inference_pool_selects_the_leaders_on_the_http_port(pool, picker):
    manifest = R.inference_pool(OWNER, spec(tensorParallel=2, gpusPerPod=1, replicas=3, inferencePool=pool))
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "inference.networking.k8s.io/v1", "InferencePool", "llama")
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    body = manifest["spec"]
    assert body["targetPorts"] == [{"number": 8000}]
    assert body.get("endpointPickerRef") == picker
    # Exactly the rank-0 pods of this deployment's groups: a rank-1 pod's labels, another deployment's,
    # or the router's do not match; every group's leader does.
    match = body["selector"]["matchLabels"]
    sts = R.worker_statefulset(OWNER, spec(tensorParallel=2, gpusPerPod=1), 2)
    leader = {**sts["spec"]["template"]["metadata"]["labels"], R.POD_INDEX_LABEL: "0"}
    assert match.items() <= leader.items()
    assert not match.items() <= {**leader, R.POD_INDEX_LABEL: "1"}.items()
    other = R.worker_statefulset(R.Owner("other", "team-a", "u2"), spec(), 0)["spec"]["template"]["metadata"]["labels"]
    assert not match.items() <= {**other, R.POD_INDEX_LABEL: "0"}.items()
    assert match == R.leaders_service(OWNER, spec())["spec"]["selector"]


def test_no_inference_pool_unless_enabled():
    assert R.inference_pool(OWNER, spec()) is None
    assert R.inference_pool(OWNER, spec(inferencePool={"enabled": False, "endpointPickerRef": {"name": "e"}})) is None
    # Applied on its own path (its CRD may be missing), never among the children.
    assert not by_kind(R.children(OWNER, spec(inferencePool={"enabled": True})), "InferencePool")


def test_engine_configmap_carries_engine_and_generation_settings():
    import json

    cm = R.engine_configmap(OWNER, spec(tensorParallel=2, engine={"maxBatchSize": 8, "blockSize": 32},
                                        generation={"maxNewTokens": 99}))
    engine = json.loads(cm["data"]["engine.json"])
    assert engine["max_batch_size"] == 8 and engine["block_size"] == 32 and engine["tensor_parallel"] == 2
    assert json.loads(cm["data"]["generation.json"])["max_new_tokens"] == 99


def test_builders_are_pure_and_deterministic():
    s = spec(replicas=3, restApi={"enabled": True})
    assert R.children(OWNER, s) == R.children(OWNER, s)
    assert len(by_kind(R.children(OWNER, spec(replicas=0)), "StatefulSet")) == 0


def test_operator_never_imports_torch():
    code = ("import sys, kubellm.api.spec, kubellm.operator.resources, kubellm.operator.status; "
            "import kubellm.operator.handlers; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_device_requests_no_gpu_and_exposes_metrics():
    gpu = R.worker_statefulset(OWNER, spec(tensorParallel=2), 0)["spec"]["template"]["spec"]["containers"][0]
    cpu = R.worker_statefulset(OWNER, spec(device="cpu", image="ghcr.io/kubellm/runtime:0.1.0-cpu"), 0)
    worker = cpu["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(worker["resources"]) and gpu["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["command"][-2:] == ["--device", "cpu"] and "--device" not in gpu["command"]
    assert worker["image"] == "ghcr.io/kubellm/runtime:0.1.0-cpu" and gpu["image"] == R.DEFAULT_IMAGE
    router = R.router_deployment(OWNER, spec())["spec"]["template"]["spec"]["containers"][0]
    for container in (worker, gpu, router):
        assert {"name": R.METRICS_PORT_NAME, "containerPort": R.METRICS_PORT} in container["ports"]
        assert container["command"][container["command"].index("--metrics-port") + 1] == str(R.METRICS_PORT)


def test_router_pods_run_the_router_image_and_workers_the_specs():
    """The operator's router image (KUBELLM_ROUTER_IMAGE, the chart's routerImage) is every router's;
    spec.image is the workers'. Without a router image the router runs the workers' image."""
    cpu = spec(device="cpu", image="ghcr.io/kubellm/runtime:0.1.0-cpu")
    objs = R.children(OWNER, cpu, router_image="ghcr.io/kubellm/router:0.1.0")
    [router] = by_kind(objs, "Deployment")
    assert router["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kubellm/router:0.1.0"
    for sts in by_kind(objs, "StatefulSet"):
        assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kubellm/runtime:0.1.0-cpu"
    [router] = by_kind(R.children(OWNER, cpu), "Deployment")
    assert router["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kubellm/runtime:0.1.0-cpu"
    assert R.router_deployment(OWNER, spec())["spec"]["template"]["spec"]["containers"][0]["image"] == R.DEFAULT_IMAGE


def test_gateway_doc_shows_what_the_operator_creates():
    """docs/gateway.md's LLMDeployment is valid and its InferencePool is the one the builder makes of it."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    [llmd] = [b for b in blocks if b["kind"] == "LLMDeployment"]
    [shown] = [b for b in blocks if b["kind"] == "InferencePool"]
    owner = R.Owner(llmd["metadata"]["name"], "default", "uid")
    built = R.inference_pool(owner, LLMDeploymentSpec.model_validate(llmd["spec"]))
    assert shown["apiVersion"] == built["apiVersion"] and shown["metadata"]["name"] == built["metadata"]["name"]
    assert shown["spec"] == built["spec"]

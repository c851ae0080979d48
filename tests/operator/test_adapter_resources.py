"""spec.adapters -> every rank's pod: `--lora NAME=PATH` flags that the real `kubellm worker` parser reads, the
PVCs mounted read-only (the model's own claim once), and an init container per hf:// adapter that downloads it
as the model's does (the workers stay offline). Pure builders, table tests."""

from __future__ import annotations

import pytest

from kubellm.api.spec import LLMDeploymentSpec
from kubellm.operator import resources as R
from kubellm.runtime.cli.main import build_parser
from kubellm.runtime.hub.adapters import parse_lora_flags

OWNER = R.Owner("llm", "team-a", "uid-1")
HF_MODEL = {"source": "hf://meta-llama/Llama-3-8B", "tokenSecret": "hf-token", "endpoint": "https://mirror.example"}
PVC_MODEL = {"source": "pvc://weights/llama-3-8b"}
PATH_MODEL = {"source": "/opt/models/tiny"}


def spec(model: dict, adapters: list[dict], **fields) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": model, "adapters": adapters, **fields})


def pod(s: LLMDeploymentSpec, index: int = 0) -> dict:
    return R.worker_statefulset(OWNER, s, index)["spec"]["template"]["spec"]


def lora_flags(command: list[str]) -> dict[str, str]:
    """What the worker's own parser makes of the command's --lora flags."""
    args = build_parser().parse_args(command[1:])
    return parse_lora_flags(args.lora)


# (model, adapters, where the worker finds each adapter)
PATHS = {
    "hf adapter beside an hf model": (
        HF_MODEL, [{"name": "sql", "source": "hf://org/sql-lora"}],
        {"sql": "/models/adapters/hf/org/sql-lora"}),
    "revision kept apart": (
        HF_MODEL, [{"name": "a", "source": "hf://org/lora@v1"}, {"name": "b", "source": "hf://org/lora@v2"}],
        {"a": "/models/adapters/hf/org/lora@v1", "b": "/models/adapters/hf/org/lora@v2"}),
    "hf adapter, pvc model": (
        PVC_MODEL, [{"name": "sql", "source": "hf://org/sql-lora"}],
        {"sql": "/adapters/hf/org/sql-lora"}),
    "adapter on the model's claim": (
        PVC_MODEL, [{"name": "sql", "source": "pvc://weights/adapters/sql"}],
        {"sql": "/models/adapters/sql"}),
    "adapter on its own claim": (
        PVC_MODEL, [{"name": "sql", "source": "pvc://loras/sql"}, {"name": "chat", "source": "pvc://loras/chat"},
                    {"name": "root", "source": "pvc://whole"}],
        {"sql": "/adapters/pvc/loras/sql", "chat": "/adapters/pvc/loras/chat", "root": "/adapters/pvc/whole"}),
    "path in the image": (
        PATH_MODEL, [{"name": "code", "source": "/opt/adapters/code"}], {"code": "/opt/adapters/code"}),
    "none": (PATH_MODEL, [], {}),
}


@pytest.mark.parametrize("model, adapters, paths", PATHS.values(), ids=PATHS.keys())
def test_every_rank_gets_each_adapter_as_a_lora_flag(model, adapters, paths):
    s = spec(model, adapters, tensorParallel=2, gpusPerPod=1, replicas=2)
    assert R.adapter_paths(s) == paths
    for index in (0, 1):   # every group; its StatefulSet's template is every rank's pod
        command = pod(s, index)["containers"][0]["command"]
        assert lora_flags(command) == paths
        assert R.worker_statefulset(OWNER, s, index)["spec"]["replicas"] == 2


def mounts(p: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in p["containers"][0]["volumeMounts"]}


def volumes(p: dict) -> dict[str, dict]:
    return {v["name"]: v for v in p["volumes"]}


def test_each_claim_is_mounted_once_read_only_and_the_models_claim_is_reused():
    s = spec(PVC_MODEL, [{"name": "a", "source": "pvc://loras/a"}, {"name": "b", "source": "pvc://loras/b"},
                         {"name": "c", "source": "pvc://weights/adapters/c"}, {"name": "d", "source": "pvc://more/d"}])
    p = pod(s)
    claims = [v["persistentVolumeClaim"] for v in p["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "weights", "readOnly": True}, {"claimName": "loras", "readOnly": True},
                      {"claimName": "more", "readOnly": True}]
    m = mounts(p)
    assert m["/adapters/pvc/loras"]["readOnly"] and m["/adapters/pvc/more"]["readOnly"]
    assert m["/models"]["name"] == "models"
    assert p["initContainers"] == []   # nothing to download
    every = [v["name"] for v in p["volumes"]]
    assert len(every) == len(set(every))   # volume names are unique in a pod


def test_hf_adapters_are_downloaded_by_init_containers_like_the_model():
    s = spec(HF_MODEL, [{"name": "sql", "source": "hf://org/sql-lora@main"}, {"name": "code", "source": "/opt/code"},
                        {"name": "chat", "source": "hf://org/chat-lora"}])
    p = pod(s)
    model, *adapters = p["initContainers"]
    assert model["name"] == "download-model"
    assert [c["name"] for c in adapters] == ["download-adapter-0", "download-adapter-1"]
    assert [c["command"] for c in adapters] == [
        ["kubellm", "models", "download", "hf://org/sql-lora@main", "--dest", "/models/adapters/hf/org/sql-lora@main",
         "--adapter"],
        ["kubellm", "models", "download", "hf://org/chat-lora", "--dest", "/models/adapters/hf/org/chat-lora",
         "--adapter"]]
    for c in adapters:   # the model's token, endpoint, HF_HOME and security context; its (writable) volume
        assert c["env"] == model["env"] and c["volumeMounts"] == model["volumeMounts"]
        assert c["securityContext"] == model["securityContext"] and c["image"] == model["image"]
    env = {e["name"]: e for e in model["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert env["HF_ENDPOINT"]["value"] == "https://mirror.example"
    # The worker reads them offline from the model's volume, read-only.
    worker_env = {e["name"]: e.get("value") for e in p["containers"][0]["env"]}
    assert worker_env["HF_HUB_OFFLINE"] == "1"
    assert mounts(p)["/models"]["readOnly"] and "adapters" not in volumes(p)


def test_hf_adapters_of_a_model_not_downloaded_get_their_own_volume():
    s = spec({"source": "pvc://weights/llama", "tokenSecret": "hf-token"}, [{"name": "sql", "source": "hf://org/sql"}])
    p = pod(s)
    [init] = p["initContainers"]
    assert init["command"][-3:] == ["--dest", "/adapters/hf/org/sql", "--adapter"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"adapters": "/adapters", "tmp": "/tmp"}
    assert {e["name"] for e in init["env"]} >= {"HF_TOKEN", "HF_HOME"}
    assert volumes(p)["adapters"] == {"name": "adapters", "emptyDir": {}}
    assert mounts(p)["/adapters"] == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}


def test_changing_the_adapters_replaces_the_groups_and_raises_nothing_else():
    base = spec(HF_MODEL, [{"name": "sql", "source": "hf://org/sql"}])
    other = spec(HF_MODEL, [{"name": "sql", "source": "hf://org/sql@v2"}])
    assert R.worker_spec_hash(base) != R.worker_spec_hash(other)
    assert R.worker_spec_hash(base) == R.worker_spec_hash(spec(HF_MODEL, [{"name": "sql", "source": "hf://org/sql"}]))


def test_the_engine_knobs_reach_the_config_map_and_the_lora_rank_too():
    s = spec(PATH_MODEL, [{"name": "code", "source": "/opt/code"}],
             engine={"modelImpl": "transformers", "eviction": "copy", "numCpuBlocks": 64, "ropeScalingFactor": 2.0,
                     "useLognAttn": True, "maxLoraRank": 8})
    import json
    data = json.loads(R.engine_configmap(OWNER, s)["data"]["engine.json"])
    assert {k: data[k] for k in ("model_impl", "eviction", "num_cpu_blocks", "rope_scaling_factor", "use_logn_attn",
                                 "max_lora_rank")} == {"model_impl": "transformers", "eviction": "copy",
                                                       "num_cpu_blocks": 64, "rope_scaling_factor": 2.0,
                                                       "use_logn_attn": True, "max_lora_rank": 8}
    assert "adapters" not in data   # the adapters are flags (paths in the container), not config


def test_an_operator_upgrade_does_not_roll_groups_whose_spec_did_not_change():
    """The worker spec hash of a spec written before spec.adapters and the later engine fields is what the operator
    before them computed (pinned: computed by the code of commit c8987d5), so upgrading the operator replaces no
    pod; setting one of the new fields does change it."""
    old = {"model": {"source": "hf://org/x"}, "engine": {"dtype": "bfloat16"}}
    assert R.worker_spec_hash(LLMDeploymentSpec.model_validate(old)) == "41cb0fda275e28e9"
    layout = {"model": {"source": "/m"}, "tensorParallel": 2, "limits": {"maxLogprobs": 3}}
    assert R.worker_spec_hash(LLMDeploymentSpec.model_validate(layout)) == "4cbf090e3529c6e1"
    for changed in ({"engine": {"dtype": "bfloat16", "maxLoraRank": 8}}, {"engine": {"dtype": "bfloat16",
                    "modelImpl": "transformers"}}, {"adapters": [{"name": "sql", "source": "/a/sql"}]}):
        assert R.worker_spec_hash(LLMDeploymentSpec.model_validate({**old, **changed})) != "41cb0fda275e28e9"

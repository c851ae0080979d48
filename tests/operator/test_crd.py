"""The LLMDeployment CRD generated from api/spec.py: up to date, structural, and enforcing
what the operator itself enforces (bounds and patterns in the schema, cross-field rules in CEL)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubellm.api import spec
from kubellm.operator import crd, structural

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = [ROOT / "crds" / crd.CRD_FILE, ROOT / "charts" / "kubellm" / "files" / crd.CRD_FILE]


@pytest.fixture(scope="module")
def manifest():
    return crd.crd_manifest()


@pytest.fixture(scope="module")
def version(manifest):
    return manifest["spec"]["versions"][0]


@pytest.fixture(scope="module")
def schema(version):
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def spec_schema(schema):
    return schema["properties"]["spec"]


def walk(node, path=""):
    """(path, node) for every schema node under `node`."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def at(node, dotted):
    for part in dotted.strip(".").split("."):
        node = node["properties"][part]
    return node


def apply_defaults(value, node):
    """What the API server does before validation: fill in `default`s top-down."""
    if isinstance(value, dict) and node.get("type") == "object":
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                apply_defaults(value[name], child)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            apply_defaults(item, node["items"])
    return value


# -- generated and committed -------------------------------------------------------------------
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_is_up_to_date(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing; run: {crd.REGENERATE}"
    assert path.read_text(encoding="utf-8") == crd.render(), (
        f"{path.relative_to(ROOT)} is out of date with api/spec.py; run: {crd.REGENERATE}")


def test_check_mode_reports_stale_files(tmp_path, capsys):
    assert crd.main(["--write", "--root", str(tmp_path)]) == 0
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0
    stale = tmp_path / "charts" / "kubellm" / "files" / crd.CRD_FILE
    stale.write_text(stale.read_text().replace("maxLength: 512", "maxLength: 511"))
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and crd.REGENERATE in err and "maxLength: 511" in err


def test_printed_yaml_is_the_manifest(capsys):
    assert crd.main([]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == crd.crd_manifest()


# -- the resource ------------------------------------------------------------------------------
def test_names_and_version(manifest, version):
    body = manifest["spec"]
    assert manifest["apiVersion"] == "apiextensions.k8s.io/v1"
    assert manifest["metadata"]["name"] == "llmdeployments.kubellm.io"
    assert body["group"] == "kubellm.io" and body["scope"] == "Namespaced"
    assert body["names"] == {"kind": "LLMDeployment", "listKind": "LLMDeploymentList", "plural": "llmdeployments",
                             "singular": "llmdeployment", "shortNames": ["llmd"], "categories": ["kubellm"]}
    assert [v["name"] for v in body["versions"]] == ["v1alpha1"]
    assert version["served"] and version["storage"]


def test_status_and_scale_subresources(version):
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".status.selector"}}


def test_printer_columns(version, schema):
    columns = [(c["name"].upper(), c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("MODEL", "string", ".spec.model.source"),
        ("TP", "integer", ".spec.tensorParallel"),
        ("PP", "integer", ".spec.pipelineParallel"),
        ("READY", "string", ".status.ready"),  # "2/2", as for a Deployment
        ("PHASE", "string", ".status.phase"),
        ("ENDPOINT", "string", ".status.endpoint"),
        ("LOAD-SECONDS", "number", ".status.lastLoadSeconds"),
        ("AGE", "date", ".metadata.creationTimestamp"),
    ]
    # Only -o wide shows the load time; the default table stays as narrow as before.
    assert [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")] == ["Load-Seconds"]
    for name, kind, path in columns:  # each column shows a field of that type
        if not path.startswith(".metadata"):
            assert at(schema, path)["type"] == kind, name


# -- structural --------------------------------------------------------------------------------
def test_schema_is_structural(schema):
    assert structural.structural_problems(schema) == []
    for path, node in walk(schema):
        assert not {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title"} & set(node), path
        assert ("type" in node or node.get("x-kubernetes-preserve-unknown-fields")
                or node.get("x-kubernetes-int-or-string")), path
        assert node.get("additionalProperties") is not False, path


def test_structural_check_catches_problems():
    assert structural.structural_problems({"type": "object", "properties": {"a": {"$ref": "#/x"}}})
    assert structural.structural_problems({"type": "object", "properties": {"a": {"description": "no type"}}})
    assert structural.structural_problems({"type": "object", "properties": {"a": {"type": "string"}},
                                    "additionalProperties": False})
    assert structural.structural_problems({"type": "array"})
    assert structural.structural_problems({"type": "integer", "minimum": 0, "exclusiveMinimum": 0})
    assert structural.structural_problems({"type": "integer", "default": -1, "minimum": 0})
    assert structural.structural_problems({"type": "object", "properties": {"a": {"type": "string"}},
                                    "x-kubernetes-validations": [{"rule": "true", "fieldPath": ".b"}]})
    assert structural.structural_problems({"type": "object", "properties": {
        "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}}})


def test_conversion_refuses_what_has_no_structural_form():
    with pytest.raises(structural.SchemaError, match="union"):
        structural.to_structural({"anyOf": [{"type": "string"}, {"type": "boolean"}]})
    with pytest.raises(structural.SchemaError, match="const"):
        structural.to_structural({"type": "string", "const": "x"})


def test_unknown_fields_are_not_preserved(schema, spec_schema):
    free = {path for path, node in walk(schema) if node.get("x-kubernetes-preserve-unknown-fields")}
    assert free == {".spec.tolerations[*]", ".spec.affinity"}
    assert "replica" not in spec_schema["properties"]


def test_optional_fields_drop_null(spec_schema):
    gpus = spec_schema["properties"]["gpusPerPod"]
    assert gpus == {"description": gpus["description"], "type": "integer", "minimum": 1, "maximum": 64}
    assert "default" not in at(spec_schema, "model.tokenSecret")
    assert "nullable" not in str(spec_schema)


def test_maps_and_lists(spec_schema):
    assert spec_schema["properties"]["nodeSelector"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert at(spec_schema, "restApi.ingress.annotations")["additionalProperties"] == {"type": "string"}
    tolerations = spec_schema["properties"]["tolerations"]
    assert tolerations["type"] == "array" and tolerations["maxItems"] == structural.DEFAULT_MAX_ITEMS
    assert tolerations["items"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def test_defaults_and_bounds(spec_schema):
    replicas = spec_schema["properties"]["replicas"]
    # No schema default: the exclusivity rule with autoscaling must tell a hand-set replicas from none.
    assert (replicas["type"], replicas["minimum"], "default" in replicas) == ("integer", 0, False)
    assert spec.LLMDeploymentSpec.model_validate({"model": {"source": "smollm2-135m"}}).replicas == 1
    tp = spec_schema["properties"]["tensorParallel"]
    assert (tp["minimum"], tp["maximum"], tp["default"]) == (1, 64, 1)
    assert at(spec_schema, "router.port")["default"] == 50051
    assert at(spec_schema, "restApi.port")["default"] == 28080
    fraction = at(spec_schema, "engine.kvCacheFraction")
    assert (fraction["minimum"], fraction["exclusiveMinimum"], fraction["maximum"]) == (0, True, 1)
    assert at(spec_schema, "engine.dtype")["enum"] == ["auto", "float32", "float16", "bfloat16"]
    source = at(spec_schema, "model.source")
    assert source["pattern"] == spec.MODEL_SOURCE_PATTERN and source["maxLength"] == 512
    assert spec_schema["required"] == ["model"]
    for block in ("engine", "generation", "router", "restApi"):  # nested defaults apply to an absent block
        assert spec_schema["properties"][block]["default"] == {}
    assert "default" not in at(spec_schema, "restApi.ingress")  # an Ingress only when asked for


def test_server_defaults_equal_the_operator_defaults(spec_schema):
    minimal = {"model": {"source": "hf://org/name"}}
    defaulted = apply_defaults(copy.deepcopy(minimal), spec_schema)
    expected = spec.LLMDeploymentSpec.model_validate(minimal).model_dump(exclude_none=True)
    expected.pop("replicas")   # resolved by the operator (1 without autoscaling); no schema default on purpose
    for empty in ("resources", "nodeSelector", "tolerations", "affinity", "adapters"):
        expected.pop(empty)
        defaulted.pop(empty, None)
    assert defaulted == expected


def test_status_schema(schema):
    status = schema["properties"]["status"]
    for field in ("phase", "replicas", "readyReplicas", "ready", "selector", "endpoint", "restEndpoint",
                  "observedGeneration", "conditions"):
        assert field in status["properties"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) >= {"type", "status"}


def test_object_name_fits_the_children():
    properties = crd.openapi_schema()["properties"]
    name, replicas = properties["metadata"]["properties"]["name"], properties["spec"]["properties"]["replicas"]
    statefulset = f"{'a' * name['maxLength']}-g{replicas['maximum'] - 1}"  # resources.group_name
    # the pods' controller-revision-hash label is "<statefulset>-<hash of up to 10 characters>"
    assert len(statefulset) + 11 <= 63


# -- CEL ---------------------------------------------------------------------------------------
def test_every_cel_rule_is_in_the_crd(spec_schema):
    validations = spec_schema["x-kubernetes-validations"]
    assert len(validations) == len(spec.CEL_RULES)
    for rule, entry in zip(spec.CEL_RULES, validations):
        assert entry["rule"] == rule.cel and entry["message"] == rule.message
        assert "spec" + entry["fieldPath"] == rule.field
        assert structural.lookup(spec_schema, entry["fieldPath"]) is not None


def test_cel_cost_is_bounded(schema, spec_schema):
    for path, node in walk(schema):
        if node.get("type") == "array":
            assert "maxItems" in node, path
    for rule in spec.CEL_RULES:  # every string a rule reads has a maxLength
        for dotted in ("model.source", "model.tokenSecret", "model.cachePVC"):
            if f"self.{dotted}" in rule.cel:
                assert "maxLength" in at(spec_schema, dotted), (rule.cel, dotted)


def test_patterns_are_re2():
    re2 = pytest.importorskip("re2", reason="google-re2 checks patterns as Go's regexp would")
    for path, node in walk(crd.openapi_schema()):
        if "pattern" in node:
            re2.compile(node["pattern"])


# -- what the API server and the operator reject -------------------------------------------------
SOURCE = {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}
INVALID = {
    "negative replicas": ({"model": SOURCE, "replicas": -1}, "replicas"),
    "ingress without REST": ({"model": SOURCE, "restApi": {"ingress": {"host": "llm.example.com"}}}, "restApi.ingress"),
    "unknown field": ({"model": SOURCE, "replica": 2}, "replica"),
    "bad model source": ({"model": {"source": "s3://bucket/model"}}, "source"),
    "gpusPerPod does not divide tp x pp": ({"model": SOURCE, "tensorParallel": 4, "gpusPerPod": 3}, "gpusPerPod"),
    "token for a pvc": ({"model": {"source": "pvc://weights/llama", "tokenSecret": "hf"}}, "tokenSecret"),
    "REST on the gRPC port": ({"model": SOURCE, "restApi": {"enabled": True, "port": 50051}}, "restApi.port"),
    "zero tensor parallel": ({"model": SOURCE, "tensorParallel": 0}, "tensorParallel"),
    "autoscaling min above max": ({"model": SOURCE, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
                                  "autoscaling.minReplicas"),
    "autoscaling without max": ({"model": SOURCE, "autoscaling": {"minReplicas": 0}}, "autoscaling"),
    "gatewayFrom without a pool": ({"model": SOURCE, "networkPolicy": {"gatewayFrom": {"gateway": "yes"}}},
                                   "networkPolicy.gatewayFrom"),
    "metricsFrom key not a label key": ({"model": SOURCE, "networkPolicy": {"metricsFrom": {"has space": "x"}}},
                                        "networkPolicy.metricsFrom"),
    "metricsFrom value not a label value": ({"model": SOURCE, "networkPolicy": {"metricsFrom": {"team": "a b"}}},
                                            "networkPolicy.metricsFrom.team"),
    "gatewayFrom key not a label key": ({"model": SOURCE, "inferencePool": {"enabled": True},
                                         "networkPolicy": {"gatewayFrom": {"-bad/": "x"}}}, "networkPolicy.gatewayFrom"),
    "api key secret not a name": ({"model": SOURCE, "restApi": {"apiKeySecret": "sk-Secret_Value"}},
                                  "restApi.apiKeySecret"),
    "tls secret not a name": ({"model": SOURCE, "router": {"tlsSecretName": "Not A Name"}}, "router.tlsSecretName"),
    "request bytes too small": ({"model": SOURCE, "limits": {"maxRequestBytes": 1}}, "limits.maxRequestBytes"),
    "rate limit without a rate": ({"model": SOURCE, "limits": {"rateLimit": {"burst": 3}}}, "limits.rateLimit"),
    "unknown model implementation": ({"model": SOURCE, "engine": {"modelImpl": "vllm"}}, "engine.modelImpl"),
    "unknown eviction": ({"model": SOURCE, "engine": {"eviction": "swap"}}, "engine.eviction"),
    "copy eviction without host blocks": ({"model": SOURCE, "engine": {"eviction": "copy"}}, "engine.numCpuBlocks"),
    "negative host blocks": ({"model": SOURCE, "engine": {"numCpuBlocks": -1}}, "engine.numCpuBlocks"),
    "compile on GPUs": ({"model": SOURCE, "engine": {"compile": True}}, "engine.compile"),
    "rope scaling below 1": ({"model": SOURCE, "engine": {"ropeScalingFactor": 0.5}}, "engine.ropeScalingFactor"),
    "zero lora rank": ({"model": SOURCE, "engine": {"maxLoraRank": 0}}, "engine.maxLoraRank"),
    "adapter name not a label": ({"model": SOURCE, "adapters": [{"name": "SQL_lora", "source": "/a/sql"}]},
                                 "adapters.0.name"),
    "adapter without a source": ({"model": SOURCE, "adapters": [{"name": "sql"}]}, "adapters.0"),
    "adapter from a known model name": ({"model": SOURCE, "adapters": [{"name": "sql", "source": "smollm2-135m"}]},
                                        "adapters.0.source"),
    "adapter from s3": ({"model": SOURCE, "adapters": [{"name": "sql", "source": "s3://bucket/sql"}]},
                        "adapters.0.source"),
    "two adapters of one name": ({"model": SOURCE, "adapters": [{"name": "sql", "source": "/a/sql"},
                                                                {"name": "sql", "source": "hf://org/sql"}]},
                                 "adapters"),
    "token for pvc model and adapters": ({"model": {"source": "pvc://weights/llama", "tokenSecret": "hf"},
                                          "adapters": [{"name": "sql", "source": "pvc://weights/sql"}]},
                                         "tokenSecret"),
}
VALID = [
    {"model": SOURCE},
    {"model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct@main", "tokenSecret": "hf-token", "cachePVC": "hf-cache"},
     "tensorParallel": 2, "pipelineParallel": 2, "gpusPerPod": 2, "replicas": 0},
    {"model": {"source": "pvc://models/llama-3-8b"}, "replicas": 3,
     "restApi": {"enabled": True, "ingress": {"host": "llm.example.com", "tlsSecretName": "llm-tls"}},
     "resources": {"requests": {"cpu": "4", "memory": "32Gi"}}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
    {"model": {"source": "/opt/models/tiny"}, "engine": {"dtype": "bfloat16", "kvCacheFraction": 0.5}},
    {"model": {"source": "smollm2-135m"}, "generation": {"temperature": 0.7, "topP": 0.9}},
    {"model": {"source": "smollm2-135m"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}},
    {"model": {"source": "smollm2-135m"}, "restApi": {"enabled": True, "apiKeySecret": "llm-keys"},
     "router": {"tlsSecretName": "llm-tls"}, "inferencePool": {"enabled": True},
     "networkPolicy": {"metricsFrom": {"kubernetes.io/metadata.name": "monitoring"}, "gatewayFrom": {"gw": "true"}},
     "limits": {"maxRequestBytes": 65536, "maxConcurrentStreamsPerConnection": 10, "maxPromptsPerRequest": 8,
                "maxLogprobs": 5, "rateLimit": {"requestsPerSecond": 2.5, "burst": 10}}},
    {"model": {"source": "smollm2-135m"}, "networkPolicy": {"enabled": False}},
    {"model": SOURCE, "engine": {"modelImpl": "transformers", "eviction": "copy", "numCpuBlocks": 256,
                                 "ropeScalingFactor": 4.0, "useLognAttn": True, "maxLoraRank": 16}},
    {"model": SOURCE, "device": "cpu", "engine": {"compile": True}},
    {"model": SOURCE, "adapters": [{"name": "sql", "source": "hf://org/sql-lora@v1"},
                                   {"name": "chat-2", "source": "pvc://adapters/chat"},
                                   {"name": "code", "source": "/opt/adapters/code"}]},
    # a gated adapter on the Hub beside a model on a PVC: the token is the adapter's
    {"model": {"source": "pvc://weights/llama", "tokenSecret": "hf"},
     "adapters": [{"name": "sql", "source": "hf://org/sql-lora"}]},
]


@pytest.mark.parametrize("replicas, autoscaling, expected", [
    (None, None, 1), (3, None, 3), (0, None, 0),
    (None, {"maxReplicas": 4}, 1),                       # unset: the floor (minReplicas defaults to 1)
    (None, {"minReplicas": 0, "maxReplicas": 4}, 0),
    (2, {"minReplicas": 0, "maxReplicas": 4}, 2),        # what the autoscaler wrote
    (9, {"minReplicas": 1, "maxReplicas": 4}, 4),        # a write beyond the range, or a narrowed range
])
def test_replicas_as_the_operator_runs_them(replicas, autoscaling, expected):
    body = {"model": SOURCE, **({"replicas": replicas} if replicas is not None else {}),
            **({"autoscaling": autoscaling} if autoscaling else {})}
    assert spec.LLMDeploymentSpec.model_validate(body).replicas == expected


def draft4(schema):
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 bounds are draft 4's (boolean exclusiveMinimum)


def cel_failures(spec_schema, body):
    """Fields named by the CEL rules that `body` (defaulted, as the API server sees it) breaks. Transition rules
    (oldSelf) have no Python twin: the real API server checks them (e2e/test_autoscaling.py)."""
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    env = celpy.Environment()
    activation = {"self": celpy.json_to_cel(apply_defaults(copy.deepcopy(body), spec_schema))}
    return ["spec" + entry["fieldPath"] for entry in spec_schema["x-kubernetes-validations"]
            if not entry.get("optionalOldSelf") and not env.program(env.compile(entry["rule"])).evaluate(activation)]


@pytest.mark.parametrize("body, field", INVALID.values(), ids=INVALID.keys())
def test_operator_rejects_naming_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        spec.LLMDeploymentSpec.model_validate(body)
    assert field in str(err.value)


@pytest.mark.parametrize("body, field", INVALID.values(), ids=INVALID.keys())
def test_crd_rejects_naming_the_field(spec_schema, body, field):
    """The API server's view: unknown fields, then the OpenAPI schema, then CEL (with fieldPath)."""
    unknown = set(body) - set(spec_schema["properties"])
    if unknown:
        assert unknown == {field}
        return
    errors = [".".join(map(str, e.absolute_path)) for e in draft4(spec_schema).iter_errors(body)]
    if errors:
        assert any(path.endswith(field) for path in errors), errors
        return
    assert any(failure.endswith(field) for failure in cel_failures(spec_schema, body))


@pytest.mark.parametrize("body", VALID, ids=range(len(VALID)))
def test_valid_specs_pass_everywhere(spec_schema, body):
    spec.LLMDeploymentSpec.model_validate(body)
    assert list(draft4(spec_schema).iter_errors(apply_defaults(copy.deepcopy(body), spec_schema))) == []
    assert cel_failures(spec_schema, body) == []


def test_cel_and_python_rules_agree(spec_schema):
    """Over many layouts, the API server (schema + CEL) accepts exactly what the operator accepts."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    pytest.importorskip("celpy")
    validator = draft4(spec_schema)

    model = st.fixed_dictionaries({"source": st.sampled_from(["hf://org/name", "pvc://claim/dir", "/models/x", "tiny"])},
                                  optional={"tokenSecret": st.just("hf-token"), "cachePVC": st.just("cache")})
    rest = st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "port": st.sampled_from([8080, 50051]),
                                               "ingress": st.just({"host": "a.example.com"})})
    body = st.fixed_dictionaries(
        {"model": model},
        optional={"tensorParallel": st.integers(1, 8), "pipelineParallel": st.integers(1, 4),
                  "gpusPerPod": st.integers(1, 8), "replicas": st.integers(-1, 3), "restApi": rest,
                  "router": st.fixed_dictionaries({}, optional={"port": st.sampled_from([8080, 50051])}),
                  "device": st.sampled_from(["gpu", "cpu"]),
                  "engine": st.fixed_dictionaries({}, optional={"compile": st.booleans()})})

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(body)
    def check(body):
        try:
            spec.LLMDeploymentSpec.model_validate(body)
            python_error = None
        except ValidationError as err:
            python_error = str(err)
        defaulted = apply_defaults(copy.deepcopy(body), spec_schema)
        schema_ok = not list(validator.iter_errors(defaulted))
        failures = cel_failures(spec_schema, body) if schema_ok else []
        assert (python_error is None) == (schema_ok and not failures), (body, python_error, failures)
        if failures:  # the operator names the first rule that fails, as the API server does
            assert failures[0] in python_error

    check()


# -- rules over the whole object (metadata.name) ---------------------------------------------------
def test_an_adapter_named_like_the_deployment_is_refused_by_the_api_server_and_the_operator(schema):
    """The base model is served under the LLMDeployment's name: an adapter of that name could not be asked for.
    The rule sits at the CRD's root, where CEL may read metadata.name."""
    celpy = pytest.importorskip("celpy")
    from kubellm.operator.handlers import parse_spec
    import kopf

    [entry] = schema["x-kubernetes-validations"]
    assert entry["fieldPath"] == ".spec.adapters" and "rename the adapter" in entry["message"]
    env = celpy.Environment()
    program = env.program(env.compile(entry["rule"]))
    body = {"model": SOURCE, "adapters": [{"name": "sql", "source": "/a/sql"}, {"name": "llm", "source": "/a/b"}]}
    for name, allowed in (("llm", False), ("chat", True)):
        obj = {"metadata": {"name": name}, "spec": body}
        assert bool(program.evaluate({"self": celpy.json_to_cel(obj)})) is allowed
        assert (spec.object_problem(name, spec.LLMDeploymentSpec.model_validate(body)) is None) is allowed
        if allowed:
            assert parse_spec(body, name).adapters[1].name == "llm"
        else:
            with pytest.raises(kopf.PermanentError, match="spec.adapters: an adapter may not be named like"):
                parse_spec(body, name)
    no_adapters = {"metadata": {"name": "llm"}, "spec": {"model": SOURCE}}
    assert bool(program.evaluate({"self": celpy.json_to_cel(no_adapters)}))

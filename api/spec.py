"""The `LLMDeployment` resource (kubellm.io/v1alpha1), written once as pydantic types.

The CRD's OpenAPI schema in `crds/` is generated from these types (`python -m
kubellm.operator.crd`); the operator parses every object it reconciles through them. Field
names are the Kubernetes (camelCase) names. Cross-field rules live in `CEL_RULES` so the API
server enforces them too, and in `LLMDeploymentSpec._cross_field` for the operator itself.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubellm.api.runtime_settings import RuntimeSettings

GROUP = "kubellm.io"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]
# The runtime image (CUDA) used when a spec names none; the operator's KUBELLM_RUNTIME_IMAGE (the Helm
# value runtimeImage) overrides it, so the CRD itself carries no image default.
DEFAULT_IMAGE = "ghcr.io/kubellm/runtime:0.1.0"

# hf://org/name[@revision], pvc://claim/path, an absolute path inside the image, or a known name.
MODEL_SOURCE_PATTERN = (r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
                        r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
                        r"|/[^\s]*"
                        r"|[a-z0-9][a-z0-9.-]*)$")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A LoRA adapter's source: hf://org/name[@revision], pvc://claim/path or an absolute path in the image (a known
# model name is a base model, never an adapter).
ADAPTER_SOURCE_PATTERN = (r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
                          r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
                          r"|/[^\s]*)$")
# An adapter's name: what a request's `adapter` (and OpenAI's `model`) names, and a label value in the metrics.
ADAPTER_NAME_PATTERN = DNS_LABEL
MAX_ADAPTERS = 32
# A label's key ([prefix/]name) and value, as the API server checks them in a NetworkPolicy's selectors.
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Spec):
    """Where the weights come from."""

    source: str = Field(..., pattern=MODEL_SOURCE_PATTERN, max_length=512,
                        description="hf://org/name[@revision], pvc://claim/path, an absolute path in the image, "
                                    "or a known model name such as smollm2-135m")
    tokenSecret: str | None = Field(None, pattern=DNS_LABEL, max_length=253,
                                    description="Secret with key HF_TOKEN, for gated hf:// models")
    endpoint: str | None = Field(None, pattern=r"^https?://", max_length=512,
                                 description="Hugging Face mirror endpoint (HF_ENDPOINT)")
    cachePVC: str | None = Field(None, pattern=DNS_LABEL, max_length=253,
                                 description="shared PVC the hf:// download is cached in; emptyDir when unset")

    @property
    def kind(self) -> Literal["hf", "pvc", "path", "name"]:
        if self.source.startswith("hf://"):
            return "hf"
        if self.source.startswith("pvc://"):
            return "pvc"
        return "path" if self.source.startswith("/") else "name"

    @property
    def display(self) -> str:
        """Short form for `kubectl get`: org/name, claim/path or the path."""
        return re.sub(r"^(hf|pvc)://", "", self.source)


class EngineSpec(_Spec):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    maxBatchSize: int = Field(64, ge=1, le=4096)
    maxNumBatchedTokens: int = Field(2048, ge=16, le=1_048_576)
    kvCacheFraction: float = Field(0.9, gt=0, le=1)
    blockSize: int = Field(16, ge=1, le=1024)
    sessionLen: int | None = Field(None, ge=2, le=10_000_000)
    enablePrefixCaching: bool = True
    modelImpl: Literal["auto", "kubellm", "transformers"] = Field(
        "auto", description="auto: kubellm's own model file where the architecture has one, else transformers' "
                            "modeling code on kubellm's paged KV cache; kubellm / transformers: only that one "
                            "(vLLM's --model-impl)")
    eviction: Literal["recompute", "copy"] = Field(
        "recompute", description="what preemption does with a sequence's KV blocks: recompute frees them and "
                                 "prefills the tokens again later; copy swaps them to numCpuBlocks of host memory "
                                 "and back (LMDeploy's eviction_type)")
    numCpuBlocks: int = Field(0, ge=0, le=10_000_000,
                              description="KV blocks of host memory that eviction: copy swaps preempted sequences "
                                          "into (count them in resources' memory)")
    ropeScalingFactor: float | None = Field(
        None, ge=1, le=1000, description="dynamic NTK rotary scaling, so sessionLen may exceed the model's "
                                         "max_position_embeddings; unset: the checkpoint's own rope_scaling")
    useLognAttn: bool = Field(False, description="Qwen's log-n attention scaling past the trained length")
    maxLoraRank: int = Field(64, ge=1, le=1024,
                             description="largest rank an adapter of spec.adapters may have (vLLM's max_lora_rank)")
    quantization: Literal["int8", "float", "awq", "gptq", "gguf"] | None = Field(
        None, description="weights: unset serves the checkpoint as stored (float, AWQ / GPTQ as its "
                          "quantization_config says, a GGUF file's 4- / 8-bit blocks); int8: weight-only int8 made "
                          "on load; float: de-quantize on load; awq / gptq / gguf: insist on that format")
    kvCacheDtype: Literal["auto", "int8", "int4"] = Field(
        "auto", description="auto: the KV cache holds the model's dtype; int8: int8 values with a float32 scale per "
                            "token and KV head, about 2x the bf16 cache's blocks (LMDeploy's quant_policy=8); int4: "
                            "4-bit values with a float32 scale and zero per token and KV head, about 3x the bf16 "
                            "cache's blocks at head size 64 (quant_policy=4)")
    compile: bool = Field(False, description="CPU workers: decode steps through torch.compile, about 2.4x faster; "
                                             "the pod compiles for a few minutes at start (count it in "
                                             "startupTimeoutSeconds); a GPU replays CUDA graphs instead")


class AdapterSpec(_Spec):
    """A LoRA adapter served beside the base model; a request names it (gRPC `adapter`, OpenAI `model`)."""

    name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, max_length=63,
                      description="what requests name the adapter by: a DNS label (lowercase letters, digits, '-'), "
                                  "unique, not the LLMDeployment's own name (the base model's)")
    source: str = Field(..., pattern=ADAPTER_SOURCE_PATTERN, max_length=512,
                        description="hf://org/name[@revision] (downloaded like the model, with spec.model's "
                                    "endpoint and tokenSecret), pvc://claim/path, or an absolute path in the image; "
                                    "the directory holds adapter_config.json and adapter_model.safetensors (or .bin)")

    @property
    def kind(self) -> Literal["hf", "pvc", "path"]:
        if self.source.startswith("hf://"):
            return "hf"
        return "pvc" if self.source.startswith("pvc://") else "path"


class GenerationSpec(_Spec):
    """Defaults for requests that do not set these themselves."""

    maxNewTokens: int = Field(256, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0, le=100)
    topP: float = Field(1.0, gt=0, le=1)
    topK: int = Field(0, ge=0)
    repetitionPenalty: float = Field(1.0, gt=0, le=100)


# Spec field -> the runtime's field (EngineConfig for EngineSpec, GenerationConfig for GenerationSpec): the
# one translation of a spec into runtime settings. A field missing here fails `runtime_settings()`.
RUNTIME_NAMES = {
    "dtype": "dtype", "maxBatchSize": "max_batch_size", "maxNumBatchedTokens": "max_num_batched_tokens",
    "kvCacheFraction": "kv_cache_fraction", "blockSize": "block_size", "sessionLen": "session_len",
    "enablePrefixCaching": "enable_prefix_caching", "modelImpl": "model_impl", "eviction": "eviction",
    "numCpuBlocks": "num_cpu_blocks", "ropeScalingFactor": "rope_scaling_factor", "useLognAttn": "use_logn_attn",
    "maxLoraRank": "max_lora_rank", "quantization": "quantization",
    "kvCacheDtype": "kv_cache_dtype", "compile": "compile",
    "maxNewTokens": "max_new_tokens", "temperature": "temperature", "topP": "top_p", "topK": "top_k",
    "repetitionPenalty": "repetition_penalty",
    # LimitsSpec's worker limits (the others are the router's flags: resources.router_deployment)
    "maxPromptsPerRequest": "max_prompts_per_request", "maxLogprobs": "max_logprobs",
}


def _runtime_fields(section: _Spec, only: tuple[str, ...] | None = None) -> dict:
    """A spec section by runtime names, unset optional fields left out (the runtime's defaults apply);
    `only`: these fields of the section (the rest are not the worker's)."""
    return {RUNTIME_NAMES[name]: value for name, value in section.model_dump().items()
            if value is not None and (only is None or name in only)}


# How the router picks a replica for each request (`kubellm router --policy`).
ROUTING_POLICIES = ("round_robin", "least_loaded", "prefix_affinity")


class RouterSpec(_Spec):
    replicas: int = Field(1, ge=1, le=100)
    port: int = Field(50051, ge=1, le=65535)
    policy: Literal["round_robin", "least_loaded", "prefix_affinity"] = Field(
        "round_robin", description="round_robin: in turn (DeepSpeed-MII's 0,1,0,1); least_loaded: the replica with "
                                   "the fewest requests in flight; prefix_affinity: consistent hashing with bounded "
                                   "load over the prompt's leading text, so requests sharing a system prompt reach "
                                   "the replica that has it cached")
    prefixLength: int = Field(256, ge=1, le=1_000_000,
                              description="prefix_affinity: leading characters of the prompt (tokens for token-id "
                                          "prompts) that are hashed")
    loadFactor: float = Field(1.25, ge=1, le=100,
                              description="prefix_affinity: a replica takes a request only while its requests in "
                                          "flight stay within loadFactor × the mean over the healthy replicas")
    tlsSecretName: str | None = Field(
        None, pattern=DNS_LABEL, max_length=253,
        description="a kubernetes.io/tls Secret (keys tls.crt, tls.key) in this namespace: the router's gRPC and "
                    "REST ports serve TLS with it (`kubellm router --tls-cert/--tls-key`); clients then connect "
                    "with TLS (the Python client: tls=True or a CA file). An Ingress in front of the REST port must "
                    "then speak HTTPS to it (docs/network.md)")


class IngressSpec(_Spec):
    className: str | None = Field(None, max_length=253)
    host: str | None = Field(None, max_length=253, pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    tlsSecretName: str | None = Field(None, pattern=DNS_LABEL, max_length=253)
    annotations: dict[str, str] = Field(default_factory=dict)


class RestApiSpec(_Spec):
    enabled: bool = False
    port: int = Field(28080, ge=1, le=65535)
    ingress: IngressSpec | None = None
    apiKeySecret: str | None = Field(
        None, pattern=DNS_LABEL, max_length=253,
        description="a Secret in this namespace whose every key holds an API key (or several, one per line): the "
                    "router's REST port then requires `Authorization: Bearer <key>` (401 without it, as the OpenAI "
                    "API) and its gRPC port `authorization` metadata (UNAUTHENTICATED without it). The router "
                    "re-reads the Secret when it changes, without a restart: a removed key stops working. Health "
                    "and /metrics need no key")


class EndpointPickerRefSpec(_Spec):
    """An endpoint picker (the Gateway API Inference Extension's EPP) the user runs, as a Service."""

    name: str = Field(..., pattern=DNS_LABEL, max_length=253, description="the endpoint picker's Service")
    port: int = Field(9002, ge=1, le=65535, description="its ext-proc gRPC port")
    failureMode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="what the gateway does when the picker does not answer")


class InferencePoolSpec(_Spec):
    """An InferencePool (inference.networking.k8s.io/v1) over the replica leaders' OpenAI HTTP port, so that a
    Gateway with an inference extension sends requests straight to the pods."""

    enabled: bool = False
    endpointPickerRef: EndpointPickerRefSpec | None = None


class DrainSpec(_Spec):
    """How a worker or router pod stops (scale-down, a rolling update, a deleted pod) without losing requests."""

    preStopSeconds: int = Field(5, ge=0, le=3600,
                                description="the pod waits this long (a preStop sleep) before its process gets SIGTERM, "
                                            "so that it leaves the Services' endpoints (and the router's leader list) "
                                            "before it stops taking requests")
    timeoutSeconds: int = Field(30, ge=0, le=86_400,
                                description="after SIGTERM, how long the requests in flight may run to finish "
                                            "(`kubellm worker --drain-timeout`); the pod's "
                                            "terminationGracePeriodSeconds covers preStopSeconds + this + a margin")


class AutoscalingSpec(_Spec):
    """The built-in autoscaler: the operator reads the routers' own counts of requests in flight and held, and
    sets `replicas` through the scale subresource. No Prometheus, HPA or KEDA needed (for those, leave this
    unset: docs/operations.md)."""

    minReplicas: int = Field(1, ge=0, le=1000,
                             description="fewest replica groups; 0 scales to zero when idle: the router stays up and "
                                         "holds requests while the first group starts")
    maxReplicas: int = Field(..., ge=1, le=1000, description="most replica groups")
    targetInFlightPerReplica: float = Field(
        8, gt=0, le=100_000, description="requests in flight per replica group the autoscaler aims at: those the "
                                         "routers have sent to a group (running or queued in its engine) plus those "
                                         "they hold waiting for a group; replicas = ceil(in flight / target)")
    scaleUpDelaySeconds: int = Field(15, ge=0, le=3600,
                                     description="the load must have called for more replicas for this long "
                                                 "(the lowest recommendation over the window wins); from zero, a "
                                                 "waiting request scales up at once")
    scaleDownDelaySeconds: int = Field(300, ge=0, le=86_400,
                                       description="the load must have called for fewer replicas for this long "
                                                   "(the highest recommendation over the window wins)")
    scaleFromZeroTimeoutSeconds: int = Field(
        600, ge=1, le=86_400, description="how long the router holds a request while no group is ready (the first "
                                          "group's start and model load); past it, UNAVAILABLE / 503 with Retry-After")


class NetworkPolicySpec(_Spec):
    """NetworkPolicies (networking.k8s.io/v1) that admit only the traffic the deployment needs: each replica
    group's pods from that group (torch.distributed and its control port, gRPC), the workers' gRPC and HTTP
    ports from this deployment's routers, /metrics from `metricsFrom` and the operator, the router's public
    ports from anywhere. Enforced only where the cluster's network plugin implements NetworkPolicy
    (docs/network.md)."""

    enabled: bool = Field(True, description="create the policies; false deletes the operator's")
    metricsFrom: dict[str, LabelValue] = Field(
        default={}, max_length=64,
        description="namespace labels (a namespaceSelector's matchLabels) of the namespaces whose pods may read the "
                    "workers' and routers' /metrics (port 9090), e.g. {kubernetes.io/metadata.name: monitoring}; "
                    "{} (the default): every namespace. The operator's own pods may always")
    gatewayFrom: dict[str, LabelValue] | None = Field(
        None, max_length=64,
        description="with inferencePool.enabled: namespace labels of the namespaces whose pods (a Gateway, its "
                    "endpoint picker) may reach the leaders' OpenAI HTTP port (8000); unset: every namespace")


# The limits that are the worker's (EngineConfig, through RUNTIME_NAMES); LimitsSpec's others are the router's.
WORKER_LIMITS = ("maxPromptsPerRequest", "maxLogprobs")


class RateLimitSpec(_Spec):
    """A token bucket per API key (per client address without keys), at the router: past it, 429 with
    Retry-After on REST and RESOURCE_EXHAUSTED on gRPC."""

    requestsPerSecond: float = Field(..., gt=0, le=1_000_000, description="the bucket's refill rate")
    burst: int | None = Field(None, ge=1, le=1_000_000,
                              description="the bucket's size: requests allowed at once after an idle spell; "
                                          "default: requestsPerSecond rounded up (one second's worth)")

    @property
    def burst_or_default(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.requestsPerSecond))


class LimitsSpec(_Spec):
    """What one request may cost (docs/grpc.md, Request limits): past a limit the request is refused, naming it."""

    maxRequestBytes: int = Field(1_048_576, ge=1024, le=1_073_741_824,
                                 description="largest request body (REST) or message (gRPC) the router reads; "
                                             "larger: 413 / RESOURCE_EXHAUSTED")
    maxConcurrentStreamsPerConnection: int = Field(100, ge=1, le=100_000,
                                                   description="HTTP/2 streams one client connection may have open "
                                                               "at the router")
    rateLimit: RateLimitSpec | None = Field(None, description="unset: no rate limit")
    maxPromptsPerRequest: int = Field(256, ge=1, le=1_000_000,
                                      description="most prompts in one request (the worker's max_prompts_per_request)")
    maxLogprobs: int = Field(20, ge=0, le=1_000_000,
                             description="most top alternatives a request's logprobs may ask for (vLLM's "
                                         "max_logprobs)")


class ResourcesSpec(_Spec):
    requests: dict[str, int | str] = Field(default_factory=dict)
    limits: dict[str, int | str] = Field(default_factory=dict)


class LLMDeploymentSpec(_Spec):
    """An LLM served by tensor/pipeline-parallel replica groups behind a gRPC router."""

    model: ModelSpec
    tensorParallel: int = Field(1, ge=1, le=64, description="ranks that split each layer")
    pipelineParallel: int = Field(1, ge=1, le=64, description="stages the layers are split into")
    # No schema default: a defaulted replicas could not be told from a hand-set one (CEL_RULES). Unset, it is
    # autoscaling.minReplicas with autoscaling, else 1 (`_resolve_replicas`).
    replicas: int | None = Field(None, ge=0, le=1000,
                                 description="independent model copies (parallel groups); default 1. With autoscaling "
                                             "the autoscaler sets it (through the scale subresource): leave it unset")
    gpusPerPod: int | None = Field(None, ge=1, le=64,
                                   description="GPUs (ranks) per pod; default: the whole group in one pod")
    device: Literal["gpu", "cpu"] = Field("gpu", description="gpu: each rank gets one nvidia.com/gpu; cpu: no GPU "
                                                            "is requested and ranks run on CPU (clusters without GPUs, "
                                                            "with the -cpu runtime image)")
    image: str | None = Field(None, min_length=1, max_length=512,
                              description="the workers' image; default: the operator's runtime image (Helm value "
                                          "runtimeImage). Routers run the operator's router image (Helm value "
                                          "routerImage)")
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="extra container resources (cpu, memory); GPUs are added by the operator")
    engine: EngineSpec = Field(default_factory=EngineSpec)
    adapters: list[AdapterSpec] = Field(
        default_factory=list, max_length=MAX_ADAPTERS,
        description="LoRA adapters every worker serves beside the model (several in one batch); a request that "
                    "names none gets the base model")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    restApi: RestApiSpec = Field(default_factory=RestApiSpec)
    autoscaling: AutoscalingSpec | None = None
    inferencePool: InferencePoolSpec = Field(default_factory=InferencePoolSpec)
    drain: DrainSpec = Field(default_factory=DrainSpec)
    networkPolicy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    startupTimeoutSeconds: int = Field(1800, ge=30, le=86_400, description="longest a model load may take")
    maxGroupRestarts: int | None = Field(None, ge=0, le=10_000,
                                         description="how many times the operator may restart a replica group "
                                                     "after a failure within groupRestartWindowSeconds; past it the "
                                                     "group is left Failed (condition GroupFailed quotes the failed "
                                                     "rank's log). Unset: no limit")
    groupRestartWindowSeconds: int = Field(3600, ge=60, le=2_592_000,
                                           description="the window maxGroupRestarts counts restarts in")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priorityClassName: str | None = Field(None, max_length=253)

    @model_validator(mode="after")
    def _cross_field(self):
        for rule in CEL_RULES:
            if rule.python is not None and not rule.python(self):
                raise ValueError(f"{rule.field}: {rule.message}")
        return self._resolve_replicas()

    def _resolve_replicas(self):
        """`replicas` as the operator runs it: unset, the autoscaler's floor (or 1); with autoscaling, within
        minReplicas..maxReplicas (a hand or HPA write outside them, or a narrowed range, is brought back)."""
        scaling = self.autoscaling
        if scaling is None:
            self.replicas = 1 if self.replicas is None else self.replicas
        else:
            wanted = scaling.minReplicas if self.replicas is None else self.replicas
            self.replicas = min(max(wanted, scaling.minReplicas), scaling.maxReplicas)
        return self

    def runtime_settings(self) -> RuntimeSettings:
        """What every worker of this deployment runs with: engine options and generation defaults."""
        engine = {**_runtime_fields(self.engine), **_runtime_fields(self.limits, WORKER_LIMITS),
                  "tensor_parallel": self.tensorParallel,
                  "pipeline_parallel": self.pipelineParallel, "device": "cpu" if self.device == "cpu" else "auto"}
        return RuntimeSettings(engine=engine, generation=_runtime_fields(self.generation))

    @property
    def world_size(self) -> int:
        return self.tensorParallel * self.pipelineParallel

    @property
    def gpus_per_pod(self) -> int:
        return self.gpusPerPod or self.world_size

    @property
    def pods_per_group(self) -> int:
        return self.world_size // self.gpus_per_pod


class CelRule:
    """One cross-field rule, in CEL for the API server and in Python for the operator."""

    def __init__(self, cel: str, message: str, field: str, python, *, transition: bool = False):
        # transition: the rule reads oldSelf (optionalOldSelf, so it runs on create too); the operator sees only
        # the stored object, so there is no Python twin (python=None).
        self.cel, self.message, self.field, self.python, self.transition = cel, message, field, python, transition


CEL_RULES = [
    CelRule("!has(self.gpusPerPod) || (self.tensorParallel * self.pipelineParallel) % self.gpusPerPod == 0",
            "gpusPerPod must divide tensorParallel × pipelineParallel", "spec.gpusPerPod",
            lambda s: s.gpusPerPod is None or s.world_size % s.gpusPerPod == 0),
    CelRule("!has(self.restApi) || !has(self.restApi.ingress) || self.restApi.enabled",
            "an Ingress needs the REST API: set restApi.enabled: true", "spec.restApi.ingress",
            lambda s: s.restApi.ingress is None or s.restApi.enabled),
    CelRule("!has(self.restApi) || !self.restApi.enabled || !has(self.router) || self.router.port != self.restApi.port",
            "restApi.port must differ from router.port", "spec.restApi.port",
            lambda s: not s.restApi.enabled or s.router.port != s.restApi.port),
    CelRule("!has(self.model.tokenSecret) || self.model.source.startsWith('hf://') || "
            "(has(self.adapters) && self.adapters.exists(a, a.source.startsWith('hf://')))",
            "model.tokenSecret only applies to hf:// sources (the model's or an adapter's)", "spec.model.tokenSecret",
            lambda s: s.model.tokenSecret is None or s.model.kind == "hf" or any(a.kind == "hf" for a in s.adapters)),
    # The autoscaler writes replicas through /scale, so replicas beside autoscaling is refused only where it is
    # hand-set: on create, or in the same write that turns autoscaling on.
    CelRule("!has(self.autoscaling) || !has(self.replicas) || (oldSelf.hasValue() && has(oldSelf.value().autoscaling))",
            "replicas and autoscaling are exclusive: remove spec.replicas (the autoscaler sets it within "
            "autoscaling.minReplicas..maxReplicas), or remove spec.autoscaling to set replicas by hand",
            "spec.replicas", None, transition=True),
    CelRule("!has(self.autoscaling) || !has(self.autoscaling.minReplicas) || "
            "self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas", "spec.autoscaling.minReplicas",
            lambda s: s.autoscaling is None or s.autoscaling.minReplicas <= s.autoscaling.maxReplicas),
    CelRule("!has(self.model.cachePVC) || self.model.source.startsWith('hf://')",
            "model.cachePVC only applies to hf:// sources", "spec.model.cachePVC",
            lambda s: s.model.cachePVC is None or s.model.kind == "hf"),
    CelRule("!has(self.networkPolicy) || !has(self.networkPolicy.gatewayFrom) || "
            "(has(self.inferencePool) && self.inferencePool.enabled)",
            "networkPolicy.gatewayFrom admits a Gateway to the leaders' HTTP port, which only an InferencePool "
            "publishes: set inferencePool.enabled: true, or remove gatewayFrom", "spec.networkPolicy.gatewayFrom",
            lambda s: s.networkPolicy.gatewayFrom is None or s.inferencePool.enabled),
    CelRule("!has(self.engine) || !has(self.engine.eviction) || self.engine.eviction != 'copy' || "
            "(has(self.engine.numCpuBlocks) && self.engine.numCpuBlocks > 0)",
            "engine.eviction copy swaps preempted sequences to host memory, but engine.numCpuBlocks is 0: set "
            "engine.numCpuBlocks (host KV blocks) or use eviction: recompute", "spec.engine.numCpuBlocks",
            lambda s: s.engine.eviction != "copy" or s.engine.numCpuBlocks > 0),
    CelRule("!has(self.engine) || !has(self.engine.compile) || !self.engine.compile || "
            "(has(self.device) && self.device == 'cpu')",
            "engine.compile compiles CPU decode steps; on GPUs they replay CUDA graphs already: remove engine.compile "
            "or set device: cpu", "spec.engine.compile",
            lambda s: not s.engine.compile or s.device == "cpu"),
    CelRule("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "every adapter needs its own name (a request picks one by it); rename the duplicate",
            "spec.adapters", lambda s: len({a.name for a in s.adapters}) == len(s.adapters)),
    *(CelRule(f"!has(self.networkPolicy) || !has(self.networkPolicy.{name}) || "
              f"self.networkPolicy.{name}.all(k, size(k) <= 317 && k.matches('{LABEL_KEY}'))",
              f"networkPolicy.{name}: every key must be a label key ([prefix/]name, e.g. "
              "kubernetes.io/metadata.name)", f"spec.networkPolicy.{name}",
              lambda s, name=name: all(len(k) <= 317 and re.fullmatch(LABEL_KEY, k)
                                       for k in getattr(s.networkPolicy, name) or {}))
      for name in ("metricsFrom", "gatewayFrom")),
]


# Rules over the whole object (the CRD's root, where CEL may read metadata.name): the base model is served under
# the LLMDeployment's name (the workers' --served-model-name), so an adapter of that name could not be asked for.
OBJECT_RULES = [
    CelRule("!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != self.metadata.name)",
            "an adapter may not be named like the LLMDeployment, which is the base model's name in "
            "requests (OpenAI model, /v1/models); rename the adapter", "spec.adapters",
            lambda name, s: all(a.name != name for a in s.adapters)),
]


def object_problem(name: str, spec: LLMDeploymentSpec) -> str | None:
    """The first of OBJECT_RULES that the object named `name` breaks, as 'field: message', else None."""
    for rule in OBJECT_RULES:
        if not rule.python(name, spec):
            return f"{rule.field}: {rule.message}"
    return None


class Condition(_Spec):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: str
    observedGeneration: int | None = None


class GroupStatus(_Spec):
    """When one replica group's current pods got where they are, and how long its model took to load."""

    index: int = Field(..., ge=0)
    scheduledAt: str = Field("", description="the last of its pods was scheduled (PodScheduled)")
    loadStartedAt: str = Field("", description="the last of its worker containers started: the model load began")
    readyAt: str = Field("", description="the last of its pods became Ready: the group serves")
    loadSeconds: float | None = Field(None, description="readyAt - loadStartedAt")


class LLMDeploymentStatus(_Spec):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed", "ScaledToZero"] = "Pending"
    replicas: int = 0
    readyReplicas: int = 0
    ready: str = Field("", description="readyReplicas/replicas, as `kubectl get` shows it (e.g. 2/2)")
    updatedReplicas: int = 0
    selector: str = ""
    endpoint: str = ""
    restEndpoint: str = ""
    observedGeneration: int = 0
    groups: list[GroupStatus] = Field(default_factory=list, max_length=1000,
                                      description="per replica group: time to ready (RFC 3339 times of its pods)")
    lastLoadSeconds: float | None = Field(None, description="the model load of the group that became ready last "
                                                            "(`kubectl get llmd -o wide`)")
    conditions: list[Condition] = Field(default_factory=list)

"""LMDeploy's engine configs, `TurbomindEngineConfig` and `PytorchEngineConfig`, mapped onto kubellm's EngineConfig.

    from kubellm import pipeline, PytorchEngineConfig
    pipe = pipeline("internlm/internlm2_5-7b-chat", backend_config=PytorchEngineConfig(tp=2, session_len=8192))

Every field LMDeploy documents is accepted by name. Only the fields a caller set are mapped (the others keep
kubellm's defaults; LMDeploy's own defaults differ, e.g. block_size 64). Each field is either mapped onto
what it means here, or accepted with a warning saying why it has no meaning here, or refused with an
error naming it and why: `FIELDS` says which, and docs/seeds.md holds the same table. Nothing is dropped
without a word.

No torch here: the mapping is a pure decision on the set fields (`backend_options`), table-tested.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubellm.runtime.config import ConfigError, EngineConfig, _explain
from kubellm.runtime.errors import SeedOptionWarning



class NotYetSupported(ConfigError, NotImplementedError):
    """An option that kubellm will implement but does not yet; the message names the follow-up."""


class _LMDeployConfig(BaseModel):
    # protected_namespaces=(): LMDeploy's own field names start with model_ (model_name, model_format)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def __init__(self, **options):
        try:
            super().__init__(**options)
        except ValidationError as err:   # one error naming the field, as EngineConfig's
            raise _explain(err, type(self).__name__) from None

    @property
    def set_fields(self) -> dict:
        """The fields the caller set, by value (constructor or assignment)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class TurbomindEngineConfig(_LMDeployConfig):
    """LMDeploy's TurboMind engine config. The fields a caller sets are mapped onto EngineConfig (docs/seeds.md)."""

    model_name: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    model_format: str | None = None
    tp: int = Field(1, ge=1)
    session_len: int | None = Field(None, ge=2)
    max_batch_size: int | None = Field(None, ge=1)
    cache_max_entry_count: float = Field(0.8, gt=0, le=1)
    cache_chunk_size: int = -1
    cache_block_seq_len: int = Field(64, ge=1)
    enable_prefix_caching: bool = False
    quant_policy: Literal[0, 4, 8] = 0
    rope_scaling_factor: float = Field(0.0, ge=0)
    use_logn_attn: bool = False
    download_dir: str | None = None
    revision: str | None = None
    max_prefill_token_num: int = Field(8192, ge=0)
    num_tokens_per_iter: int = Field(0, ge=0)
    max_prefill_iters: int = Field(1, ge=1)
    communicator: str = "nccl"


class PytorchEngineConfig(_LMDeployConfig):
    """LMDeploy's PyTorch engine config. The fields a caller sets are mapped onto EngineConfig (docs/seeds.md)."""

    model_name: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    tp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    dp_rank: int = Field(0, ge=0)
    session_len: int | None = Field(None, ge=2)
    max_batch_size: int | None = Field(None, ge=1)
    cache_max_entry_count: float = Field(0.8, gt=0, le=1)
    eviction_type: Literal["recompute", "copy"] = "recompute"
    prefill_interval: int = Field(16, ge=1)
    block_size: int = Field(64, ge=1)
    num_cpu_blocks: int = Field(0, ge=0)
    num_gpu_blocks: int = Field(0, ge=0)
    adapters: dict[str, str] | None = None
    max_prefill_token_num: int = Field(4096, ge=0)
    thread_safe: bool = False
    enable_prefix_caching: bool = False
    device_type: str = "cuda"
    eager_mode: bool = False
    custom_module_map: dict[str, str] | None = None
    download_dir: str | None = None
    revision: str | None = None
    quant_policy: Literal[0, 4, 8] = 0
    distributed_executor_backend: str | None = None


# Each LMDeploy field's fate here: "mapped" (onto the EngineConfig field or pipeline option named), "accepted"
# (no meaning here: a warning says why), or "refused" (values other than the neutral one raise, saying why).
# docs/seeds.md holds the same table; tests/runtime/test_seed_apis.py checks both name every field.
FIELDS = {
    "model_name": "mapped: pipeline(model_name=)",
    "dtype": "mapped: dtype",
    "model_format": "mapped: 'awq' / 'gptq' -> quantization (the checkpoint's quantization_config must agree); "
                    "None / 'hf' as stored; others refused",
    "tp": "mapped: tensor_parallel",
    "dp": "refused: dp > 1 (run replicas: serve(replica_num=) or spec.replicas)",
    "ep": "refused: ep > 1 (no expert parallelism)",
    "dp_rank": "refused: dp_rank > 0",
    "session_len": "mapped: session_len",
    "max_batch_size": "mapped: max_batch_size",
    "cache_max_entry_count": "mapped: kv_cache_fraction",
    "cache_chunk_size": "accepted: the KV cache is allocated whole at start",
    "cache_block_seq_len": "mapped: block_size",
    "block_size": "mapped: block_size",
    "enable_prefix_caching": "mapped: enable_prefix_caching",
    "quant_policy": "mapped: 8 -> kv_cache_dtype='int8' (int8 KV cache, a scale per token and head); "
                    "4 -> kv_cache_dtype='int4' (int4 KV cache, a scale and zero per token and head)",
    "rope_scaling_factor": "mapped: rope_scaling_factor (0: off)",
    "use_logn_attn": "mapped: use_logn_attn",
    "download_dir": "mapped: where a Hub model id is downloaded",
    "revision": "mapped: the Hub revision downloaded",
    "max_prefill_token_num": "mapped: max_num_batched_tokens",
    "num_tokens_per_iter": "mapped: max_num_batched_tokens (when > 0, before max_prefill_token_num)",
    "max_prefill_iters": "accepted: a prompt is cut into as many chunks as the token budget needs",
    "communicator": "accepted: torch.distributed (NCCL on GPU, gloo on CPU)",
    "eviction_type": "mapped: eviction ('copy' swaps to num_cpu_blocks of host memory)",
    "prefill_interval": "accepted: prefill chunks join every step",
    "num_cpu_blocks": "mapped: num_cpu_blocks with eviction_type='copy' (with 'recompute': accepted, unused)",
    "num_gpu_blocks": "mapped: num_kv_blocks (0: sized from memory)",
    "adapters": "mapped: EngineConfig.adapters (name -> directory or hf://); a call picks one with adapter_name",
    "thread_safe": "mapped: calls from several threads are serialized (always)",
    "device_type": "mapped: device ('cuda'; 'cpu' too); other devices refused",
    "eager_mode": "mapped: enforce_eager",
    "custom_module_map": "refused: kubellm's model files or transformers' (model_impl)",
    "distributed_executor_backend": "mapped: None / 'mp' (ranks as processes), 'uni' with tp=1; 'ray' refused",
}


@dataclass
class BackendOptions:
    """What a backend config asks of pipeline(): EngineConfig fields, and the options that are not the engine's."""

    engine: dict = field(default_factory=dict)
    model_name: str | None = None
    download_dir: str | None = None
    revision: str | None = None
    notes: list[str] = field(default_factory=list)   # options accepted without effect: one warning each


def backend_options(config: TurbomindEngineConfig | PytorchEngineConfig) -> BackendOptions:
    """The set fields of an LMDeploy config -> EngineConfig options (and the rest); a refusal raises
    ConfigError (NotYetSupported for what a follow-up adds), naming `<Class>.<field>` and why."""
    if not isinstance(config, (TurbomindEngineConfig, PytorchEngineConfig)):
        raise ConfigError(f"backend_config: expected TurbomindEngineConfig or PytorchEngineConfig (from kubellm), "
                          f"got {type(config).__name__}; or pass an EngineConfig as engine_config")
    what = type(config).__name__
    set_ = config.set_fields
    out = BackendOptions()

    def refuse(name: str, why: str, cls=ConfigError):
        raise cls(f"{what}.{name}: {why} (got {set_[name]!r})")

    def note(name: str, why: str):
        out.notes.append(f"{what}.{name}={set_[name]!r} has no effect in kubellm: {why}")

    renames = {"tp": "tensor_parallel", "session_len": "session_len", "max_batch_size": "max_batch_size",
               "cache_max_entry_count": "kv_cache_fraction", "cache_block_seq_len": "block_size",
               "block_size": "block_size", "enable_prefix_caching": "enable_prefix_caching",
               "use_logn_attn": "use_logn_attn", "eager_mode": "enforce_eager", "dtype": "dtype"}
    for name, value in set_.items():
        if name in renames:
            if value is not None:   # None: LMDeploy's "decide for me", kubellm's default
                out.engine[renames[name]] = value
        elif name == "model_name":
            out.model_name = value
        elif name in ("download_dir", "revision"):
            setattr(out, name, value)
        elif name == "rope_scaling_factor":
            if value:   # LMDeploy's 0.0 means off
                out.engine["rope_scaling_factor"] = value
        elif name == "max_prefill_token_num":
            if value and not set_.get("num_tokens_per_iter"):
                out.engine["max_num_batched_tokens"] = value
        elif name == "num_tokens_per_iter":
            if value:
                out.engine["max_num_batched_tokens"] = value
        elif name == "num_gpu_blocks":
            if value:
                out.engine["num_kv_blocks"] = value
        elif name == "model_format":
            if value in ("awq", "gptq"):   # 4-bit checkpoints, read as their quantization_config says
                out.engine["quantization"] = value
            elif value not in (None, "hf"):
                refuse(name, f"{value!r}: kubellm reads Hugging Face checkpoints (safetensors, .bin or GGUF), "
                             "AWQ and GPTQ among them: use model_format=None, 'hf', 'awq' or 'gptq'")
        elif name == "quant_policy":
            if value:   # (the field's Literal[0, 4, 8] admits nothing else)
                out.engine["kv_cache_dtype"] = {8: "int8", 4: "int4"}[value]
        elif name == "dp":
            if value != 1:
                refuse(name, "one pipeline is one engine; for data parallelism run replicas: "
                             "kubellm.serve(..., replica_num=N) or an LLMDeployment's spec.replicas")
        elif name == "dp_rank":
            if value:
                refuse(name, "data-parallel ranks are replicas here (serve(replica_num=)); use dp_rank=0")
        elif name == "ep":
            if value != 1:
                refuse(name, "expert parallelism is not implemented; tensor parallelism (tp) splits MoE "
                             "experts' weights: use ep=1")
        elif name == "eviction_type":
            _eviction(value, set_.get("num_cpu_blocks", 0), out, refuse)
        elif name == "num_cpu_blocks":
            if value and set_.get("eviction_type", "recompute") != "copy":
                note(name, "host blocks only ever hold sequences swapped out with eviction_type='copy'; the "
                           "engine preempts by recompute")
        elif name == "adapters":
            if value:
                out.engine["adapters"] = dict(value)
        elif name == "thread_safe":
            pass   # the Pipeline always holds a lock around each call: True is what it does anyway
        elif name == "device_type":
            if value not in ("cuda", "cpu"):
                refuse(name, "kubellm runs on CUDA GPUs or the CPU: use device_type='cuda' (or 'cpu')")
            out.engine["device"] = value
        elif name == "custom_module_map":
            if value:
                refuse(name, "model code is kubellm's own model file or transformers' modeling code "
                             "(EngineConfig.model_impl); custom modules are not loaded")
        elif name == "distributed_executor_backend":
            if value == "ray":
                refuse(name, "ranks run as processes started by the engine (or by torchrun, or as Kubernetes "
                             "pods), never Ray: use None or 'mp'")
            if value == "uni" and set_.get("tp", 1) > 1:
                refuse(name, "'uni' runs one process, which cannot hold tp > 1 ranks: use 'mp' or None")
            if value not in (None, "mp", "uni", "ray"):
                refuse(name, "expected None, 'mp' or 'uni'")
        elif name == "cache_chunk_size":
            if value != -1:
                note(name, "the KV cache is allocated whole when the engine starts (kv_cache_fraction / "
                           "num_kv_blocks), never in chunks")
        elif name == "max_prefill_iters":
            if value != 1:
                note(name, "a long prompt is cut into as many prefill chunks as the step's token budget "
                           "(max_num_batched_tokens) needs, each mixed with the running decodes")
        elif name == "prefill_interval":
            note(name, "prefill chunks join every step beside the decodes (chunked prefill), so there is no "
                       "interval to wait between prefills")
        elif name == "communicator":
            if value not in ("nccl", "native", "cuda-ipc"):
                refuse(name, "expected 'nccl' (or LMDeploy's 'native' / 'cuda-ipc')")
            if value != "nccl":
                note(name, "ranks communicate through torch.distributed: NCCL on GPUs, gloo on the CPU")
        else:   # a field added to the classes above without a decision here: a bug, never a silent drop
            raise AssertionError(f"{what}.{name}: no mapping decided")
    return out


def _eviction(value: str, num_cpu_blocks: int, out: BackendOptions, refuse) -> None:
    """eviction_type -> EngineConfig.eviction: 'recompute' frees a preempted sequence's KV blocks and prefills it
    again later; 'copy' swaps them into num_cpu_blocks of host memory and back, which needs the block count
    (LMDeploy's 0, "size it from memory", is not supported here)."""
    out.engine["eviction"] = value
    if value == "copy":
        if not num_cpu_blocks:
            refuse("eviction_type", "'copy' swaps preempted sequences into host KV blocks, and num_cpu_blocks is 0 "
                                    "(LMDeploy sizes them from memory; kubellm needs the count): set num_cpu_blocks")
        out.engine["num_cpu_blocks"] = num_cpu_blocks


def warn_notes(notes: list[str], stacklevel: int = 3) -> None:
    for text in notes:
        warnings.warn(text, SeedOptionWarning, stacklevel=stacklevel)


# -- invocation arguments --------------------------------------------------------------------------------
# LMDeploy's pipeline calls still take these keywords from its first versions, with a deprecation warning.
DEPRECATED_CALL_ARGS = {"request_output_len": "max_new_tokens"}


def call_options(options: dict) -> dict:
    """A pipeline call's keyword options with LMDeploy's deprecated names replaced (each with a warning)."""
    options = dict(options)
    for old, new in DEPRECATED_CALL_ARGS.items():
        if old in options:
            if new in options:
                raise ConfigError(f"{old}: deprecated name of {new}, and both were given; pass only {new}")
            warnings.warn(f"{old} is deprecated (as in LMDeploy); use {new}, or GenerationConfig({new}=...)",
                          DeprecationWarning, stacklevel=3)
            options[new] = options.pop(old)
    return options


# -- the model: a Hub id, as LMDeploy's model_path ---------------------------------------------------------
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([\w./-]+))?$")


def hub_id(model) -> tuple[str, str | None] | None:
    """(repo, revision) where `model` is a Hub model id ("org/name", "hf://org/name[@rev]") and not a path
    that exists here; None otherwise (a local directory, a known model name, anything else)."""
    text = str(model)
    if Path(text).exists():
        return None
    match = _HUB_ID.match(text)
    return (match.group(1), match.group(2)) if match else None


def hub_dest(repo: str, revision: str | None, download_dir: str | os.PathLike | None) -> Path:
    """Where a Hub model is kept: `download_dir` (LMDeploy's), else `<kubellm cache>/hub`; one directory per
    repo and revision, so that two revisions never mix."""
    from kubellm.runtime.hub.cache import cache_dir

    root = Path(download_dir).expanduser() if download_dir is not None else cache_dir() / "hub"
    return root / (repo.replace("/", "--") + (f"@{revision.replace('/', '--')}" if revision else ""))


def model_source(model, download_dir: str | None = None, revision: str | None = None, *,
                 downloader: bool = True, wait_s: float = 1800.0):
    """`model` as the engine loads it. A Hub id is downloaded (once: a complete directory is reused) into
    `download_dir` at `revision`; a local directory or a known name is returned as is, where `revision` is
    refused (there is nothing to pick a version of) and `download_dir` noted (nothing is downloaded).
    `downloader=False` (the other ranks of a torchrun group on this host) waits for the download instead."""
    from kubellm.runtime.hub.cache import is_complete

    found = hub_id(model)
    if found is None:
        if revision is not None:
            raise ConfigError(f"revision: {str(model)!r} is not a Hugging Face Hub model id (org/name), so there "
                              f"is no revision {revision!r} to pick; drop revision, or pass the Hub id")
        if download_dir is not None:
            warn_notes([f"download_dir={download_dir!r} has no effect in kubellm: {str(model)!r} is not a Hub "
                        "model id, so nothing is downloaded"])
        return model
    repo, pinned = found
    if pinned and revision and pinned != revision:
        raise ConfigError(f"revision: {revision!r}, but the model id pins @{pinned}; give one of them")
    revision = revision or pinned
    dest = hub_dest(repo, revision, download_dir)
    if is_complete(dest):
        return dest
    if not downloader:
        deadline = time.monotonic() + wait_s
        while not is_complete(dest):   # the downloading rank fails loudly; this one then times out
            if time.monotonic() > deadline:
                raise TimeoutError(f"model: waited {wait_s:g} s for local rank 0 to download {repo} into {dest}")
            time.sleep(0.5)
        return dest
    from kubellm.runtime.hub.download import download_hf

    return download_hf(f"hf://{repo}" + (f"@{revision}" if revision else ""), dest)

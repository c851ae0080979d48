"""Engine and generation settings: validated once, at the edge, with errors a person can act on.

`GenerationConfig` follows LMDeploy's names; DeepSpeed-MII's (`max_length`, `do_sample`,
`stop`) are accepted as aliases so code written for either keeps working.
"""

from __future__ import annotations

import json

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A setting is invalid. The message names the field and how to fix it."""


def _explain(err: ValidationError, what: str) -> ConfigError:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a rule across fields: its message starts with the field to change
            lines.append(f"{what}.{msg}")
            continue
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown option; check the spelling"
        lines.append(f"{what}.{field}: {msg} (got {e.get('input')!r})")
    return ConfigError("; ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value):
        # Before the bounds: `nan >= 0` is False and `inf` passes `ge=0`, so neither says what is wrong.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number; NaN and infinity are refused")
        return value

    @classmethod
    def build(cls, **options):
        """Construct from keyword options, turning validation errors into one `ConfigError`."""
        try:
            return cls(**options)
        except ValidationError as err:
            raise _explain(err, cls.__name__) from None

    def updated(self, **options):
        """A copy with `options` applied and validated."""
        return type(self).build(**{**self.model_dump(), **options})


class EngineConfig(_Strict):
    """How the engine uses the device. `cache_max_entry_count` is LMDeploy's name for `kv_cache_fraction`."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_batch_size: int = Field(64, ge=1, description="most sequences running in one step")
    max_num_batched_tokens: int = Field(
        512, ge=16, description="token budget of one step (prefill chunks + decodes)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    kv_cache_fraction: float = Field(
        0.8, gt=0, le=1, description="share of free GPU memory (or of cpu_memory_gb on CPU) for the KV cache")
    cpu_memory_gb: float = Field(2.0, gt=0, description="memory budget on CPU that kv_cache_fraction applies to")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="exact number of KV blocks (overrides kv_cache_fraction; for tests and tuning)")
    num_cpu_blocks: int = Field(
        0, ge=0, description="KV blocks of host memory (pinned on a GPU) that eviction='copy' swaps preempted "
        "sequences into; unused with eviction='recompute' (LMDeploy's num_cpu_blocks)")
    eviction: Literal["recompute", "copy"] = Field(
        "recompute", description="what preemption does with a sequence's KV blocks: recompute frees them and "
        "prefills its tokens again later; copy swaps them to num_cpu_blocks of host memory and back (vLLM's swap), "
        "falling back to recompute while the host blocks are full (LMDeploy's eviction_type)")
    session_len: int | None = Field(
        None, ge=2, description="most tokens of prompt + generation per request; default: the model's max_position_embeddings")
    rope_scaling_factor: float | None = Field(
        None, ge=1.0, description="dynamic NTK rotary scaling (LMDeploy's option; transformers' rope_scaling "
        "{'rope_type': 'dynamic', 'factor': f}) so session_len may exceed max_position_embeddings; None: the "
        "checkpoint's own rope_scaling")
    use_logn_attn: bool = Field(
        False, description="Qwen's log-n attention scaling: past the trained length (config seq_length, else "
        "max_position_embeddings) queries are scaled by log(position) / log(trained length)")
    kv_cache_dtype: Literal["auto", "int8", "int4"] = Field(
        "auto", description="auto: the KV cache holds the model's dtype; int8: one int8 per value plus a float32 "
        "scale per token and KV head (LMDeploy's quant_policy=8), about 2x (bf16) or 4x (fp32) the blocks; "
        "int4: 4 bits per value plus a float32 scale and zero per token and KV head (quant_policy=4), about "
        "3x (bf16) or 6x (fp32) the blocks at head size 64")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of identical prompt prefixes")
    tensor_parallel: int = Field(1, ge=1, description="ranks that split every layer's weights")
    pipeline_parallel: int = Field(1, ge=1, description="stages that split the layers; world size = tp x pp")
    pipeline_split: Literal["equal_size", "threshold"] = Field(
        "equal_size", description="equal_size: the same number of layers per stage; threshold: fill each "
        "stage up to pipeline_stage_bytes of parameters")
    pipeline_stage_bytes: int | None = Field(
        None, ge=1, description="parameter bytes a stage may hold (per tensor rank) with pipeline_split=threshold")
    pipeline_micro_batches: int | None = Field(
        None, ge=1, description="micro-batches a step is cut into so all stages work at once; default: pipeline_parallel")
    max_queue_size: int = Field(4096, ge=1, description="most waiting requests before new ones are refused")
    seed: int = Field(0, description="seed for requests that do not set random_seed")
    load_format: Literal["safetensors", "random"] = Field(
        "safetensors", description="random: seeded random weights of config.json's shapes, nothing read "
        "(benchmarks of models that are not downloaded)")
    model_impl: Literal["auto", "kubellm", "transformers"] = Field(
        "auto", description="auto: kubellm's own model file where the architecture has one, else transformers' "
        "modeling code on kubellm's paged KV cache; kubellm / transformers: only that one (vLLM's --model-impl)")
    quantization: Literal["int8", "float", "awq", "gptq", "gguf"] | None = Field(
        None, description="weights: None serves the checkpoint as stored (float, or the AWQ / GPTQ its config.json's "
        "quantization_config names, or a GGUF file's 4- / 8-bit blocks); int8: weight-only int8 (one scale per "
        "output channel) made on load from any checkpoint; float: de-quantize a quantized checkpoint into dtype on "
        "load; awq / gptq / gguf: insist the checkpoint is that format (docs/quantization.md)")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served beside the base model: name -> directory with "
        "adapter_config.json and adapter_model.safetensors (or .bin); a request picks one by name")
    max_lora_rank: int = Field(
        64, ge=1, description="largest LoRA rank an adapter may have (vLLM's max_lora_rank)")
    enforce_eager: bool = Field(
        False, description="run decode steps eagerly instead of replaying CUDA graphs captured per batch-size "
        "bucket (GPU only; on CPU see compile)")
    compile: bool = Field(
        False, description="CPU: run decode steps through torch.compile (inductor, frozen weights, max-autotune "
        "GEMMs), about 2.4x faster than eager on SmolLM2; the first start compiles for one to three minutes, later ones "
        "read inductor's cache; the compiled step keeps its own packed copy of float weights (docs/cpu-compile.md)")
    # What one request may ask for (docs/grpc.md, "Request limits"): past these it is refused with the limit named.
    max_prompts_per_request: int = Field(
        256, ge=1, description="most prompts in one request (a batch); each is its own sequence in the engine")
    max_logprobs: int = Field(
        20, ge=0, description="most top alternatives a request's logprobs may ask for (vLLM's max_logprobs)")
    max_stop_words: int = Field(
        256, ge=0, description="most stop words in one request; each is searched for after every token")
    max_bad_words: int = Field(
        64, ge=0, description="most bad words in one request; each is searched for in the whole vocabulary")
    max_word_chars: int = Field(
        256, ge=1, description="most characters in one stop word or bad word")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        if isinstance(data, dict) and "cache_max_entry_count" in data:
            data = dict(data)
            data["kv_cache_fraction"] = data.pop("cache_max_entry_count")
        return data

    @model_validator(mode="after")
    def _pipeline_split(self):
        if self.pipeline_split == "threshold" and self.pipeline_stage_bytes is None:
            raise ValueError("pipeline_stage_bytes: pipeline_split='threshold' needs a byte limit per stage; "
                             "set pipeline_stage_bytes or use pipeline_split='equal_size'")
        return self

    @model_validator(mode="after")
    def _eviction_copy_needs_host_blocks(self):
        if self.eviction == "copy" and self.num_cpu_blocks == 0:
            raise ValueError("num_cpu_blocks: eviction='copy' swaps preempted sequences to host memory but "
                             "num_cpu_blocks is 0; set num_cpu_blocks (host KV blocks) or use eviction='recompute'")
        return self

    @model_validator(mode="after")
    def _compile_is_not_eager(self):
        if self.compile and self.enforce_eager:
            raise ValueError("compile: asks for compiled decode steps but enforce_eager asks for eager ones; "
                             "set one of them")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def cache_max_entry_count(self) -> float:
        return self.kv_cache_fraction


FLOAT32_MAX = 3.4028234663852886e38
# Structured-output constraints past these take the grammar compiler seconds on the engine thread (and its cache
# the memory): xgrammar compiles a 64 000-character regex in ~0.7 s here; a 300 000-character one stalled a worker.
MAX_GUIDED_CHARS = 32_768    # a regex, a grammar, or a choice list's strings together
MAX_SCHEMA_CHARS = 65_536    # a JSON schema's text


def guided_size(name: str, value) -> tuple[int, int, str] | None:
    """(size in characters, its limit, what it is) of a structured-output constraint; None for JSON mode."""
    if name == "guided_json":
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return len(text), MAX_SCHEMA_CHARS, "JSON schema"
    if name == "guided_choice":
        return sum(len(c) for c in value), MAX_GUIDED_CHARS, "choice list"
    if isinstance(value, str):
        return len(value), MAX_GUIDED_CHARS, name.removeprefix("guided_")
    return None


GUIDED_FIELDS = ("guided_json", "guided_json_object", "guided_regex", "guided_choice", "guided_grammar")


class GenerationConfig(_Strict):
    """Per-request sampling and stopping options (LMDeploy's GenerationConfig)."""

    n: int = Field(1, ge=1, le=128, description="choices per prompt (LMDeploy's n), each sampled with its own "
                   "seed; pipeline() runs them as n requests (the engine and the servers take n=1)")
    max_new_tokens: int = Field(256, ge=1, description="most tokens to generate")
    max_length: int | None = Field(
        None, ge=2, description="DeepSpeed-MII's limit on prompt + generated tokens; the tighter limit wins")
    min_new_tokens: int = Field(0, ge=0, description="EOS and stop words are held off until this many tokens")
    temperature: float = Field(0.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass, in (0, 1]")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 means all")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 means none; >1 discourages repeats")
    ignore_eos: bool = False
    random_seed: int | None = Field(None, ge=0, lt=2 ** 63, description="same seed, same text")
    stop_words: list[str] = Field(default_factory=list, description="generation stops at any of these; the text is cut before it")
    bad_words: list[str] = Field(default_factory=list, description="these never appear in the output")
    skip_special_tokens: bool = True
    logprobs: int | None = Field(None, ge=0, description="return the chosen token's logprob (and this many top "
                                 "alternatives, at most the engine's max_logprobs)")
    adapter: str | None = Field(None, description="the LoRA adapter to generate with, by the name the engine "
                                "serves it under; None means the base model")
    best_of: int | None = Field(None, ge=1, le=128, description="sample this many choices (at least n) and return "
                                "the n with the highest cumulative logprob; None means n")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's: subtracted from the logit of every "
                                    "token generated so far at least once")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's: subtracted from a token's logit once "
                                     "per time it was generated so far")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> bias in [-100, 100] added "
                                         "to its logit (OpenAI's); -100 bans a token, 100 all but forces it")
    prompt_logprobs: int | None = Field(None, ge=0, description="return each prompt token's logprob (the first "
                                        "has none) and this many top alternatives per position")
    # Structured outputs (vLLM's guided decoding): at most one of these; the output is constrained by a token mask.
    guided_json: dict | str | None = Field(None, description="a JSON schema (object or its JSON text) the output "
                                           "must match")
    guided_json_object: bool = Field(False, description="the output is any JSON object (OpenAI's JSON mode)")
    guided_regex: str | None = Field(None, description="a regular expression the whole output must match")
    guided_choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    guided_grammar: str | None = Field(None, description="an EBNF (GBNF) grammar the output must match; its "
                                       "start rule is root")
    guided_whitespace_pattern: str | None = Field(None, description="JSON output: a regex of the whitespace "
                                                  "allowed between tokens (default: compact, one space)")
    # True where a server's caller set max_new_tokens (protocol.py): it must then fit beside the prompt in
    # session_len, as vLLM's server refuses prompt + max_tokens > max_model_len. Elsewhere (the Python API, as in
    # LMDeploy's pipeline and vLLM's LLM; a deployment's default) the engine cuts it to what session_len leaves.
    _max_new_tokens_must_fit: bool = PrivateAttr(False)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        """DeepSpeed-MII names: do_sample, stop (max_length is a field of its own)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "stop" in data:
            stop = data.pop("stop")
            data.setdefault("stop_words", [stop] if isinstance(stop, str) else list(stop or []))
        if "do_sample" in data:
            if not data.pop("do_sample"):
                data["temperature"] = 0.0
            elif not data.get("temperature"):
                data["temperature"] = 1.0
        return data

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, bias):
        for token, value in bias.items():
            if token < 0:
                raise ValueError(f"token id {token} is negative; token ids start at 0")
            if not -100 <= value <= 100:
                raise ValueError(f"bias {value} for token {token} is outside [-100, 100]")
        return bias

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, choices):
        if choices is not None and (not choices or any(not c for c in choices)):
            raise ValueError("must be a non-empty list of non-empty strings")
        return choices

    @model_validator(mode="after")
    def _one_constraint_and_best_of(self):
        given = self.guided_fields()
        if len(given) > 1:
            raise ValueError(f"{given[1]}: set together with {given[0]}; give at most one of guided_json, "
                             "guided_json_object, guided_regex, guided_choice and guided_grammar")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: {self.best_of} is less than n ({self.n}); best_of must be at least n")
        return self

    def guided_fields(self) -> list[str]:
        """The structured-output options this config sets (at most one once validated)."""
        return [name for name in GUIDED_FIELDS if getattr(self, name) not in (None, False)]

    @field_validator("stop_words", "bad_words")
    @classmethod
    def _words(cls, words):
        if any(not w for w in words):
            raise ValueError("must not contain empty strings; remove them")
        for i, word in enumerate(words):   # a Python str (or JSON's "\\ud800") may hold a lone surrogate
            try:
                word.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"word {i} holds a lone surrogate (U+{ord(word[err.start]):04X}) at character "
                                 f"{err.start}, which is not Unicode text; send valid UTF-8") from None
        return words

    @field_validator("temperature", "top_p", "repetition_penalty")
    @classmethod
    def _fits_float32(cls, value):
        # The sampler computes in float32: a larger value would become infinity there.
        if value > FLOAT32_MAX:
            raise ValueError(f"must be at most {FLOAT32_MAX:.4g} (float32's largest number)")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def max_new_tokens_must_fit(self) -> bool:
        return self._max_new_tokens_must_fit

    def with_max_new_tokens_required(self) -> GenerationConfig:
        """A copy whose max_new_tokens is a caller's demand: refused, not cut, where session_len has no room."""
        copy = self.model_copy()
        copy._max_new_tokens_must_fit = True
        return copy


SEED_SPACE = 2 ** 63   # GenerationConfig.random_seed's range


def choice_configs(gen: GenerationConfig) -> list[GenerationConfig]:
    """n (or best_of) choices -> that many one-choice configs, each with its own seed: a set random_seed s gives
    s, s+1, ... (repeatable), an unset one lets the engine draw a seed per request. Greedy choices agree.
    pipeline() and the worker's calls both expand a request this way; best_choices then picks what is returned."""
    count = gen.best_of or gen.n
    if count == 1:
        return [gen]
    one = gen.model_copy(update={"n": 1, "best_of": None})   # a copy keeps the private max_new_tokens_must_fit
    if gen.random_seed is None:
        return [one] * count
    return [one.model_copy(update={"random_seed": (gen.random_seed + j) % SEED_SPACE}) for j in range(count)]


def best_choices(gen: GenerationConfig, cumulative_logprobs: list[float]) -> list[int]:
    """Which of choice_configs(gen)'s choices are returned, in order: all of them without best_of; with it, the n
    whose cumulative logprob is highest, best first (vLLM's and OpenAI's best_of)."""
    if gen.best_of is None or gen.best_of == gen.n:
        return list(range(len(cumulative_logprobs)))
    order = sorted(range(len(cumulative_logprobs)), key=lambda j: -cumulative_logprobs[j])
    return order[:gen.n]


def generation_config(*layers: GenerationConfig | dict | None, **options) -> GenerationConfig:
    """Merge configs (objects or dicts, later ones winning) and keyword options into one validated config.

    MII's `do_sample` is applied after the merge, so `do_sample=True` keeps a temperature that an
    earlier layer set and only turns greedy (temperature 0) into temperature 1.
    """
    merged: dict = {}
    do_sample = None
    for layer in (*layers, options):
        if isinstance(layer, GenerationConfig):
            layer = layer.model_dump(exclude_unset=True)
        layer = dict(layer or {})
        if "do_sample" in layer:
            do_sample = layer.pop("do_sample")
        merged.update(GenerationConfig._aliases(layer))
    if do_sample is not None:
        merged["temperature"] = (merged.get("temperature") or 1.0) if do_sample else 0.0
    return GenerationConfig.build(**merged)


# -- request limits ------------------------------------------------------------------------------------
# What one request may ask of an engine, checked against EngineConfig's limits before it reaches the engine's
# step loop, so that no request can crash it, hang it or starve the others. Each check is pure and returns
# the problem (naming the field, the limit and the fix) or None; the caller raises it as a RequestError.

def prompt_count_problem(count: int, limits: EngineConfig) -> str | None:
    if count > limits.max_prompts_per_request:
        return (f"prompts: {count} prompts in one request, more than max_prompts_per_request "
                f"({limits.max_prompts_per_request}); split them over several requests or raise "
                "max_prompts_per_request")
    return None


def generation_problem(gen: GenerationConfig, limits: EngineConfig) -> str | None:
    """What of `gen` exceeds the engine's limits on logprobs and stop/bad words, or asks one request for n > 1."""
    if gen.n != 1 or (gen.best_of or 1) != 1:   # one request is one sequence: see choice_configs
        name, count = ("n", gen.n) if gen.n != 1 else ("best_of", gen.best_of)
        return (f"{name}: {count} choices asked of one request; the engine runs one choice per request: use "
                "pipeline() or a server, which run each choice as its own request (choice_configs), or send the "
                "prompt that many times")
    if gen.logprobs is not None and gen.logprobs > limits.max_logprobs:
        return (f"logprobs: {gen.logprobs} top alternatives asked, more than max_logprobs ({limits.max_logprobs}); "
                f"ask for at most {limits.max_logprobs} or raise max_logprobs")
    if gen.prompt_logprobs is not None and gen.prompt_logprobs > limits.max_logprobs:
        return (f"prompt_logprobs: {gen.prompt_logprobs} top alternatives asked, more than max_logprobs "
                f"({limits.max_logprobs}); ask for at most {limits.max_logprobs} or raise max_logprobs")
    if gen.prompt_logprobs is not None and limits.pipeline_parallel > 1:   # the last stage sends sampled rows only
        return ("prompt_logprobs: not served with pipeline_parallel > 1 (the last stage returns only the sampled "
                "rows' logits); use tensor_parallel, or leave prompt_logprobs unset")
    if gen.adapter is not None and gen.adapter not in limits.adapters:
        served = ", ".join(sorted(limits.adapters)) or "none"
        return (f"adapter: {gen.adapter!r} is not served here (adapters: {served}); name one of them, or leave "
                "adapter unset for the base model")
    for name in gen.guided_fields():
        size = guided_size(name, getattr(gen, name))
        if size is not None and size[0] > size[1]:
            return (f"{name}: a {size[2]} of {size[0]} characters, more than {size[1]} (one this large takes seconds "
                    "to compile); send a smaller one")
    for name, words, most in (("stop_words", gen.stop_words, limits.max_stop_words),
                              ("bad_words", gen.bad_words, limits.max_bad_words)):
        if len(words) > most:
            return (f"{name}: {len(words)} words, more than max_{name} ({most}); pass at most {most} "
                    f"or raise max_{name}")
        for i, word in enumerate(words):
            if len(word) > limits.max_word_chars:
                return (f"{name}[{i}]: {len(word)} characters, more than max_word_chars ({limits.max_word_chars}); "
                        "shorten it or raise max_word_chars")
    return None


def max_new_tokens_problem(prompt_len: int, gen: GenerationConfig, session_len: int,
                           field: str = "prompt") -> str | None:
    """A max_new_tokens that a server's caller set must fit beside the prompt in session_len (see
    GenerationConfig.max_new_tokens_must_fit); any other is cut by the engine to what session_len leaves."""
    if not gen.max_new_tokens_must_fit or prompt_len + gen.max_new_tokens <= session_len:
        return None
    room = session_len - prompt_len
    return (f"max_new_tokens: {field} is {prompt_len} tokens and max_new_tokens is {gen.max_new_tokens}, "
            f"{prompt_len + gen.max_new_tokens} in all, more than session_len ({session_len}); ask for at most "
            f"{room} new tokens (leave max_new_tokens unset to get up to that many), or shorten the prompt")

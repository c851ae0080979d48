"""The Python API: `pipeline()` runs the engine inside the calling process (non-persistent).

Written for LMDeploy or DeepSpeed-MII, code keeps working: LMDeploy's `pipeline(model_path, backend_config=,
chat_template_config=, model_name=, log_level=)`, `pipe(...)`, `pipe.stream_infer(...)`, `do_preprocess`,
`GenerationConfig(n=...)`; MII's `pipeline(model, tensor_parallel=, model_config=)`, `return_full_text`, and
its launcher pattern: under `torchrun --nproc_per_node N` (or `deepspeed --num_gpus N`) every rank calls
`pipeline()`, rank 0 runs the engine and returns the pipeline, the other ranks follow rank 0 inside
`pipeline()` until rank 0 destroys its pipeline, then get a `FollowerPipeline` (`is_rank_0` False, no results).
docs/seeds.md lists every option and what it means here.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Iterator

from kubellm.runtime.chat_template import ChatTemplateConfig, prepare_prompt
from kubellm.runtime.config import (ConfigError, EngineConfig, GenerationConfig, best_choices, choice_configs,
                                    generation_config)
from kubellm.runtime.errors import RequestError
from kubellm.runtime.lmdeploy_compat import (BackendOptions, PytorchEngineConfig,
                                             TurbomindEngineConfig, backend_options, call_options, model_source,
                                             warn_notes)
from kubellm.runtime.mii_compat import (MiiOptions, full_text, generate_options, merge, model_config_options)
from kubellm.runtime.response import Response, prompt_logprobs_of, token_logprobs_of

log = logging.getLogger("kubellm.pipeline")


def _normalise_prompts(prompts) -> list:
    """A single prompt (string, one chat conversation, or one {'messages', 'tools'}) becomes a one-item batch."""
    if isinstance(prompts, str) or (isinstance(prompts, dict) and "messages" in prompts):
        return [prompts]
    if (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(m, dict) for m in prompts)
            and not all("messages" in m for m in prompts)):
        return [list(prompts)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise RequestError("prompts: empty list; pass at least one prompt")
        return list(prompts)
    raise RequestError(f"prompts: expected a string, a list of strings or chat messages, got {type(prompts).__name__}")


class Pipeline:
    """An engine in this process. Calls from several threads are serialized (LMDeploy's thread_safe)."""

    is_rank_0 = True   # DeepSpeed-MII's name: under a launcher, rank 0 holds the pipeline

    def __init__(self, model: str | os.PathLike, engine_config: EngineConfig, default_gen: GenerationConfig,
                 show_progress: bool = True, *, rank_group=None, model_name: str | None = None,
                 chat_template: ChatTemplateConfig | None = None):
        from kubellm.runtime.engine.engine import LLMEngine

        self.engine = LLMEngine(model, engine_config, show_progress, rank_group=rank_group)
        self.default_gen = default_gen
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name or str(model)
        self.chat_template = chat_template
        self._lock = threading.RLock()
        if chat_template is not None and not chat_template.has_pieces and not self.tokenizer.hf.chat_template:
            self.destroy()
            raise ConfigError(
                f"chat_template_config.model_name: {chat_template.model_name!r} names one of LMDeploy's built-in "
                "chat templates, which kubellm does not carry, and this checkpoint has no chat template of its own "
                "(tokenizer_config.json); give the template's pieces (user=, eoh=, assistant=, eoa=, ...)")

    # -- requests -------------------------------------------------------------------------------
    def _requests(self, prompts, gen_config, do_preprocess, adapter_name, options) -> tuple[list, list, list, bool,
                                                                                            list]:
        """(engine prompts, one-choice configs, the caller's prompt of each, return_full_text): a prompt with
        n choices (or best_of) is that many requests (config.choice_configs), in prompt order (prompt i's choice j
        at i*n + j, as LMDeploy returns a batch holding each prompt n times); and per prompt, its config and the
        positions of its requests (for best_of)."""
        if adapter_name is not None:   # LMDeploy's name for the request's LoRA adapter
            options = {**options, "adapter": adapter_name}
        if do_preprocess not in (None, True, False):
            raise ConfigError(f"do_preprocess: expected True, False or None, got {do_preprocess!r}")
        prompts = _normalise_prompts(prompts)
        options, full = generate_options(call_options(options))
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != len(prompts):
                raise RequestError(f"gen_config: {len(gen_config)} configs for {len(prompts)} prompts; "
                                   "give one per prompt or one for all")
            gens = [generation_config(self.default_gen, g, **options) for g in gen_config]
        else:
            gens = [generation_config(self.default_gen, gen_config, **options)] * len(prompts)
        template = self.chat_template
        engine_prompts, engine_gens, originals, groups = [], [], [], []
        for i, (prompt, gen) in enumerate(zip(prompts, gens)):
            if full:
                full_text(prompt, "", i)   # refused before anything runs
            ready = prepare_prompt(prompt, do_preprocess, template, field=f"prompts[{i}]")
            if template is not None and template.stop_words and ready is not prompt:
                gen = gen.updated(stop_words=[*gen.stop_words, *template.stop_words])
            one = choice_configs(gen)
            groups.append((gen, list(range(len(engine_prompts), len(engine_prompts) + len(one)))))
            for choice in one:
                engine_prompts.append(ready)
                engine_gens.append(choice)
                originals.append(prompt)
        return engine_prompts, engine_gens, originals, full, groups

    def __call__(self, prompts, gen_config=None, do_preprocess: bool | None = None, adapter_name: str | None = None,
                 use_tqdm: bool = False, **gen_options) -> list[Response]:
        """Run prompts to completion; one Response per prompt and choice, in prompt order."""
        with self._lock:
            engine_prompts, gens, originals, full, groups = self._requests(prompts, gen_config, do_preprocess,
                                                                           adapter_name, gen_options)
            if use_tqdm:
                seqs = self._generate_with_progress(engine_prompts, gens)
            else:
                seqs = self.engine.generate(engine_prompts, gens)
        out = []
        for i, (gen, positions) in enumerate(groups):   # each prompt's n choices (the best n of best_of)
            for k in best_choices(gen, [seqs[p].cumulative_logprob for p in positions]):
                r = self._response(len(out), seqs[positions[k]])
                r.prompt_index = i
                if full:
                    r.text = full_text(originals[positions[k]], r.text, r.index)
                out.append(r)
        return out

    infer = batch_infer = __call__   # LMDeploy's other names for the same call

    def _generate_with_progress(self, prompts, gens):
        """LMDeploy's use_tqdm: a bar of finished requests while the batch runs."""
        from tqdm import tqdm

        seqs = []
        with tqdm(total=len(prompts), desc="requests", unit="req") as bar:
            try:
                for i, (prompt, gen) in enumerate(zip(prompts, gens)):
                    seqs.append(self.engine.add_request(prompt, gen, field=f"prompts[{i}]"))
                done = 0
                while any(not s.is_finished for s in seqs):
                    self.engine.step()
                    finished = sum(s.is_finished for s in seqs)
                    bar.update(finished - done)
                    done = finished
            except BaseException:
                for s in seqs:
                    self.engine.abort(s.request_id)
                raise
        return seqs

    def stream_infer(self, prompts, gen_config=None, do_preprocess: bool | None = None,
                     adapter_name: str | None = None, stream_response: bool = True,
                     **gen_options) -> Iterator[Response]:
        """Yield Responses as tokens are produced, for all prompts (and choices) at once: `text` and `token_ids`
        are the new piece, `generate_token_len` the count so far, `index` whose, `finish_reason` set on the last.
        `stream_response=False`: one Response per prompt and choice, whole, when it finishes.

        If the consumer stops early, the unfinished requests are aborted and their blocks freed.
        """
        with self._lock:   # held while the stream lives: another thread's call waits for it
            engine_prompts, gens, originals, full, groups = self._requests(prompts, gen_config, do_preprocess,
                                                                           adapter_name, gen_options)
            for gen, _ in groups:
                if gen.best_of is not None and gen.best_of > gen.n:
                    raise RequestError(f"best_of: {gen.best_of} choices of which the best {gen.n} are returned "
                                       "cannot be streamed (which are best is known only at the end); call the "
                                       "pipeline instead, or leave best_of unset")
            seqs = []
            try:
                for i, (p, g) in enumerate(zip(engine_prompts, gens)):
                    seqs.append(self.engine.add_request(p, g, field=f"prompts[{i}]"))
                index = {s.seq_id: i for i, s in enumerate(seqs)}
                started = set()
                while any(not s.is_finished for s in seqs):
                    for out in self.engine.step():
                        i = index.get(out.seq.seq_id)
                        if i is None:
                            continue
                        s = out.seq
                        if not stream_response:
                            if out.finished:
                                r = self._response(i, s)
                                r.text = full_text(originals[i], r.text, i) if full else r.text
                                yield r
                            continue
                        text = out.delta_text   # may be "" (a token ending mid-character): its id still goes out
                        if full and i not in started:   # MII's return_full_text: the prompt opens the stream
                            text = full_text(originals[i], text, i)
                        started.add(i)
                        yield Response(text, s.num_prompt_tokens, s.num_generated,
                                       s.finish_reason if out.finished else None, i, out.new_token_ids,
                                       session_id=s.seq_id)
            finally:
                for s in seqs:
                    self.engine.abort(s.request_id)

    stream = stream_infer

    def _response(self, index: int, seq) -> Response:
        return Response(seq.text, seq.num_prompt_tokens, seq.num_generated, seq.finish_reason, index,
                        seq.generated_ids, seq.logprobs if seq.gen.logprobs is not None else None,
                        seq.top_logprobs if seq.gen.logprobs else None, session_id=seq.seq_id,
                        cumulative_logprob=seq.cumulative_logprob,
                        token_logprobs=token_logprobs_of(seq, self.engine.tokenizer),
                        prompt_logprobs=prompt_logprobs_of(seq, self.engine.tokenizer))

    def destroy(self) -> None:
        """Free the model and the KV cache (under a launcher: the other ranks' pipeline() returns); the
        pipeline cannot be used afterwards."""
        if getattr(self, "engine", None) is not None:
            engine, self.engine = self.engine, None
            engine.destroy()


class FollowerPipeline:
    """What pipeline() returns on a rank other than 0 of a launched group, once rank 0 destroyed its pipeline:
    the rank followed rank 0's steps inside pipeline(), and holds no results (DeepSpeed-MII's ranks 1..n
    without all_rank_output get none either), so calls return empty lists and destroy() does nothing."""

    is_rank_0 = False

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, prompts=None, *args, **kwargs) -> list[Response]:
        return []

    infer = batch_infer = __call__

    def stream_infer(self, prompts=None, *args, **kwargs) -> Iterator[Response]:
        return iter(())

    stream = stream_infer

    def destroy(self) -> None:
        pass


# -- pipeline() ---------------------------------------------------------------------------------------
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _set_log_level(level) -> None:
    """LMDeploy's log_level: the level of kubellm's loggers."""
    if isinstance(level, str) and level.upper() in _LOG_LEVELS:
        level = level.upper()
    elif not (isinstance(level, int) and not isinstance(level, bool)):
        raise ConfigError(f"log_level: {level!r}; use one of {', '.join(_LOG_LEVELS)} (or a logging level number)")
    logging.getLogger("kubellm").setLevel(level)


def _engine_options(options: dict, backend: BackendOptions, mii: MiiOptions) -> tuple[dict, dict]:
    """pipeline()'s keywords, the backend config's and MII's model_config -> (EngineConfig options, generation
    defaults). An option given two ways with different values is an error."""
    engine_fields = set(EngineConfig.model_fields) | {"cache_max_entry_count"}
    engine = {k: v for k, v in options.items() if k in engine_fields}
    gen = {k: v for k, v in options.items() if k not in engine_fields}
    if "max_length" in gen:   # MII: pipeline(max_length=) is ModelConfig's, the engine's limit (session_len)
        merge(engine, {"session_len": gen.pop("max_length")}, "max_length")
    if "cache_max_entry_count" in engine:
        merge(engine, {"kv_cache_fraction": engine.pop("cache_max_entry_count")}, "cache_max_entry_count")
    merge(engine, backend.engine, "backend_config")
    merge(engine, mii.engine, "model_config")
    return engine, gen


def pipeline(model_path_or_name: str | os.PathLike | None = None, engine_config: EngineConfig | dict | None = None,
             show_progress: bool = True, *, backend_config=None, model_name: str | None = None,
             chat_template_config: ChatTemplateConfig | None = None, log_level=None, model_config: dict | None = None,
             **options) -> Pipeline | FollowerPipeline:
    """A non-persistent pipeline: `pipe = pipeline("smollm2-135m"); pipe("Hello")`.

    `options` may hold any EngineConfig field (e.g. max_batch_size, tensor_parallel) and any
    GenerationConfig field, which then becomes the default of every call. LMDeploy's `backend_config`
    (TurbomindEngineConfig / PytorchEngineConfig), `model_name`, `chat_template_config`, `log_level` and
    DeepSpeed-MII's `model_config` are mapped as docs/seeds.md says. `model_path_or_name` may be a local
    directory, a known model name, or a Hugging Face Hub id (downloaded into the backend config's
    download_dir, at its revision). Under torchrun, see the module docstring.
    """
    from kubellm.runtime.hub.embedded import DEFAULT_MODEL

    if log_level is not None:
        _set_log_level(log_level)
    if isinstance(engine_config, (TurbomindEngineConfig, PytorchEngineConfig)):   # LMDeploy's second argument
        if backend_config is not None:
            raise ConfigError("backend_config: given twice (second argument and backend_config=); give it once")
        engine_config, backend_config = None, engine_config
    if chat_template_config is not None and not isinstance(chat_template_config, ChatTemplateConfig):
        raise ConfigError(f"chat_template_config: expected a ChatTemplateConfig (from kubellm), got "
                          f"{type(chat_template_config).__name__}")
    backend = backend_options(backend_config) if backend_config is not None else BackendOptions()
    mii = model_config_options(model_config) if model_config is not None else MiiOptions()
    warn_notes(backend.notes + mii.notes)
    if mii.serve:
        raise ConfigError(f"model_config.{next(iter(mii.serve))}: a persistent deployment's option; "
                          "kubellm.serve() takes it, pipeline() runs one engine")
    model = model_path_or_name or mii.model or DEFAULT_MODEL
    if mii.model is not None and model_path_or_name is not None and str(mii.model) != str(model_path_or_name):
        raise ConfigError(f"model_config.model_name_or_path: {mii.model!r}, but the pipeline's model is "
                          f"{str(model_path_or_name)!r}; give it once")
    engine_opts, gen_opts = _engine_options(options, backend, mii)
    explicit_parallel = bool({"tensor_parallel", "pipeline_parallel"} & set(engine_opts))
    if isinstance(engine_config, EngineConfig):
        explicit_parallel |= bool({"tensor_parallel", "pipeline_parallel"} & engine_config.model_fields_set)
        engine_config = engine_config.updated(**engine_opts) if engine_opts else engine_config
    else:
        explicit_parallel |= bool({"tensor_parallel", "pipeline_parallel"} & set(engine_config or {}))
        engine_config = EngineConfig.build(**{**(engine_config or {}), **engine_opts})
    default_gen = generation_config(**gen_opts)
    engine_config = _launcher_world(engine_config, explicit_parallel)
    local_rank0 = os.environ.get("LOCAL_RANK", "0") == "0"
    model_name = model_name or backend.model_name or str(model)   # the name asked for, not where it was downloaded
    model = model_source(model, backend.download_dir, backend.revision, downloader=local_rank0)

    from kubellm.runtime.executor.rank_group import ranks_on_this_host

    ranks = ranks_on_this_host(engine_config.world_size)
    if ranks is not None and ranks[0] != 0:
        return _follow(model, engine_config, ranks)
    group = _lead(model, engine_config, ranks) if ranks is not None else None
    pipe = Pipeline(model, engine_config, default_gen, show_progress, rank_group=group, model_name=model_name,
                    chat_template=chat_template_config)
    if group is not None:   # a script that ends without destroy() must still let the other ranks exit cleanly
        ref = weakref.ref(pipe)
        atexit.register(lambda: ref() is not None and ref().destroy())
    return pipe


# -- under a launcher (torchrun / deepspeed): RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT ----------------------
def _launcher_world(config: EngineConfig, explicit_parallel: bool) -> EngineConfig:
    """Under a launcher of WORLD_SIZE processes, the pipeline spans them: tensor_parallel defaults to
    WORLD_SIZE (as DeepSpeed-MII's does); an explicit tensor x pipeline size must equal it, or be 1 (each
    process then runs a pipeline of its own)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return config
    world = int(os.environ["WORLD_SIZE"])
    if world == 1:
        return config
    if not explicit_parallel:
        return config.updated(tensor_parallel=world)
    if config.world_size not in (1, world):
        raise ConfigError(f"tensor_parallel: {config.tensor_parallel} x pipeline_parallel {config.pipeline_parallel} "
                          f"= {config.world_size} ranks, but the launcher started WORLD_SIZE={world} processes; "
                          f"make tensor_parallel x pipeline_parallel = {world} (or 1: a pipeline per process)")
    return config


def _shard_plan(model, config: EngineConfig):
    from kubellm.runtime.engine.engine import session_len_for
    from kubellm.runtime.executor.loader import check_model_dir, load_hf_config
    from kubellm.runtime.executor.rank_group import master_address
    from kubellm.runtime.hub.embedded import resolve_model

    path = check_model_dir(resolve_model(model))
    return path, session_len_for(load_hf_config(path), config), master_address()


def _lead(model, config: EngineConfig, ranks: list[int]):
    """Rank 0: start this host's other ranks of the group (a pod running several), wait for every rank."""
    from kubellm.runtime.executor.rank_group import RankGroup, start_remote_rank

    path, session_len, (addr, port) = _shard_plan(model, config)
    local = [start_remote_rank(r, addr, port, path, config, session_len) for r in ranks[1:]]
    log.info("rank 0 of %d: waiting for the other ranks at %s:%d", config.world_size, addr, port)
    return RankGroup.accept(config, addr, port, local_procs=local)


def _follow(model, config: EngineConfig, ranks: list[int]) -> FollowerPipeline:
    """A rank other than 0: run rank 0's steps on this rank's shard until rank 0 destroys its pipeline, then
    return. Exits the process (code 1) if rank 0 goes away or a collective fails, as `kubellm worker` does."""
    from kubellm.runtime.executor.rank_group import serve_remote_rank, start_remote_rank

    path, session_len, (addr, port) = _shard_plan(model, config)
    local = [start_remote_rank(r, addr, port, path, config, session_len) for r in ranks[1:]]
    log.info("rank %d: following rank 0 at %s:%d", ranks[0], addr, port)
    serve_remote_rank(ranks[0], addr, port, path, config, session_len, exit_when_stopped=False)
    for proc in local:
        proc.join()
    return FollowerPipeline(ranks[0])

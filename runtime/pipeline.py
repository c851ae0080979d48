"""The Python API: `pipeline()` runs the engine inside the calling process (non-persistent)."""

from __future__ import annotations

import os
from typing import Iterator

from kubellm.runtime.config import EngineConfig, GenerationConfig, generation_config
from kubellm.runtime.errors import RequestError
from kubellm.runtime.response import Response


def _normalise_prompts(prompts) -> list:
    """A single prompt (string, or one chat conversation) becomes a one-item batch."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(m, dict) for m in prompts):
        return [list(prompts)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise RequestError("prompts: empty list; pass at least one prompt")
        return list(prompts)
    raise RequestError(f"prompts: expected a string, a list of strings or chat messages, got {type(prompts).__name__}")


class Pipeline:
    def __init__(self, model: str | os.PathLike, engine_config: EngineConfig, default_gen: GenerationConfig,
                 show_progress: bool = True):
        from kubellm.runtime.engine.engine import LLMEngine

        self.engine = LLMEngine(model, engine_config, show_progress)
        self.default_gen = default_gen
        self.tokenizer = self.engine.tokenizer

    def _gens(self, n: int, gen_config, options) -> list[GenerationConfig]:
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != n:
                raise RequestError(f"gen_config: {len(gen_config)} configs for {n} prompts; "
                                   "give one per prompt or one for all")
            return [generation_config(self.default_gen, g, **options) for g in gen_config]
        return [generation_config(self.default_gen, gen_config, **options)] * n

    def __call__(self, prompts, gen_config=None, **gen_options) -> list[Response]:
        prompts = _normalise_prompts(prompts)
        seqs = self.engine.generate(prompts, self._gens(len(prompts), gen_config, gen_options))
        return [self._response(i, s) for i, s in enumerate(seqs)]

    def stream(self, prompts, gen_config=None, **gen_options) -> Iterator[Response]:
        """Yield incremental responses (text deltas) as tokens are produced, for all prompts at once.

        If the consumer stops early, the unfinished requests are aborted and their blocks freed.
        """
        prompts = _normalise_prompts(prompts)
        gens = self._gens(len(prompts), gen_config, gen_options)
        seqs = []
        try:
            for i, (p, g) in enumerate(zip(prompts, gens)):
                seqs.append(self.engine.add_request(p, g, field=f"prompts[{i}]"))
            index = {s.seq_id: i for i, s in enumerate(seqs)}
            while any(not s.is_finished for s in seqs):
                for out in self.engine.step():
                    i = index.get(out.seq.seq_id)
                    if i is None or not (out.delta_text or out.finished):
                        continue
                    s = out.seq
                    yield Response(out.delta_text, s.num_prompt_tokens, s.num_generated,
                                   s.finish_reason if out.finished else None, i, out.new_token_ids)
        finally:
            for s in seqs:
                self.engine.abort(s.request_id)

    @staticmethod
    def _response(index: int, seq) -> Response:
        return Response(seq.text, seq.num_prompt_tokens, seq.num_generated, seq.finish_reason, index,
                        seq.generated_ids, seq.logprobs if seq.gen.logprobs is not None else None,
                        seq.top_logprobs if seq.gen.logprobs else None)

    def destroy(self) -> None:
        """Free the model and the KV cache; the pipeline cannot be used afterwards."""
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
            self.engine = None


def pipeline(model_path_or_name: str | os.PathLike | None = None, engine_config: EngineConfig | dict | None = None,
             show_progress: bool = True, **options) -> Pipeline:
    """A non-persistent pipeline: `pipe = pipeline("smollm2-135m"); pipe("Hello")`.

    `options` may hold any EngineConfig field (e.g. max_batch_size, tensor_parallel) and any
    GenerationConfig field, which then becomes the default of every call.
    """
    from kubellm.runtime.hub.embedded import DEFAULT_MODEL

    engine_fields = set(EngineConfig.model_fields) | {"cache_max_entry_count"}
    engine_opts = {k: v for k, v in options.items() if k in engine_fields}
    gen_opts = {k: v for k, v in options.items() if k not in engine_fields}
    if isinstance(engine_config, EngineConfig):
        engine_config = engine_config.updated(**engine_opts) if engine_opts else engine_config
    else:
        engine_config = EngineConfig.build(**{**(engine_config or {}), **engine_opts})
    return Pipeline(model_path_or_name or DEFAULT_MODEL, engine_config, generation_config(**gen_opts), show_progress)

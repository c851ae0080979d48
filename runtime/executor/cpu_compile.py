"""On CPU, decode steps through torch.compile (EngineConfig.compile); prefill stays eager.

An eager CPU decode step runs some 70 small ops per layer around its four matmuls, each a few microseconds
of dispatch, and multiplies with torch's general kernels. Inductor fuses the norms, rotary, activation and
casts into a few C++ loops, and with frozen weights and max-autotune multiplies with GEMMs it packs and picks
for these shapes (MKL packed float, its own int8 / int4 weight-only templates). On SmolLM2 the step is about 2.4x
faster (docs/cpu-compile.md); the price is a compile at load and a packed copy of the float weights.

- What runs compiled: a step of decodes only (no prefill chunk, no LoRA adapter token), from the token ids to
  the logits (the LM head included). Every other step runs eagerly on the same weights and the same KV cache.
- Shapes are dynamic (batch and block-table width), but torch specializes a size of 1: batch 1 is its own graph,
  and block tables are padded to at least two columns so width 1 never makes another. Both graphs are compiled
  at warm-up (load), so no request waits for a compile; after it, a step evaluates only the guards that choose
  between the two graphs (torch.compiler.set_stance's skip_guard_eval_unsafe).
- Only on CPU, one rank (tensor and pipeline parallel steps stay eager), kubellm's own model files.
"""

from __future__ import annotations

import itertools
import logging
import types

import torch
import torch.nn.functional as F

from kubellm.kernels import dispatch
from kubellm.runtime.executor.context import AttentionMetadata, set_context

log = logging.getLogger(__name__)

# Inductor options of the compiled step (torch._inductor.config): weights become constants it packs once
# (freezing), and each GEMM is the fastest of its candidates, measured at compile time (max-autotune).
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
WARMUP_BATCHES = (1, 2)   # one graph each: size 1 is specialized, 2 stands for every larger batch
MIN_TABLE_WIDTH = 2


def why_not_compiled(runner) -> str | None:
    """Why this runner's decode steps cannot be compiled, or None when they can (and EngineConfig.compile asks)."""
    if not runner.config.compile:
        return "compile is not set"
    if getattr(runner.model, "eager_reason", None):  # the Transformers backend
        return runner.model.eager_reason
    if runner.parallel.pp > 1 or runner.parallel.tp > 1:
        return "tensor/pipeline parallel steps run eagerly"
    if dispatch.use_triton(torch.empty(0, device=runner.device)):
        return "KUBELLM_KERNELS selects the Triton kernels"
    return None


def check_device(config, device: torch.device) -> None:
    """compile is a CPU option: on a GPU decode steps replay CUDA graphs instead."""
    if config.compile and device.type != "cpu":
        raise ValueError(f"compile: compiles CPU decode steps, but the model runs on {device}; on a GPU decode "
                         "steps replay CUDA graphs already (leave enforce_eager unset) — unset compile")


_instances = itertools.count()


def _decode_logits(model: torch.nn.Module):
    """The compiled function: token ids and positions to logits, as its own code object (dynamo keeps graphs and
    their guards per code object, so every model's two graphs are its own and fast guard checks never have to
    tell two models of one process apart)."""
    def logits(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.compute_logits(model(input_ids, positions))
    name = f"decode_logits_{next(_instances)}"
    return types.FunctionType(logits.__code__.replace(co_name=name), logits.__globals__, name, None,
                              logits.__closure__)


class CompiledDecode:
    def __init__(self, model: torch.nn.Module):
        self.step = torch.compile(_decode_logits(model), dynamic=True)
        self.warm = False   # past warm-up: both graphs exist, and only the guards telling them apart run
        self.runs = 0   # for tests and benchmarks: how many steps ran compiled

    def can_run(self, metadata: AttentionMetadata, num_tokens: int, num_samples: int) -> bool:
        """A step of decodes only, each sampled, no adapter."""
        return num_tokens > 0 and metadata.num_decode == num_tokens == num_samples and metadata.adapter_mask is None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The logits [n, vocab] of a decode-only step of n sequences."""
        tables = metadata.decode_block_tables
        if tables.shape[1] < MIN_TABLE_WIDTH:   # past a sequence's length a column is never read
            metadata.decode_block_tables = F.pad(tables, (0, MIN_TABLE_WIDTH - tables.shape[1]))
        set_context(metadata)
        try:
            # As a patch of inductor's config, not torch.compile(options=...): its weight-only int8 / int4 GEMM
            # templates are chosen only under the global settings (1.3x faster int8 steps than with options=).
            # Past the warm-up only the guards telling batch 1 from more run (dynamo's full check reads every
            # parameter and cache tensor: about 1 ms a step, 10-15 %). Safe because nothing else a guard reads
            # changes between steps here: the weights and the KV cache are this instance's (a new cache makes a new
            # instance), can_run admits only decode-only steps, and the metadata's types and dtypes are fixed;
            # tests check that with every guard evaluated no step compiles after the warm-up.
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.compiler.set_stance(
                    "default", skip_guard_eval_unsafe=self.warm):
                logits = self.step(input_ids, positions)
        finally:
            set_context(None)
        self.runs += 1
        return logits

    @torch.inference_mode()
    def warm_up(self, device: torch.device) -> None:
        """Compile both graphs now: decodes at position 0 over block 0 (no sequence holds a block yet, and a
        sequence's prefill writes its own keys before anything reads them)."""
        for batch in WARMUP_BATCHES:
            def zeros():   # one tensor each: the graph would otherwise assume they are one
                return torch.zeros(batch, dtype=torch.long, device=device)
            metadata = AttentionMetadata(slot_mapping=zeros(), num_decode=batch,
                                         decode_block_tables=torch.zeros(batch, MIN_TABLE_WIDTH, dtype=torch.long,
                                                                         device=device),
                                         decode_context_lens=torch.ones(batch, dtype=torch.long, device=device))
            self.run(zeros(), zeros(), metadata)
        self.runs = 0
        self.warm = True


def compile_decode(runner) -> CompiledDecode | None:
    """The runner's compiled decode step, compiled now, or None where decode steps run eagerly."""
    reason = why_not_compiled(runner)
    if reason is not None:
        if runner.config.compile:
            log.warning("compile: decode steps run eagerly: %s", reason)
        return None
    compiled = CompiledDecode(runner.model)
    compiled.warm_up(runner.device)
    return compiled

"""Builds the model on its device, owns the KV cache, and runs one step: a StepBatch in, tokens out."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kubellm.runtime.executor import parallel
from kubellm.runtime.config import EngineConfig
from kubellm.kernels import key_rotation, linear_cpu
from kubellm.kernels.dispatch import prefill_attention_mask
from kubellm.runtime.executor.context import AttentionMetadata, PrefillChunk, set_context
from kubellm.runtime.executor.cpu_compile import check_device, compile_decode
from kubellm.runtime.executor.cuda_graphs import capture_decode_graphs
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.cpu_weights import pack_cpu_weights
from kubellm.runtime.executor.layers.quantization import building
from kubellm.runtime.executor.layers.long_context import with_long_context_options
from kubellm.runtime.executor.loader import load_weights, plan_for_checkpoint
from kubellm.runtime.executor.lora import load_adapters
from kubellm.runtime.executor.models import model_class
from kubellm.runtime.executor.random_weights import fill_random_weights
from kubellm.runtime.executor.sampler import (SampleOutput, SamplingBatch, prompt_logprob_rows, prompt_logprobs,
                                              sample)
from kubellm.runtime.executor.stages import plan_stages, whole_model
from kubellm.runtime.executor.step import SamplingParams, SeqChunk, StepBatch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no GPU is visible; use device='cpu' or 'auto'")
    return device


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        if device.type == "cpu" and config.dtype == "float16":
            raise ValueError("dtype: float16 is too slow and inexact on CPU; use float32 or bfloat16")
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    """One rank's model. Its KV cache is sized in two moves, so a group can agree on one size first:
    max_kv_blocks() (what this rank can hold), then allocate_kv_cache(n)."""

    def __init__(self, path: Path, hf_config, config: EngineConfig, session_len: int, show_progress: bool = True):
        self.config = config
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        self.block_size = config.block_size
        self.parallel = parallel.state()
        hf_config = with_long_context_options(hf_config, config)  # rope_scaling_factor, use_logn_attn
        self.hidden_size, self.vocab_size = hf_config.hidden_size, hf_config.vocab_size
        if self.parallel.pp > 1:
            self.stage = plan_stages(path, hf_config, config, self.dtype)[self.parallel.pp_rank]
        else:
            self.stage = whole_model(hf_config.num_hidden_layers)
        self.micro_batches = config.pipeline_micro_batches or self.parallel.pp
        check_device(config, self.device)
        self.quantization = plan_for_checkpoint(path, hf_config, config)   # None: float weights
        with linear_cpu.packing(not config.compile):   # a compiled step packs its weights itself
            self._build_model(path, hf_config, config, session_len, show_progress)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.sliding_windows = {a.sliding_window for a in self.attention_layers}
        self.session_len = session_len
        self.num_blocks = 0          # no KV cache until allocate_kv_cache
        self.host_kv_cache = None    # eviction='copy': per block part, [layer, host block, ...] (pinned on a GPU)
        self.decode_graphs = None    # None: every step eager
        self.compiled_decode = None  # CPU, EngineConfig.compile: decode steps through torch.compile

    def _build_model(self, path: Path, hf_config, config: EngineConfig, session_len: int, show_progress: bool):
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device, building(self.quantization):
                self.model = model_class(hf_config, config.model_impl)(hf_config, session_len, self.stage)
        finally:
            torch.set_default_dtype(previous_dtype)
        if config.load_format == "random":
            fill_random_weights(self.model, config.seed)
        else:
            load_weights(self.model, path, show_progress)
        self.num_adapters = len(config.adapters)
        if config.adapters:
            load_adapters(self.model, None if config.load_format == "random" else path, hf_config, config.adapters,
                          config.max_lora_rank, self.device, self.dtype)
        self.model.eval()
        pack_cpu_weights(self.model, self.device)   # last: loading and adapters write the plain tensors

    # -- the KV cache ---------------------------------------------------------------------------------
    @property
    def kv_quantized(self) -> bool:
        return self.config.kv_cache_dtype != "auto"

    def kv_layout(self, head_dim: int) -> tuple[torch.dtype, int, tuple[int, ...], int]:
        """(cache dtype, last dimension, the scales' trailing shape, bytes per token and head) of the KV cache:
        the model's dtype; int8 with a float32 scale (kernels/kv_int8.py); or int4, two codes a byte, with a
        float32 scale and zero (kernels/kv_int4.py)."""
        kind = self.config.kv_cache_dtype
        if kind == "int8":
            return torch.int8, head_dim, (), head_dim + 4
        if kind == "int4":
            if head_dim % 2:
                raise ValueError(f"kv_cache_dtype: int4 packs two values a byte, so it needs an even head size; "
                                 f"this model's is {head_dim}: use kv_cache_dtype='int8' or 'auto'")
            return torch.uint8, head_dim // 2, (2,), head_dim // 2 + 8
        return self.dtype, head_dim, (), head_dim * self.dtype.itemsize

    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over this rank's attention layers (keys and values; a quantized cache's scales)."""
        layer = self.attention_layers[0]
        per_head_token = self.kv_layout(layer.head_dim)[3]
        return 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * per_head_token

    def max_kv_blocks(self) -> int:
        """The KV blocks this rank can hold: num_kv_blocks if set, else what the memory budget leaves."""
        per_block = self.kv_block_bytes()
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        else:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * self.config.kv_cache_fraction
            else:
                budget = self.config.cpu_memory_gb * 2 ** 30 * self.config.kv_cache_fraction
            # More blocks than a full batch of full sessions can use is wasted memory.
            useful = self.config.max_batch_size * -(-self.session_len // self.block_size)
            num_blocks = min(int(budget // per_block), useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_fraction: leaves no room for a single KV block ({per_block} bytes); "
                             "raise kv_cache_fraction or cpu_memory_gb")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Give every attention layer a cache of num_blocks blocks, then capture the decode graphs
        (they replay the cache's addresses, so they follow it)."""
        layer = self.attention_layers[0]
        cache_dtype, last_dim, scale_dims, _ = self.kv_layout(layer.head_dim)
        shape = (num_blocks, self.block_size, layer.num_kv_heads, last_dim)
        self.decode_graphs = self.compiled_decode = None
        rotation = key_rotation.rotation(layer.head_dim, device=self.device) if self.kv_quantized else None
        for attn in self.attention_layers:
            attn.k_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            if self.kv_quantized:   # per token and KV head: a scale (int8), a scale and zero (int4)
                attn.k_scale = torch.zeros((*shape[:3], *scale_dims), dtype=torch.float32, device=self.device)
                attn.v_scale = torch.zeros((*shape[:3], *scale_dims), dtype=torch.float32, device=self.device)
            attn.key_rotation = rotation
        self.num_blocks = num_blocks
        self._allocate_host_kv_cache(shape[1:])
        self.decode_graphs = capture_decode_graphs(self, self.session_len)
        self.compiled_decode = compile_decode(self)   # (a new cache is new inputs: compiled again)

    def _cache_tensors(self, attn: PagedAttention) -> list[torch.Tensor]:
        """What one layer's KV blocks are made of: keys and values, and a quantized cache's scales of each."""
        return [attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale] if self.kv_quantized else [attn.k_cache,
                                                                                                   attn.v_cache]

    def _allocate_host_kv_cache(self, block_shape) -> None:
        """eviction='copy': num_cpu_blocks host blocks for this rank's layers (its shard, its stage): per part
        of a block (keys, values; a quantized cache's scales), [layer, host block, ...]."""
        if self.config.eviction != "copy":
            return
        pin = self.device.type == "cuda"
        self.host_kv_cache = [
            torch.zeros((len(self.attention_layers), self.config.num_cpu_blocks, *part.shape[1:]), dtype=part.dtype,
                        pin_memory=pin)
            for part in self._cache_tensors(self.attention_layers[0])]

    @torch.inference_mode()
    def swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device block, host block) pairs out, then (host block, device block) pairs in, over every
        attention layer of this rank and every part of its blocks: a gather, a transfer and a scatter per
        layer, part and direction (device memory for one layer's blocks at a time). The device caches are
        written in place: CUDA graphs replay their addresses."""
        if self.host_kv_cache is None:
            raise RuntimeError("a step swaps KV blocks but this runner has no host cache (eviction is not 'copy')")
        dev = self.device
        cuda = dev.type == "cuda"
        layers = [self._cache_tensors(attn) for attn in self.attention_layers]
        if swap_out:
            src = torch.tensor([d for d, _ in swap_out], device=dev)
            dst = torch.tensor([h for _, h in swap_out])
            for part, host in enumerate(self.host_kv_cache):
                if cuda:   # into a pinned staging buffer, asynchronously; one wait; then the scatter on the host
                    staging = torch.empty((host.shape[0], len(dst), *host.shape[2:]), dtype=host.dtype, pin_memory=True)
                    for i, tensors in enumerate(layers):
                        staging[i].copy_(tensors[part].index_select(0, src), non_blocking=True)
                    torch.cuda.current_stream(dev).synchronize()
                    host.index_copy_(1, dst, staging)
                else:   # index_copy_ rather than indexed assignment: a plain copy per block, several times faster
                    for i, tensors in enumerate(layers):
                        host[i].index_copy_(0, dst, tensors[part].index_select(0, src))
        if swap_in:
            src = torch.tensor([h for h, _ in swap_in])
            dst = torch.tensor([d for _, d in swap_in], device=dev)
            for part, host in enumerate(self.host_kv_cache):
                for i, tensors in enumerate(layers):
                    blocks = host[i].index_select(0, src)
                    if cuda:   # pinned, so the copy is asynchronous; stream-ordered before the step's kernels
                        blocks = blocks.pin_memory().to(dev, non_blocking=True)
                    tensors[part].index_copy_(0, dst, blocks)

    # -- one step ---------------------------------------------------------------------------------
    def _prepare(self, chunks: list[SeqChunk]):
        """The tensors of one forward pass; attention metadata is built here once, for every layer."""
        bs, dev = self.block_size, self.device
        tokens, positions, slots, sample_rows, adapters = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        row = 0
        for chunk in chunks:
            start, ids, table = chunk.start, chunk.token_ids, chunk.block_table
            n = len(ids)
            tokens.extend(ids)
            adapters.extend([chunk.adapter] * n)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1 and start > 0 and not prefills:  # a decode (they come first)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                context_len = start + n
                blocks = torch.tensor(table[:-(-context_len // bs)], device=dev)
                masks = {w: prefill_attention_mask(n, context_len, w, dev) for w in self.sliding_windows}
                prefills.append(PrefillChunk(row, n, context_len, blocks, masks))
            row += n
            if chunk.samples:
                sample_rows.append(row - 1)
        metadata = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), prefills=prefills)
        if self.num_adapters and any(a >= 0 for a in adapters):   # one-hot over adapters; -1 (base) rows all zero
            metadata.adapter_mask = torch.nn.functional.one_hot(
                torch.tensor(adapters, device=dev) + 1, self.num_adapters + 1)[:, 1:].to(self.dtype)
        if decode_tables:
            width = max(map(len, decode_tables))
            metadata.num_decode = len(decode_tables)
            metadata.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=dev)
            metadata.decode_context_lens = torch.tensor(decode_lens, device=dev)
        return (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), metadata,
                torch.tensor(sample_rows, dtype=torch.long, device=dev))

    def _run_model(self, chunks: list[SeqChunk], intermediate=None):
        return self._run_prepared(*self._prepare(chunks), intermediate)

    def _run_prepared(self, input_ids, positions, metadata, sample_rows, intermediate=None):
        if self.decode_graphs is not None and self.decode_graphs.can_run(metadata, len(input_ids)):
            return self.decode_graphs.run(input_ids, positions, metadata), sample_rows
        set_context(metadata)
        try:
            return self.model(input_ids, positions, intermediate), sample_rows
        finally:
            set_context(None)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor | None:
        """This rank's part of one step; every rank of the group runs it. Returns the sampled rows'
        logits on rank 0 (and on other last-stage ranks), None where this rank has none."""
        if batch.blocks_to_swap_out or batch.blocks_to_swap_in:   # eviction='copy': before anything reads the cache
            self.swap_blocks(batch.blocks_to_swap_out, batch.blocks_to_swap_in)
        wants_logits = batch.num_samples > 0
        if self.parallel.pp == 1:
            prepared = self._prepare(batch.chunks)
            if self.compiled_decode is not None and self.compiled_decode.can_run(prepared[2], len(prepared[0]),
                                                                                 len(prepared[3])):
                return self.compiled_decode.run(*prepared[:3])   # every row a decode, every one sampled
            hidden, sample_rows = self._run_prepared(*prepared)
            # prompt_logprobs' rows after the sampled ones; every tensor rank computes the same rows
            rows = prompt_logprob_rows(batch.chunks, sample_rows)
            return self.model.compute_logits(hidden[rows]) if wants_logits or len(rows) else None
        return self._forward_pipelined(batch, wants_logits)

    def _forward_pipelined(self, batch: StepBatch, wants_logits: bool) -> torch.Tensor | None:
        """GPipe-style: cut the step into micro-batches and hand each to the next stage as soon as it
        is done, so stage s works on micro-batch i while stage s+1 works on i-1. The last stage's
        tensor rank 0 sends each micro-batch's logits back to rank 0, which samples."""
        stage, par = self.stage, self.parallel
        last_stage_leader = (par.pp - 1) * par.tp
        pending = []  # (work, tensor): a sent tensor must stay alive until its send completes
        chunks = batch.micro_batches(self.micro_batches)
        for chunk in chunks:
            intermediate = None
            if not stage.is_first:
                rows = sum(item.num_tokens for item in chunk)
                intermediate = torch.empty(self.model.intermediate_shape(rows), dtype=self.dtype, device=self.device)
                dist.recv(intermediate, src=par.peer(stage.index - 1))
            out, sample_rows = self._run_model(chunk, intermediate)
            if not stage.is_last:
                pending.append((dist.isend(out, dst=par.peer(stage.index + 1)), out))
            elif wants_logits and len(sample_rows):
                logits = self.model.compute_logits(out[sample_rows])
                if par.tp_rank == 0:
                    pending.append((dist.isend(logits, dst=0), logits))
        for work, _ in pending:
            work.wait()
        if par.rank != 0 or not wants_logits:
            return None
        parts = []
        for rows in (sum(1 for item in chunk if item.samples) for chunk in chunks):
            if rows:
                parts.append(torch.empty((rows, self.vocab_size), dtype=self.dtype, device=self.device))
                dist.recv(parts[-1], src=last_stage_leader)
        return torch.cat(parts)

    @torch.inference_mode()
    def run(self, batch: StepBatch, sampling: list[SamplingParams]) -> SampleOutput | None:
        """Rank 0's step: forward, then sample the rows that yield a token (one SamplingParams each)."""
        sampling_batch = SamplingBatch.from_params(sampling, self.device) if sampling else None
        logits = self.forward(batch)
        out = None if sampling_batch is None else sample(logits[:len(sampling)], sampling_batch)
        if any(c.prompt_logprobs is not None for c in batch.chunks):   # the rows after the sampled ones
            out = out or SampleOutput([])
            out.prompt_logprobs = prompt_logprobs(logits[len(sampling):], batch.chunks)
        return out


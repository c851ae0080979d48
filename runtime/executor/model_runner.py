"""Builds the model on its device, owns the KV cache, and runs one step: tensors in, tokens out."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kubellm.runtime.executor import parallel
from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.context import AttentionMetadata, PrefillChunk, set_context
from kubellm.runtime.executor.cuda_graphs import capture_decode_graphs
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.loader import load_weights
from kubellm.runtime.executor.models import model_class
from kubellm.runtime.executor.random_weights import fill_random_weights
from kubellm.runtime.executor.sampler import SampleOutput, SamplingBatch, sample
from kubellm.runtime.engine.scheduler import ScheduledSeq
from kubellm.runtime.executor.stages import plan_stages, whole_model

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
    def __init__(self, path: Path, hf_config, config: EngineConfig, session_len: int, show_progress: bool = True):
        self.config = config
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        self.block_size = config.block_size
        self.parallel = parallel.state()
        self.hidden_size, self.vocab_size = hf_config.hidden_size, hf_config.vocab_size
        if self.parallel.pp > 1:
            self.stage = plan_stages(path, hf_config, config, self.dtype)[self.parallel.pp_rank]
        else:
            self.stage = whole_model(hf_config.num_hidden_layers)
        self.micro_batches = config.pipeline_micro_batches or self.parallel.pp
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device:
                self.model = model_class(hf_config)(hf_config, session_len, self.stage)
        finally:
            torch.set_default_dtype(previous_dtype)
        if config.load_format == "random":
            fill_random_weights(self.model, config.seed)
        else:
            load_weights(self.model, path, show_progress)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.step_hook = None  # several ranks: rank 0 sends each step to the others first
        self.num_blocks = self._allocate_kv_cache(hf_config, session_len)
        self.decode_graphs = capture_decode_graphs(self, session_len)  # None: every step eager

    def _allocate_kv_cache(self, hf_config, session_len: int) -> int:
        layer = self.attention_layers[0]
        per_block = 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
        per_block *= torch.tensor([], dtype=self.dtype).element_size()
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        else:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * self.config.kv_cache_fraction
            else:
                budget = self.config.cpu_memory_gb * 2 ** 30 * self.config.kv_cache_fraction
            # More blocks than a full batch of full sessions can use is wasted memory.
            useful = self.config.max_batch_size * -(-session_len // self.block_size)
            num_blocks = min(int(budget // per_block), useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_fraction: leaves no room for a single KV block ({per_block} bytes); "
                             "raise kv_cache_fraction or cpu_memory_gb")
        return self._make_kv_cache(num_blocks)

    def _make_kv_cache(self, num_blocks: int) -> int:
        layer = self.attention_layers[0]
        shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        for attn in self.attention_layers:
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return num_blocks

    def _prepare(self, scheduled: list[ScheduledSeq]):
        bs = self.block_size
        tokens, positions, slots, sample_rows = [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        row = 0
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1 and start > 0 and not prefills:
                decode_tables.append(seq.block_table)
                decode_lens.append(start + 1)
            else:
                prefills.append(PrefillChunk(row, n, start + n, torch.tensor(seq.block_table, device=self.device)))
            row += n
            if item.samples:
                sample_rows.append(row - 1)
        dev = self.device
        metadata = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), prefills=prefills)
        if decode_tables:
            width = max(map(len, decode_tables))
            metadata.num_decode = len(decode_tables)
            metadata.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=dev)
            metadata.decode_context_lens = torch.tensor(decode_lens, device=dev)
        return (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), metadata,
                torch.tensor(sample_rows, dtype=torch.long, device=dev))

    def _run_model(self, scheduled, intermediate=None):
        input_ids, positions, metadata, sample_rows = self._prepare(scheduled)
        if self.decode_graphs is not None and self.decode_graphs.can_run(metadata, len(input_ids)):
            return self.decode_graphs.run(input_ids, positions, metadata), sample_rows
        set_context(metadata)
        try:
            return self.model(input_ids, positions, intermediate), sample_rows
        finally:
            set_context(None)

    @torch.inference_mode()
    def forward(self, scheduled: list[ScheduledSeq], wants_logits: bool) -> torch.Tensor | None:
        """This rank's part of one step; every rank of the group runs it. Returns the sampled rows'
        logits on rank 0 (and on other last-stage ranks), None where this rank has none."""
        if self.parallel.pp == 1:
            hidden, sample_rows = self._run_model(scheduled)
            return self.model.compute_logits(hidden[sample_rows]) if wants_logits else None
        return self._forward_pipelined(scheduled, wants_logits)

    def _forward_pipelined(self, scheduled, wants_logits: bool) -> torch.Tensor | None:
        """GPipe-style: cut the step into micro-batches and hand each to the next stage as soon as it
        is done, so stage s works on micro-batch i while stage s+1 works on i-1. The last stage's
        tensor rank 0 sends each micro-batch's logits back to rank 0, which samples."""
        stage, par = self.stage, self.parallel
        last_stage_leader = (par.pp - 1) * par.tp
        pending = []  # (work, tensor): a sent tensor must stay alive until its send completes
        chunks = split_micro_batches(scheduled, self.micro_batches)
        for chunk in chunks:
            intermediate = None
            if not stage.is_first:
                rows = sum(item.num_tokens for item in chunk)
                intermediate = torch.empty((2, rows, self.hidden_size), dtype=self.dtype, device=self.device)
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
    def run(self, scheduled: list[ScheduledSeq], sampling: SamplingBatch | None) -> SampleOutput | None:
        if self.step_hook is not None:
            self.step_hook(scheduled, sampling is not None)
        logits = self.forward(scheduled, sampling is not None)
        return None if sampling is None else sample(logits, sampling)


def split_micro_batches(scheduled: list, count: int) -> list[list]:
    """Consecutive runs of sequences with about equal token counts (order kept: decodes stay first)."""
    count = max(1, min(count, len(scheduled)))
    total = sum(item.num_tokens for item in scheduled)
    chunks, current, done = [], [], 0
    for i, item in enumerate(scheduled):
        current.append(item)
        done += item.num_tokens
        left_items, left_chunks = len(scheduled) - i - 1, count - len(chunks) - 1
        if left_chunks and (done >= total * (len(chunks) + 1) / count or left_items == left_chunks):
            chunks.append(current)
            current = []
    chunks.append(current)
    return chunks

"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket; prefill stays eager.

A batch-1 decode step of an 8B model launches several hundred small kernels; on a GPU the CPU
time to launch them is comparable to the step itself. A CUDA graph records the launches once
and replays them with one call. Graphs replay fixed addresses and shapes, so:

- each bucket (1, 2, 4, 8, 16, 32, ... up to max_batch_size) is captured once, with the model
  reading its inputs from static buffers; a step of n decodes copies its inputs into the
  buffers, pads to the smallest bucket >= n and replays that bucket's graph;
- padding rows get slot -1 (the Triton KV-write kernel skips it) and context length 1 over
  block 0, a harmless read; their outputs are dropped;
- block tables are as wide as the longest session (columns past a sequence's length are never
  read: attention stops at context_len), so the split-KV count, decided from shapes, is fixed.

Only plain decode steps replay (every token a decode, batch <= the largest bucket, no LoRA
adapter: the graphs hold the base model); steps with prefill chunks, pipeline-parallel stages and CPU runs stay eager. Graphs need the Triton
kernels (the reference KV write cannot skip padding slots) and, for now, tensor_parallel == 1:
capturing NCCL all-reduces is possible but not yet tried here.
"""

from __future__ import annotations

import torch

from kubellm.kernels import dispatch
from kubellm.runtime.executor.context import AttentionMetadata, set_context


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return sorted(set(buckets + [max_batch_size]))


def why_eager(runner) -> str | None:
    """Why decode graphs cannot be used for this runner, or None when they can."""
    if runner.config.enforce_eager:
        return "enforce_eager is set"
    if getattr(runner.model, "eager_reason", None):  # the Transformers backend
        return runner.model.eager_reason
    if runner.device.type != "cuda":
        return "not on a CUDA device"
    if runner.parallel.pp > 1 or runner.parallel.tp > 1:
        return "tensor/pipeline parallel steps run eagerly"
    if not dispatch.use_triton(torch.empty(0, device=runner.device)):
        return "KUBELLM_KERNELS selects the reference kernels"
    return None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 device: torch.device, cache_owner):
        self.model = model
        # The graphs read and write the KV cache at the addresses it had during capture; a cache
        # allocated again later (multi-rank agreement on its size) makes them stale.
        self.cache_owner = cache_owner
        self.captured_cache = cache_owner.k_cache.data_ptr()
        self.buckets = batch_buckets(max_batch_size)
        self.max_blocks_per_seq = max_blocks_per_seq
        largest = self.buckets[-1]
        # Static inputs: every graph reads the first `bucket` rows of these.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.long, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0  # for tests: how many steps were served by a graph
        self._capture_all(device)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bucket], num_decode=bucket,
                                 decode_block_tables=self.block_tables[:bucket],
                                 decode_context_lens=self.context_lens[:bucket])

    def _forward(self, bucket: int) -> torch.Tensor:
        set_context(self._metadata(bucket))
        try:
            return self.model(self.input_ids[:bucket], self.positions[:bucket])
        finally:
            set_context(None)

    @torch.inference_mode()
    def _capture_all(self, device: torch.device) -> None:
        with torch.cuda.device(device):  # the pool and the capture stream belong to the model's GPU
            pool = torch.cuda.graph_pool_handle()
            # Largest first: the smaller graphs then fit in the memory the first one reserved.
            for bucket in reversed(self.buckets):
                # Eager warm-up with the same shapes: compiles the Triton kernels and sets up cuBLAS
                # outside the capture (neither may happen while capturing).
                self._forward(bucket)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = self._forward(bucket)
                self.graphs[bucket] = graph
            torch.cuda.synchronize(device)

    def can_run(self, metadata: AttentionMetadata, num_tokens: int) -> bool:
        return (not metadata.prefills and metadata.adapter_mask is None and metadata.num_decode == num_tokens and 0 < num_tokens <= self.buckets[-1]
                and metadata.decode_block_tables.shape[1] <= self.max_blocks_per_seq
                and self.cache_owner.k_cache.data_ptr() == self.captured_cache)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The final hidden states [n, hidden] of a decode-only step of n sequences."""
        n = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        width = metadata.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.block_tables[:n, :width].copy_(metadata.decode_block_tables)
        self.context_lens[:n].copy_(metadata.decode_context_lens)
        # Padding rows: write nothing, attend to one key of block 0.
        self.slot_mapping[n:bucket].fill_(-1)
        self.block_tables[n:bucket, 0].zero_()
        self.context_lens[n:bucket].fill_(1)
        self.graphs[bucket].replay()
        self.replays += 1
        return self.outputs[bucket][:n]


def capture_decode_graphs(runner, session_len: int) -> DecodeGraphs | None:
    """The runner's decode graphs, or None where decode steps must run eagerly."""
    if why_eager(runner) is not None:
        return None
    max_blocks = -(-session_len // runner.block_size)
    return DecodeGraphs(runner.model, runner.config.max_batch_size, max_blocks, runner.device,
                        cache_owner=runner.attention_layers[0])

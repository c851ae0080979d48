"""Per-step attention (and LoRA adapter) metadata, set by the model runner before a forward pass.

Tokens of a step are laid out decodes first (one per sequence), then prefill chunks. The runner
builds all of it once per forward pass; every attention layer reads the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    start: int          # first row of this chunk among the step's tokens
    length: int         # query tokens in the chunk
    context_len: int    # tokens in the cache after the chunk (cached prefix + chunk)
    block_table: torch.Tensor   # the blocks holding its context_len tokens
    # Attention mask [length, context_len] per sliding window (None: plain causal, or the kernel
    # masks by itself), for the kernels that take one (the reference).
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                   # [T] flat cache slot of each token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [num_decode]
    prefills: list[PrefillChunk] = field(default_factory=list)
    # [T, adapters] one-hot: each token's LoRA adapter (executor/lora.py); None when no token has one.
    adapter_mask: torch.Tensor | None = None


_current: AttentionMetadata | None = None


def set_context(metadata: AttentionMetadata | None) -> None:
    global _current
    _current = metadata


def current_adapter_mask() -> torch.Tensor | None:
    """The step's per-token adapter mask; None outside a step or when no token uses an adapter."""
    return None if _current is None else _current.adapter_mask


def get_context() -> AttentionMetadata:
    assert _current is not None, "attention called outside a model-runner step"
    return _current

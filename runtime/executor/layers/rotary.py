"""Rotary embedding; scaling variants come from the HF config.

Static variants (default, linear, llama3, yarn, longrope) use a cos/sin table precomputed for
every position. Dynamic NTK ("dynamic", LMDeploy's rope_scaling_factor) cannot: as in
transformers, a forward pass whose sequence has grown to S > max_position_embeddings tokens
computes its new queries and keys with frequencies recomputed for S, while the keys already in
the (paged) KV cache keep the rotation they were stored with. Here S is per sequence: a decode's
S is its position + 1, a prefill chunk's is the end of the chunk (one forward pass of the whole
prompt in transformers when the prompt is one chunk). With `use_logn_attn` the queries are then
scaled by Qwen's log-n factor (layers/long_context.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels.dispatch import apply_rotary
from kubellm.runtime.executor.context import get_context
from kubellm.runtime.executor.layers.long_context import logn_scale, logn_trained_length, rope_parameters, rope_type_of


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) exactly as Hugging Face computes them for this config (for
    "dynamic": the frequencies of sequences within max_position_embeddings)."""
    params = rope_parameters(hf_config)
    rope_type = rope_type_of(params)
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        return DynamicNTK(hf_config, head_dim).inv_freq_within(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: default, "
                         + ", ".join(sorted(ROPE_INIT_FUNCTIONS)))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class DynamicNTK:
    """transformers' `_compute_dynamic_ntk_parameters`: for a sequence of S > L tokens
    (L = max_position_embeddings) the base becomes base * (factor * S / L - (factor - 1)) ** (d / (d - 2)).
    The arithmetic is transformers' own, in float32 where it uses tensors; computed for many
    sequences at once, an element may differ from transformers' one-sequence result by one unit in
    the last place (vectorised pow)."""

    def __init__(self, hf_config, dim: int):
        params = rope_parameters(hf_config)
        self.base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        self.factor = float(params["factor"])
        self.trained = int(hf_config.max_position_embeddings)
        self.dim = dim

    def _exponents(self, device=None) -> torch.Tensor:
        return torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).to(torch.float) / self.dim

    def inv_freq_within(self) -> torch.Tensor:
        """[d/2] for S <= L (transformers' initial frequencies: Python floats, seq_len = L)."""
        f, d = self.factor, self.dim
        base = self.base * ((f * self.trained / self.trained) - (f - 1)) ** (d / (d - 2))
        return 1.0 / (base ** self._exponents())

    def inv_freq_at(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[T, d/2] for sequences of `seq_lens` [T] tokens past L (a forward pass's recomputation)."""
        f, d = self.factor, self.dim
        seq = torch.maximum(seq_lens, torch.full_like(seq_lens, self.trained)).to(torch.float)
        base = self.base * ((f * seq / self.trained) - (f - 1)) ** (d / (d - 2))
        return 1.0 / (base.unsqueeze(1) ** self._exponents(seq_lens.device).unsqueeze(0))


def sequence_lengths(positions: torch.Tensor) -> torch.Tensor:
    """[T] each token's sequence length in this forward pass: a decode's position + 1, a prefill
    chunk's end (the step's metadata says which rows are chunks). Only tensor ops for decodes, so a
    captured decode graph computes it too."""
    lengths = positions + 1
    for chunk in get_context().prefills:
        lengths[chunk.rows] = chunk.context_len
    return lengths


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, self.scaling = inverse_frequencies(hf_config, head_dim)
        inv_freq = inv_freq.to(torch.empty(0).device)  # the device the model is being built on
        self.logn_length = logn_trained_length(hf_config)
        self.dynamic = DynamicNTK(hf_config, head_dim) if rope_type_of(rope_parameters(hf_config)) == "dynamic" else None
        if self.dynamic is not None:
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            return
        freqs = torch.arange(max_positions, dtype=torch.float).unsqueeze(1) * inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * self.scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * self.scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, d] float32 cos and sin of each token's rotation."""
        if self.dynamic is None:
            return self.cos[positions], self.sin[positions]
        lengths = sequence_lengths(positions)
        inv_freq = torch.where((lengths > self.dynamic.trained).unsqueeze(1), self.dynamic.inv_freq_at(lengths),
                               self.inv_freq.float().unsqueeze(0))
        freqs = positions.to(torch.float).unsqueeze(1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    _step = None   # (positions, dtype, cos, sin) of the step being run, on CPU

    def _cos_sin_of_step(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer of a step rotates the same `positions` tensor (this module is shared by all layers): on
        CPU its rows are looked up once per step, not once per layer. Not on a GPU: a CUDA graph replays the
        lookups it captured, and its static positions buffer is refilled in place between replays."""
        if torch.compiler.is_compiling():   # a compiled step computes it once by itself (and keeps nothing)
            cos, sin = self.cos_sin(positions)
            return cos.to(dtype), sin.to(dtype)
        step = self._step
        if step is not None and step[0] is positions and step[1] == dtype:
            return step[2], step[3]
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(dtype), sin.to(dtype)
        if positions.device.type == "cpu":
            self._step = (positions, dtype, cos, sin)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self._cos_sin_of_step(positions, q.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        if self.logn_length is not None:  # Qwen scales the rotated queries; the cached keys stay as they are
            q = q * logn_scale(positions, self.logn_length).to(q.dtype)[:, None, None]
        return q, k

"""Llama family: Llama 1/2/3, Mistral (sliding window), Qwen2 (QKV bias) and Qwen3 (each head's q and k
RMS-normed before the rotary embedding).

Grouped-query attention, packed QKV and gate/up projections, optional tied embeddings; pre-norm
layers that fuse each residual add into the next RMSNorm. Mixtral reuses the layer with experts.
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import SiluAndMul
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.linear import (PACKED_QKV, MergedColumnParallelLinear, QKVParallelLinear,
                                                    RowParallelLinear, split_heads)
from kubellm.runtime.executor.layers.norm import RMSNorm
from kubellm.runtime.executor.layers.rotary import RotaryEmbedding
from kubellm.runtime.executor.models.base import CausalLM
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import PipelineStage


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config) -> int | None:
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        tp = tp_size()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_key_value_heads // tp
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=config.model_type != "qwen2" and getattr(config, "attention_bias", False))
        self.rotary = rotary  # one cos/sin table shared by all layers
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                                   sliding_window_of(config))
        if config.model_type == "qwen3":   # one RMSNorm over head_dim, shared by the heads (replicated)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv_proj(hidden), self.num_heads, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, mlp: nn.Module):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = mlp  # LlamaMLP, or Mixtral's experts
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLM):
    carries_residual = True
    packed_modules_mapping = {
        **PACKED_QKV,
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        if config.hidden_act != "silu":  # the MLPs (dense and experts) are SiLU-gated
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for {config.model_type}; "
                             "only 'silu' is")
        rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)  # one cos/sin table for all layers
        super().__init__(config, stage, lambda i: LlamaDecoderLayer(config, rotary, self.make_mlp(config)),
                         norm=lambda: RMSNorm(config.hidden_size, config.rms_norm_eps))

    def make_mlp(self, config) -> nn.Module:
        return LlamaMLP(config)


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
Qwen3ForCausalLM = LlamaForCausalLM

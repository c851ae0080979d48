"""Phi (phi-1, phi-1.5, phi-2): partial rotary, one LayerNorm feeding attention and MLP in
parallel, biases on every dense layer and on the LM head, optional per-head q/k LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import (PACKED_QKV, ColumnParallelLinear, QKVParallelLinear,
                                                    RowParallelLinear, split_heads)
from kubellm.runtime.executor.layers.positions import PartialRotaryEmbedding, partial_rotary_factor
from kubellm.runtime.executor.models.base import CausalLM
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import PipelineStage


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class PhiAttention(nn.Module):
    def __init__(self, config, rotary: PartialRotaryEmbedding):
        super().__init__()
        tp = tp_size()
        self.head_dim = head_dim_of(config)
        heads, kv_heads = config.num_attention_heads, kv_heads_of(config)
        self.num_heads, self.num_kv_heads = heads // tp, kv_heads // tp
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=True)
        self.dense = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=True)
        self.qk_layernorm = bool(getattr(config, "qk_layernorm", False))
        if self.qk_layernorm:
            self.q_layernorm = LayerNorm(self.head_dim, config.layer_norm_eps)
            self.k_layernorm = LayerNorm(self.head_dim, config.layer_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv_proj(hidden), self.num_heads, self.num_kv_heads, self.head_dim)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self.rotary(positions, q, k)
        return self.dense(self.attn(q, k, v).flatten(1))


class PhiMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = Activation(config.hidden_act)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config, rotary: PartialRotaryEmbedding):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = PhiAttention(config, rotary)
        self.mlp = PhiMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(hidden)
        return self.self_attn(positions, x) + self.mlp(x) + hidden


class PhiForCausalLM(CausalLM):
    norm_name = "final_layernorm"
    lm_head_bias = True
    packed_modules_mapping = PACKED_QKV

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        head_dim = head_dim_of(config)
        # one cos/sin table for all layers
        rotary = PartialRotaryEmbedding(config, head_dim, int(head_dim * partial_rotary_factor(config)),
                                        max_positions)
        super().__init__(config, stage, lambda i: PhiDecoderLayer(config, rotary),
                         norm=lambda: LayerNorm(config.hidden_size, config.layer_norm_eps))

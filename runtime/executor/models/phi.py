"""Phi (phi-1, phi-1.5, phi-2): partial rotary, one LayerNorm feeding attention and MLP in
parallel, biases on every dense layer and on the LM head, optional per-head q/k LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding, tie_lm_head
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import PACKED_QKV, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kubellm.runtime.executor.layers.positions import PartialRotaryEmbedding, partial_rotary_factor
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import MissingLayer, PipelineStage, make_layers, whole_model


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
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
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


class PhiModel(nn.Module):
    def __init__(self, config, max_positions: int, stage: PipelineStage):
        super().__init__()
        self.stage = stage
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if stage.is_first else MissingLayer())
        head_dim = head_dim_of(config)
        rotary = PartialRotaryEmbedding(config, head_dim, int(head_dim * partial_rotary_factor(config)),
                                        max_positions)
        self.layers = make_layers(config.num_hidden_layers, stage, lambda i: PhiDecoderLayer(config, rotary))
        self.final_layernorm = (LayerNorm(config.hidden_size, config.layer_norm_eps) if stage.is_last
                                else MissingLayer())

    def forward(self, input_ids, positions, intermediate=None):
        hidden = self.embed_tokens(input_ids) if self.stage.is_first else intermediate[0]
        for layer in self.layers[self.stage.start:self.stage.end]:
            hidden = layer(positions, hidden)
        if not self.stage.is_last:
            return torch.stack([hidden, hidden])
        return self.final_layernorm(hidden)


class PhiForCausalLM(nn.Module):
    packed_modules_mapping = PACKED_QKV

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        super().__init__()
        stage = stage or whole_model(config.num_hidden_layers)
        self.model = PhiModel(config, max_positions, stage)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, bias=True) if stage.is_last
                        else MissingLayer())
        # checkpoint name -> our parameter, for tensors stored once
        self.checkpoint_aliases = tie_lm_head(self, config, stage, "model.embed_tokens.weight")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

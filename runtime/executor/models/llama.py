"""Llama family: Llama 1/2/3, Mistral (sliding window) and Qwen2 (QKV bias).

Grouped-query attention, packed QKV and gate/up projections, optional tied embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import SiluAndMul
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding, tie_lm_head
from kubellm.runtime.executor.layers.linear import PACKED_QKV, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kubellm.runtime.executor.layers.norm import RMSNorm
from kubellm.runtime.executor.layers.rotary import RotaryEmbedding
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import MissingLayer, PipelineStage, make_layers, whole_model


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config) -> int | None:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
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

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v).flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = SiluAndMul()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for {config.model_type}; "
                             "only 'silu' is")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder stack, or one pipeline stage of it: the first stage embeds, the last norms."""

    def __init__(self, config, max_positions: int, stage: PipelineStage, decoder_layer=None):
        super().__init__()
        decoder_layer = decoder_layer or LlamaDecoderLayer  # Mixtral swaps the MLP for experts
        self.stage = stage
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if stage.is_first else MissingLayer())
        rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.layers = make_layers(config.num_hidden_layers, stage, lambda i: decoder_layer(config, rotary))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if stage.is_last else MissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: final hidden states. Other stages: [hidden; residual] stacked for the next."""
        if self.stage.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate.unbind(0)
        for layer in self.layers[self.stage.start:self.stage.end]:
            hidden, residual = layer(positions, hidden, residual)
        if not self.stage.is_last:
            return torch.stack([hidden, residual])
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our packed parameter, shard id)
    packed_modules_mapping = {
        **PACKED_QKV,
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    decoder_layer = None  # None: LlamaDecoderLayer

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        super().__init__()
        stage = stage or whole_model(config.num_hidden_layers)
        self.model = LlamaModel(config, max_positions, stage, self.decoder_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if stage.is_last else MissingLayer()
        # checkpoint name -> our parameter, for tensors stored once
        self.checkpoint_aliases = tie_lm_head(self, config, stage, "model.embed_tokens.weight")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM

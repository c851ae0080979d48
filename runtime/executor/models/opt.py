"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP; pre-norm (most sizes) or post-norm
(opt-350m, which also projects the 512-wide embeddings in and out of the 1024-wide decoder)."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import (PACKED_QKV, ColumnParallelLinear, QKVParallelLinear,
                                                    RowParallelLinear, split_heads)
from kubellm.runtime.executor.layers.positions import LearnedPositionEmbedding
from kubellm.runtime.executor.models.base import CausalLM
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import PipelineStage


def _layer_norm(config) -> LayerNorm:
    return LayerNorm(config.hidden_size, 1e-5, elementwise_affine=config.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads = config.num_attention_heads
        self.head_dim = config.hidden_size // heads
        self.num_heads = heads // tp_size()
        bias = config.enable_bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, heads, bias=bias)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=bias)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv_proj(hidden), self.num_heads, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q, k, v).flatten(1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.act = Activation(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.final_layer_norm = _layer_norm(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # positions: learned, added once at the embedding
        x = self.self_attn_layer_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.self_attn(x)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        x = self.final_layer_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.fc2(self.act(self.fc1(x)))
        return hidden if self.pre_norm else self.final_layer_norm(hidden)


class OPTForCausalLM(CausalLM):
    decoder_path, norm_name = "model.decoder", "final_layer_norm"
    packed_modules_mapping = PACKED_QKV

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        projected = config.word_embed_proj_dim != config.hidden_size
        first_extras = {"embed_positions": lambda: LearnedPositionEmbedding(config.max_position_embeddings,
                                                                            config.hidden_size, 2)}
        last_extras = {}
        if projected:
            first_extras["project_in"] = lambda: nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            last_extras["project_out"] = lambda: nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
        # Post-norm layers end normed: no final norm (nor where the checkpoint removed it).
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        super().__init__(config, stage, lambda i: OPTDecoderLayer(config),
                         norm=(lambda: _layer_norm(config)) if has_final_norm else None,
                         embedding_size=config.word_embed_proj_dim,
                         first_stage_extras=first_extras, last_stage_extras=last_extras)
        self.projected = projected

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = super().embed(input_ids, positions)
        if self.projected:
            hidden = self.decoder.project_in(hidden)
        return hidden + self.decoder.embed_positions(positions)

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        hidden = super().finish(hidden, residual)
        return self.decoder.project_out(hidden) if self.projected else hidden

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # facebook/opt-* checkpoints store the decoder without the "model." prefix.
        return "model." + name if name.startswith("decoder.") else name

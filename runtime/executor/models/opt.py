"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP; pre-norm (most sizes) or post-norm
(opt-350m, which also projects the 512-wide embeddings in and out of the 1024-wide decoder)."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding, tie_lm_head
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import PACKED_QKV, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kubellm.runtime.executor.layers.positions import LearnedPositionEmbedding
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import MissingLayer, PipelineStage, make_layers, whole_model


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
        q, k, v = self.qkv_proj(hidden).view(-1, 3 * self.num_heads, self.head_dim).chunk(3, dim=1)
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.self_attn(x)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        x = self.final_layer_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + self.fc2(self.act(self.fc1(x)))
        return hidden if self.pre_norm else self.final_layer_norm(hidden)


class OPTDecoder(nn.Module):
    def __init__(self, config, max_positions: int, stage: PipelineStage):
        super().__init__()
        self.stage = stage
        projected = config.word_embed_proj_dim != config.hidden_size
        if stage.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.word_embed_proj_dim)
            self.embed_positions = LearnedPositionEmbedding(config.max_position_embeddings, config.hidden_size, 2)
            if projected:
                self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
        else:
            self.embed_tokens = self.embed_positions = MissingLayer()
        if projected and not stage.is_first:
            self.project_in = MissingLayer()
        self.layers = make_layers(config.num_hidden_layers, stage, lambda i: OPTDecoderLayer(config))
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = None
        if has_final_norm:
            self.final_layer_norm = _layer_norm(config) if stage.is_last else MissingLayer()
        if projected:
            self.project_out = (nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
                                if stage.is_last else MissingLayer())
        self.projected = projected

    def forward(self, input_ids, positions, intermediate=None):
        if self.stage.is_first:
            hidden = self.embed_tokens(input_ids)
            if self.projected:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions)
        else:
            hidden = intermediate[0]
        for layer in self.layers[self.stage.start:self.stage.end]:
            hidden = layer(hidden)
        if not self.stage.is_last:
            return torch.stack([hidden, hidden])
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.projected:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config, max_positions: int, stage: PipelineStage):
        super().__init__()
        self.decoder = OPTDecoder(config, max_positions, stage)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = PACKED_QKV

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        super().__init__()
        stage = stage or whole_model(config.num_hidden_layers)
        self.model = OPTModel(config, max_positions, stage)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.word_embed_proj_dim) if stage.is_last
                        else MissingLayer())
        # checkpoint name -> our parameter, for tensors stored once
        self.checkpoint_aliases = tie_lm_head(self, config, stage, "model.decoder.embed_tokens.weight")

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # facebook/opt-* checkpoints store the decoder without the "model." prefix.
        return "model." + name if name.startswith("decoder.") else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

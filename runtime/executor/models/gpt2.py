"""GPT-2: learned positions, pre-norm LayerNorm, GELU MLP, fused c_attn; weights stored as
Conv1D ([in, out], the transpose of a Linear), transposed here slice by slice while loading."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                                    split_heads)
from kubellm.runtime.executor.layers.positions import LearnedPositionEmbedding
from kubellm.runtime.executor.models.base import CausalLM
from kubellm.runtime.executor.parallel import tp_size
from kubellm.runtime.executor.stages import PipelineStage


class Transposed:
    """A Conv1D weight [in, out] read as the Linear weight [out, in]; slices stay lazy."""

    def __init__(self, loaded):
        self.loaded = loaded

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key, slice(None))
        rows, cols = key
        return self.loaded[cols, rows].t()


class RowOffset:
    """Rows [offset, offset + size) of a tensor (or of a Transposed one) as a tensor of their own."""

    def __init__(self, loaded, offset: int, size: int):
        self.loaded, self.offset, self.size = loaded, offset, size

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None
        start = self.offset + (key.start or 0)
        stop = self.offset + (self.size if key.stop is None else key.stop)
        return self.loaded[start:stop]


def conv1d_loader(param: nn.Parameter):
    """Wrap a weight's `weight_loader` so that its Conv1D tensor is read transposed (also where the weight is
    a quantization plan's placeholder: int8 made on load)."""
    inner = param.weight_loader

    def load(p, loaded, shard_id=None):
        inner(p, Transposed(loaded), *(() if shard_id is None else (shard_id,)))

    param.weight_loader = load


class FusedQKV(QKVParallelLinear):
    """c_attn: q, k and v in one checkpoint tensor; each rank takes its heads' rows of each."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int):
        super().__init__(hidden_size, head_dim, num_heads, num_heads, bias=True)
        self.hidden_size = hidden_size
        for param, conv1d in ((self.weight, True), (self.bias, False)):
            param.weight_loader = self.fused_loader(param.weight_loader, conv1d)

    def fused_loader(self, inner, conv1d: bool):
        """The parameter's own loader (float, or a quantization placeholder's) once per q / k / v part."""
        def load(param: nn.Parameter, loaded, shard_id=None):
            if conv1d:
                loaded = Transposed(loaded)
            for i, part in enumerate("qkv"):
                inner(param, RowOffset(loaded, i * self.hidden_size, self.hidden_size), part)
        return load


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        heads = config.num_attention_heads
        self.head_dim = config.hidden_size // heads
        self.num_heads = heads // tp_size()
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_index + 1
        self.c_attn = FusedQKV(config.hidden_size, self.head_dim, heads)
        self.c_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        conv1d_loader(self.c_proj.weight)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.c_attn(hidden), self.num_heads, self.num_heads, self.head_dim)
        return self.c_proj(self.attn(q, k, v).flatten(1))


class GPT2MLP(nn.Module):
    def __init__(self, config, inner: int):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        for param in (self.c_fc.weight, self.c_proj.weight):
            conv1d_loader(param)
        self.act = Activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def inner_size(config) -> int:
    return config.n_inner if config.n_inner is not None else 4 * config.hidden_size


class GPT2Block(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_index)
        self.ln_2 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, inner_size(config))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # positions: learned, added once at the embedding
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2LMHeadModel(CausalLM):
    decoder_path, embedding_name, layers_name, norm_name = "transformer", "wte", "h", "ln_f"

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder part; "
                             "only the decoder-only GPT-2 is supported")
        super().__init__(config, stage, lambda i: GPT2Block(config, i),
                         norm=lambda: LayerNorm(config.hidden_size, config.layer_norm_epsilon),
                         first_stage_extras={"wpe": lambda: LearnedPositionEmbedding(config.max_position_embeddings,
                                                                                     config.hidden_size)})

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids, positions) + self.decoder.wpe(positions)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        # openai-community/gpt2 stores "h.0...", "wte.weight" (no "transformer." prefix) and the
        # attention's causal-mask buffers ("attn.bias", "attn.masked_bias"), which are not weights.
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name

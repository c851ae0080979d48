"""Falcon: rotary (ALiBi is not supported), fused query_key_value in three layouts, LayerNorm,
GELU MLP, attention and MLP in parallel or in sequence.

Layouts of query_key_value (rows of the checkpoint tensor, head_dim rows per head):
- new decoder architecture (40B/180B): num_kv_heads groups of [q_0 .. q_{g-1}, k, v];
- old, multi_query (7B): [all q heads, one k, one v];
- old, not multi_query: per head [q_h, k_h, v_h].

Tensor parallel: each rank takes its share of query heads and of KV heads; where the size
exceeds the KV heads (multi-query: one), each rank keeps a copy of the KV head its query heads use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.executor.layers.activation import Activation
from kubellm.runtime.executor.layers.attention import PagedAttention
from kubellm.runtime.executor.layers.norm import LayerNorm
from kubellm.runtime.executor.layers.linear import ColumnParallelLinear, RowParallelLinear, split_heads
from kubellm.runtime.executor.layers.quantization import active_plan
from kubellm.runtime.executor.layers.quantization.int8 import FloatFormat
from kubellm.runtime.executor.layers.quantization.packed import QuantizedWeight
from kubellm.runtime.executor.layers.rotary import RotaryEmbedding
from kubellm.runtime.executor.models.base import CausalLM
from kubellm.runtime.executor.parallel import tp_rank, tp_size
from kubellm.runtime.executor.stages import PipelineStage


def falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def check_falcon(config) -> None:
    if config.alibi:
        raise ValueError("Falcon with alibi=True (ALiBi position bias, e.g. falcon-rw) is not supported; "
                         "only rotary Falcon checkpoints (alibi=false) are")
    if config.new_decoder_architecture and not config.parallel_attn:
        raise ValueError("Falcon: new_decoder_architecture requires parallel_attn=true (as transformers does)")


def num_ln_in_parallel_attn(config) -> int | None:
    n = getattr(config, "num_ln_in_parallel_attn", None)
    return 2 if n is None and config.new_decoder_architecture else n


class FalconQKV(nn.Module):
    """This rank's q, k and v rows, packed [q | k | v], from the fused checkpoint tensor."""

    def __init__(self, config, head_dim: int):
        super().__init__()
        tp, rank = tp_size(), tp_rank()
        self.config, self.head_dim = config, head_dim
        heads, kv_heads = config.num_attention_heads, falcon_kv_heads(config)
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        if kv_heads >= tp:  # this rank's KV heads, and all their query heads
            self.kv_start = rank * self.num_kv_heads
        else:  # KV heads replicated: ranks [j * tp/kv, (j+1) * tp/kv) share KV head j
            self.kv_start = rank // (tp // kv_heads)
        self.q_start = rank * self.num_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        # Under a plan (int8 made on load: Falcon checkpoints are read float only), the gathered rows are
        # quantized as soon as they are in, and the float copy is dropped.
        self.int8_on_load = active_plan() is not None
        self.quantized: QuantizedWeight | None = None
        self.weight = nn.Parameter(torch.empty(out, config.hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if config.bias:
            self.bias = nn.Parameter(torch.empty(out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        cfg, d = self.config, self.head_dim
        heads, kv_heads = cfg.num_attention_heads, falcon_kv_heads(cfg)
        hq, hkv = self.num_heads, self.num_kv_heads

        def heads_of(start: int, count: int) -> torch.Tensor:  # rows of `count` heads from head `start`
            return loaded[start * d:(start + count) * d]

        if cfg.new_decoder_architecture:
            g = heads // kv_heads
            groups = heads_of(self.kv_start * (g + 2), hkv * (g + 2))
            groups = groups.reshape(hkv, g + 2, d, *groups.shape[1:])
            first_q = self.q_start - self.kv_start * g  # query heads of these groups this rank takes
            q = groups[:, :g].flatten(0, 1)[first_q:first_q + hq]
            k, v = groups[:, g], groups[:, g + 1]
        elif cfg.multi_query:
            q = heads_of(self.q_start, hq)
            k, v = heads_of(heads, 1), heads_of(heads + 1, 1)
        else:
            per_head = heads_of(self.q_start * 3, hq * 3)
            per_head = per_head.reshape(hq, 3, d, *per_head.shape[1:])
            q, k, v = per_head[:, 0], per_head[:, 1], per_head[:, 2]
        rest = param.shape[1:]
        param.data.copy_(torch.cat([t.reshape(-1, *rest) for t in (q, k, v)]))
        if self.int8_on_load and param is self.weight:
            self.quantized = QuantizedWeight(FloatFormat().to_rows({"weight": param.data}, None, self), param.dtype,
                                             param.device)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.linear(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class FalconAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = FalconQKV(config, self.head_dim)
        self.num_heads, self.num_kv_heads = self.query_key_value.num_heads, self.query_key_value.num_kv_heads
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.query_key_value(hidden), self.num_heads, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.dense(self.attn(q, k, v).flatten(1))


class FalconMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.act = Activation(config.activation)
        self.dense_4h_to_h = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.parallel = config.parallel_attn
        self.two_norms = config.parallel_attn and num_ln_in_parallel_attn(config) == 2
        self.self_attention = FalconAttention(config, rotary)
        self.mlp = FalconMLP(config)
        if self.two_norms:
            self.ln_attn = LayerNorm(config.hidden_size, eps)
            self.ln_mlp = LayerNorm(config.hidden_size, eps)
        else:
            self.input_layernorm = LayerNorm(config.hidden_size, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.two_norms:
            x_attn, x_mlp = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            x_attn = x_mlp = self.input_layernorm(hidden)
        attn = self.self_attention(positions, x_attn)
        if self.parallel:
            return self.mlp(x_mlp) + attn + hidden
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class FalconForCausalLM(CausalLM):
    decoder_path, embedding_name, layers_name, norm_name = "transformer", "word_embeddings", "h", "ln_f"

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        check_falcon(config)
        # one cos/sin table for all layers
        rotary = RotaryEmbedding(config, config.hidden_size // config.num_attention_heads, max_positions)
        super().__init__(config, stage, lambda i: FalconDecoderLayer(config, rotary),
                         norm=lambda: LayerNorm(config.hidden_size, config.layer_norm_epsilon))

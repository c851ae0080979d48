"""Mixtral: the Llama/Mistral decoder with a sparse mixture of experts (top-k routing, k = 2 in
released checkpoints) in place of the dense MLP. Experts are sharded across tensor-parallel
ranks like a dense MLP (see runtime/executor/layers/moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.runtime.executor.layers.moe import SparseMoE, expert_checkpoint_mapping
from kubellm.runtime.executor.layers.norm import RMSNorm
from kubellm.runtime.executor.layers.rotary import RotaryEmbedding
from kubellm.runtime.executor.models.llama import LlamaAttention, LlamaForCausalLM
from kubellm.runtime.executor.stages import PipelineStage


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for mixtral; only 'silu' is")
        self.self_attn = LlamaAttention(config, rotary)
        self.block_sparse_moe = SparseMoE(config.num_local_experts, config.num_experts_per_tok,
                                          config.hidden_size, config.intermediate_size)
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
        return self.block_sparse_moe(hidden), residual


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer = MixtralDecoderLayer

    def __init__(self, config, max_positions: int, stage: PipelineStage | None = None):
        super().__init__(config, max_positions, stage)
        self.packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping,
                                       **expert_checkpoint_mapping(config.num_local_experts)}


"""Mixtral: the Llama/Mistral decoder layer with a sparse mixture of experts (top-k routing, k = 2
in released checkpoints) as its MLP. Experts are sharded across tensor-parallel ranks like a
dense MLP (see runtime/executor/layers/moe.py)."""

from __future__ import annotations

from torch import nn

from kubellm.runtime.executor.layers.moe import EXPERT_CHECKPOINT_MAPPING, SparseMoE
from kubellm.runtime.executor.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping, **EXPERT_CHECKPOINT_MAPPING}

    def make_mlp(self, config) -> nn.Module:
        return SparseMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # Checkpoints call the layer's MLP `block_sparse_moe`; it is the Llama layer's `mlp` here
        # (transformers 5 renames it the same way).
        return name.replace(".block_sparse_moe.", ".mlp.")

"""Sparse mixture of experts (Mixtral): a replicated router picks the top-k experts per token.

Tensor parallel shards every expert the way a dense MLP is sharded: each rank holds the same
slice of every expert's w1/w3 (column split of the intermediate dim) and of w2 (row split), so
each rank computes its partial output for every routed token and one all-reduce sums them. Any
tensor-parallel size that divides the intermediate size works, whatever the expert count. Each
expert is an ExpertMLP of linear layers, so quantized checkpoints (AWQ / GPTQ Mixtral) and int8 on
load shard and load as a dense MLP's do.

The experts run one at a time over the tokens routed to them (plain PyTorch, as transformers
does); there is no fused MoE kernel yet. Which experts a step needs is known only on the host
after a sync, which a CUDA graph capture (decode graphs) cannot do: while capturing, every
expert runs over every token and unchosen experts get weight 0 (the same sums up to float
rounding; decode batches are small, and with top-2 of 8 most experts are hit anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.executor.layers.activation import SiluAndMul
from kubellm.runtime.executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from kubellm.runtime.executor.parallel import all_reduce, tp_size


class ReplicatedLinear(nn.Module):
    """The whole weight on every rank (the router)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpertMLP(nn.Module):
    """One expert, sharded as a dense MLP: w1 (gate) and w3 (up) as one column-parallel matmul, w2
    row-parallel without its all-reduce (SparseMoE sums every expert's partial output, then reduces once).
    LinearBase layers, so an expert holds a quantization plan's weights (AWQ, GPTQ, int8) like any linear."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13 = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.w2 = RowParallelLinear(intermediate_size, hidden_size, reduce=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w13(x)))


# Mixtral's per-expert checkpoint tensors (`...experts.<e>.w1.weight`, its qweight, ...) -> ExpertMLP's parts,
# for models' packed_modules_mapping (w2 keeps its name)
EXPERT_CHECKPOINT_MAPPING = {"w1": ("w13", 0), "w3": ("w13", 1)}


class SparseMoE(nn.Module):
    """Router `gate` + `experts`, named as in Mixtral's `block_sparse_moe`; SiLU-gated experts."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok: {top_k} must be between 1 and the {num_experts} experts")
        self.num_experts, self.top_k = num_experts, top_k
        if intermediate_size % tp_size():
            raise ValueError(f"tensor_parallel: {tp_size()} does not split the experts' intermediate size "
                             f"{intermediate_size}")
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, renormalised over the chosen; chosen experts [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        # A CUDA graph or a compiled CPU step (cpu_compile.py) cannot follow a host sync: every expert, densely.
        static = torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
        out = self.dense(x, weights, chosen) if static else self.sparse(x, weights, chosen)
        return all_reduce(out)

    def sparse(self, x, weights, chosen) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # a host sync
            tokens, slot = torch.where(chosen == e)
            h = self.expert(e, x[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def dense(self, x, weights, chosen) -> torch.Tensor:
        """No host sync, fixed shapes: every expert over every token, weight 0 where not chosen."""
        full = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        full.scatter_(1, chosen, weights)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out += (self.expert(e, x) * full[:, e, None]).to(out.dtype)
        return out

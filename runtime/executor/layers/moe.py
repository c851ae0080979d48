"""Sparse mixture of experts (Mixtral): a replicated router picks the top-k experts per token.

Tensor parallel shards every expert the way a dense MLP is sharded: each rank holds the same
slice of every expert's w1/w3 (column split of the intermediate dim) and of w2 (row split), so
each rank computes its partial output for every routed token and one all-reduce sums them. Any
tensor-parallel size that divides the intermediate size works, whatever the expert count.

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
from kubellm.runtime.executor.parallel import all_reduce, tp_rank, tp_size


class ReplicatedLinear(nn.Module):
    """The whole weight on every rank (the router)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpertWeights(nn.Module):
    """All experts' copies of one projection, [num_experts, out, in], this rank's slice of each.

    `kind` "w13": w1 (gate) and w3 (up) packed along out, each column-split; shard id
    (expert, 0 for w1 / 1 for w3). `kind` "w2": row-split along in; shard id (expert, None).
    """

    def __init__(self, kind: str, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.kind = kind
        self.local = intermediate_size // tp_size()
        shape = (num_experts, 2 * self.local, hidden_size) if kind == "w13" else (num_experts, hidden_size, self.local)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id):
        expert, part = shard_id
        n, start = self.local, tp_rank() * self.local
        if self.kind == "w13":
            param.data[expert, part * n:(part + 1) * n].copy_(loaded[start:start + n])
        else:
            param.data[expert].copy_(loaded[:, start:start + n])


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        if intermediate_size % tp_size():
            raise ValueError(f"tensor_parallel: {tp_size()} does not split the experts' intermediate size "
                             f"{intermediate_size}")
        self.w13 = ExpertWeights("w13", num_experts, hidden_size, intermediate_size)
        self.w2 = ExpertWeights("w2", num_experts, hidden_size, intermediate_size)


def expert_checkpoint_mapping(num_experts: int) -> dict:
    """packed_modules_mapping entries for Mixtral's per-expert checkpoint tensors
    (`...experts.<e>.w1.weight` and so on) into the stacked ExpertWeights."""
    mapping = {}
    for e in range(num_experts):
        mapping[f"experts.{e}.w1"] = ("experts.w13", (e, 0))
        mapping[f"experts.{e}.w3"] = ("experts.w13", (e, 1))
        mapping[f"experts.{e}.w2"] = ("experts.w2", (e, None))
    return mapping


class SparseMoE(nn.Module):
    """Router `gate` + `experts`, named as in Mixtral's `block_sparse_moe`; SiLU-gated experts."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok: {top_k} must be between 1 and the {num_experts} experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.act = SiluAndMul()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, renormalised over the chosen; chosen experts [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.act(F.linear(x, self.experts.w13.weight[e]))
        return F.linear(h, self.experts.w2.weight[e])

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

"""Linear layers split across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies in only this
rank's slice. `loaded` may be a tensor or a lazy safetensors slice (`safe_open(...).get_slice`),
so a rank never reads the other ranks' parts of the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.executor.parallel import all_reduce, tp_rank, tp_size


def _rows(loaded, start: int, size: int) -> torch.Tensor:
    return loaded[start:start + size]


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        assert output_size % tp_size() == 0, (output_size, tp_size())
        super().__init__(input_size, output_size // tp_size(), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None):
        size = param.shape[0]
        param.data.copy_(_rows(loaded, tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections packed into one matmul (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int):
        size = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        param.data[offset:offset + size].copy_(_rows(loaded, tp_rank() * size, size))


# Checkpoint names of separate q/k/v projections -> (our fused parameter, shard), for models'
# `packed_modules_mapping`.
PACKED_QKV = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj packed; each rank holds its query heads and their KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = num_kv_heads // tp
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        param.data[offset:offset + size].copy_(_rows(loaded, tp_rank() * size, size))


def split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """q, k and v of a packed [q | k | v] projection output, each as [tokens, heads, head_dim] views."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        assert input_size % tp_size() == 0, (input_size, tp_size())
        super().__init__(input_size // tp_size(), output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is added once, after the reduce
            param.data.copy_(loaded[:])
            return
        size = param.shape[1]
        start = tp_rank() * size
        param.data.copy_(loaded[:, start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if tp_rank() == 0 else None)
        return all_reduce(y)

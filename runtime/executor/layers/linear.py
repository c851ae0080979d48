"""Linear layers split across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies in only this
rank's slice. `loaded` may be a tensor or a lazy safetensors slice (`safe_open(...).get_slice`),
so a rank never reads the other ranks' parts of the checkpoint.

Where a rank's slice lies is the layer's geometry: `_output_shard(shard_id)` (column-parallel: which
checkpoint rows, and where in this rank's output) and `_input_shard()` (row-parallel: which checkpoint
columns). Quantized checkpoints use the same geometry on their packed tensors: a layer built while a
quantization plan is active (layers/quantization/) holds a `QuantizedLinearMethod` instead of a float
`weight`, with one placeholder parameter per checkpoint tensor (qweight, scales, ...) whose loader
cuts this rank's slice out of the packed layout; `forward` is the same either way.
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels.linear_cpu import linear
from kubellm.runtime.executor.layers.quantization import linear_method_for_new_layer
from kubellm.runtime.executor.parallel import all_reduce, tp_rank, tp_size


class LinearBase(nn.Module):
    """`input_size` / `output_size`: this rank's sizes (what x and the output have here)."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.quant_method = linear_method_for_new_layer(self)
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    # -- geometry: where this rank's part of a checkpoint tensor lies (logical rows / columns) ----------
    def output_shards(self) -> list:
        """The shard ids a checkpoint splits this layer's output into (None: one tensor)."""
        return [None]

    def _output_shard(self, shard_id) -> tuple[int, int, int]:
        """(offset in this rank's output, first checkpoint row, rows) of shard `shard_id`."""
        return 0, 0, self.output_size

    def _input_shard(self) -> tuple[int, int]:
        """(first checkpoint column, columns) that this rank multiplies."""
        return 0, self.input_size

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None):
        offset, start, size = self._output_shard(shard_id)
        if param.dim() == 1:  # a bias: output rows only
            param.data[offset:offset + size].copy_(loaded[start:start + size])
            return
        in_start, in_size = self._input_shard()
        piece = loaded[start:start + size] if in_size == self._full_input_size() else \
            loaded[start:start + size, in_start:in_start + in_size]
        param.data[offset:offset + size].copy_(piece)

    def _full_input_size(self) -> int:
        return self.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(x, self.bias)
        return linear(x, self.weight, self.bias)   # a plain or (on CPU, after loading) packed weight


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        assert output_size % tp_size() == 0, (output_size, tp_size())
        super().__init__(input_size, output_size // tp_size(), bias)

    def _output_shard(self, shard_id):
        return 0, tp_rank() * self.output_size, self.output_size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections packed into one matmul (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def output_shards(self):
        return list(range(len(self.output_sizes)))

    def _output_shard(self, shard_id: int):
        size = self.output_sizes[shard_id] // tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp_size()
        return offset, tp_rank() * size, size


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

    def output_shards(self):
        return ["q", "k", "v"]

    def _output_shard(self, shard_id: str):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        return offset, tp_rank() * size, size


def split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """q, k and v of a packed [q | k | v] projection output, each as [tokens, heads, head_dim] views."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce: bool = True):
        assert input_size % tp_size() == 0, (input_size, tp_size())
        super().__init__(input_size // tp_size(), output_size, bias)
        self.reduce = reduce   # False: the caller sums partial outputs first, then reduces once (experts)

    def _input_shard(self):
        return tp_rank() * self.input_size, self.input_size

    def _full_input_size(self) -> int:
        return self.input_size * tp_size()

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is added once, after the reduce
            param.data.copy_(loaded[:])
            return
        start, size = self._input_shard()
        param.data.copy_(loaded[:, start:start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if tp_rank() == 0 else None
        y = self.quant_method.apply(x, bias) if self.quant_method is not None else linear(x, self.weight, bias)
        return all_reduce(y) if self.reduce else y

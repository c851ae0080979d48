"""After loading, on CPU: every float linear's weight moves to oneDNN's packed layout (kernels/linear_cpu.py).

Done once per model, after the checkpoint and any LoRA adapters are in (both write into the plain
tensors). A layer's `weight` parameter is replaced by its packed form, same shape and bytes, so
nothing is held twice; a tied LM head keeps the embedding's plain table for lookups and gets a
packed copy of its own (`packed_weight`). KUBELLM_KERNELS=reference keeps every plain tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from kubellm.kernels import dispatch, linear_cpu
from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from kubellm.runtime.executor.layers.linear import LinearBase


def pack_cpu_weights(model: nn.Module, device: torch.device) -> int:
    """Pack the float linears (and the LM head) of a model on `device`; returns how many were packed."""
    if device.type != "cpu" or dispatch.kernel_mode() == "reference" or not linear_cpu.available():
        return 0
    lookups = {id(m.weight) for m in model.modules()   # tables read by row: an LM head tied to one keeps it
               if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead) and m.quant_method is None}
    packed = 0
    for module in model.modules():
        if not isinstance(module, ParallelLMHead | LinearBase) or module.quant_method is not None \
                or not linear_cpu.can_pack(module.weight):
            continue
        if isinstance(module, ParallelLMHead) and id(module.weight) in lookups:
            module.packed_weight = linear_cpu.pack(module.weight)
        else:
            module.weight = nn.Parameter(linear_cpu.pack(module.weight), requires_grad=False)
        packed += 1
    return packed

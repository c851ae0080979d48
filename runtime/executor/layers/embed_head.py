"""Vocabulary-parallel token embedding and LM head.

From a GGUF file both keep the stored blocks (layers/quantization/: `quant_method`): lookups de-quantize
the rows they gather, the LM head multiplies with the packed table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.kernels.linear_cpu import linear
from kubellm.runtime.executor.layers.quantization import embedding_method_for_new_layer
from kubellm.runtime.executor.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; lookups outside it give zeros."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.shard_size
        self.quant_method = embedding_method_for_new_layer(self)
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None):
        rows = loaded[self.start:min(self.start + self.shard_size, self.vocab_size)]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) if self.quant_method is None else self.quant_method.rows(ids)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return self._lookup(token_ids)
        local = token_ids - self.start
        inside = (local >= 0) & (local < self.shard_size)
        out = self._lookup(local.clamp(0, self.shard_size - 1)) * inside.unsqueeze(-1)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the selected positions only; the tensor ranks' vocabulary slices gathered.
    `bias` (Phi): split by vocabulary like the weight."""

    is_lm_head = True   # a quantized table it holds alone is never gathered by row (layers/quantization/)
    packed_weight = None   # on CPU, a tied head's own packed copy of the embedding (layers/cpu_weights.py)

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False):
        super().__init__(vocab_size, hidden_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            logits = self.quant_method.apply(hidden, self.bias)
        else:
            logits = linear(hidden, self.weight if self.packed_weight is None else self.packed_weight, self.bias)
        return all_gather_last_dim(logits)[:, : self.vocab_size]


def tie_lm_head(model: nn.Module, config, stage, embedding: str) -> dict[str, str]:
    """Share the input embedding with the LM head when the checkpoint ties them. A last pipeline
    stage that is not also the first has no embedding: it reads its own copy of the checkpoint's
    `embedding` tensor, so the returned {checkpoint name: our parameter} goes to the loader."""
    if not (config.tie_word_embeddings and stage.is_last):
        return {}
    if stage.is_first:
        model.lm_head.weight = model.get_parameter(embedding)
        model.lm_head.quant_method = model.get_submodule(embedding.removesuffix(".weight")).quant_method
        return {}
    return {embedding: "lm_head.weight"}

"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`), 4-bit, group-wise, desc_act=False.

Per linear: `qweight` int32 [K/8, N] (eight consecutive input rows per int32, row 8j+i in nibble i),
`qzeros` int32 [K/group, N/8] (columns 8j+i in nibble i), `scales` fp16 [K/group, N] and `g_idx` [K]
(k // group without act-order; checked). w[k, n] = (q - zero) * scale, where the checkpoint stores
zero - 1 in the default 'gptq' checkpoint_format and zero itself in 'gptq_v2'.
"""

from __future__ import annotations

import torch

from kubellm.kernels import quant
from kubellm.runtime.executor.layers.quantization import QuantizationError, QuantPlan
from kubellm.runtime.executor.layers.quantization.awq import unpack_int32
from kubellm.runtime.executor.layers.quantization.layout import Part, read_part
from kubellm.runtime.executor.layers.quantization.packed import Int4Rows


class GPTQFormat:
    def __init__(self, plan: QuantPlan):
        self.plan = plan
        g = plan.group_size if plan.group_size > 0 else None
        self.parts = {"qweight": Part(1, 1, 0, 8), "qzeros": Part(1, 8, 0, g), "scales": Part(1, 1, 0, g),
                      "g_idx": Part(None, 1, 0, 1, optional=True)}
        self.required = ("qweight", "qzeros", "scales")

    def read(self, name, loaded, out_span, in_span, layer):
        return read_part(self.parts[name], loaded, out_span, in_span)

    def to_rows(self, pieces, in_span, layer) -> Int4Rows:
        q = unpack_int32(pieces["qweight"].t()).t()                         # [K/8, N] -> [K, N]
        # (the int32 packing follows the input axis; AWQ's follows the output axis)
        zeros = (unpack_int32(pieces["qzeros"]) + self.plan.zero_offset).float()   # [G, N]
        scales = pieces["scales"].float()
        return Int4Rows(quant.pack_int4(q.t()), scales.t().contiguous(), (-zeros * scales).t().contiguous())

    def check_optional(self, name, loaded, layer):
        """g_idx must be the trivial k // group_size: anything else is act-order, which these rows are not."""
        g_idx = torch.as_tensor(loaded[:])
        group = self.plan.group_size if self.plan.group_size > 0 else g_idx.numel()
        if not torch.equal(g_idx.long().cpu(), torch.arange(g_idx.numel()) // group):
            raise QuantizationError("g_idx: the checkpoint's input columns are reordered (act-order) although "
                                    "quantization_config.desc_act is false; re-quantize with desc_act=False")

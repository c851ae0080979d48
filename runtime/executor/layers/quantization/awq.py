"""AWQ checkpoints (AutoAWQ's GEMM layout, `quant_method: awq`), 4-bit, group-wise with zero points.

Per linear, [in, out]-oriented: `qweight` int32 [K, N/8] and `qzeros` int32 [K/group, N/8], eight 4-bit
values per int32 in AutoAWQ's interleaved order (nibble i holds column ORDER[i] of its eight), and
`scales` fp16 [K/group, N]; w[k, n] = (q - zero) * scale. A column-parallel rank reads its N/8 packed
columns, a row-parallel one its K rows and K/group scale rows.
"""

from __future__ import annotations

import torch

from kubellm.kernels import quant
from kubellm.runtime.executor.layers.quantization import QuantPlan
from kubellm.runtime.executor.layers.quantization.layout import Part
from kubellm.runtime.executor.layers.quantization.packed import Int4Rows

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)            # AutoAWQ's pack order: nibble i <- column ORDER[i]
UNORDER = tuple(ORDER.index(c) for c in range(8))   # column c <- nibble UNORDER[c]


def unpack_int32(packed: torch.Tensor, order=None, bits: int = 4) -> torch.Tensor:
    """int32 [..., m] -> int32 [..., (32 / bits) m] of `bits`-bit values; `order`: column c taken from field
    order[c] (fields counted from the lowest bits)."""
    per = 32 // bits
    shifts = torch.tensor(order if order is not None else range(per), dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> (shifts * bits)) & ((1 << bits) - 1)).flatten(-2)


def pack_int32(values: torch.Tensor, order=None, bits: int = 4) -> torch.Tensor:
    """Inverse of unpack_int32 (for writing test checkpoints): [..., (32 / bits) m] values -> int32 [..., m]."""
    per = 32 // bits
    v = values.to(torch.int32).reshape(*values.shape[:-1], -1, per)
    columns = order if order is not None else range(per)   # field i holds column columns[i]
    out = torch.zeros(v.shape[:-1], dtype=torch.int32, device=values.device)
    for i, c in enumerate(columns):
        out |= v[..., c] << (bits * i)
    return out


class AWQFormat:
    def __init__(self, plan: QuantPlan):
        g = plan.group_size if plan.group_size > 0 else None
        self.parts = {"qweight": Part(1, 8, 0, 1), "qzeros": Part(1, 8, 0, g), "scales": Part(1, 1, 0, g)}
        self.required = tuple(self.parts)

    def read(self, name, loaded, out_span, in_span, layer):
        from kubellm.runtime.executor.layers.quantization.layout import read_part

        return read_part(self.parts[name], loaded, out_span, in_span)

    def to_rows(self, pieces, in_span, layer) -> Int4Rows:
        q = unpack_int32(pieces["qweight"], UNORDER)              # [K, N]
        zeros = unpack_int32(pieces["qzeros"], UNORDER).float()   # [G, N]
        scales = pieces["scales"].float()                         # [G, N]
        return Int4Rows(quant.pack_int4(q.t()), scales.t().contiguous(), (-zeros * scales).t().contiguous())

    def check_optional(self, name, loaded, layer):
        pass

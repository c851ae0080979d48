"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`), 4- or 8-bit, group-wise, with or without
act-order.

Per linear, with p = 32 / bits values per int32: `qweight` int32 [K/p, N] (p consecutive input rows per
int32, row pj+i in field i), `qzeros` int32 [K/group, N/p] (columns pj+i in field i), `scales` fp16
[K/group, N] and `g_idx` [K], the group of each input column. w[k, n] = (q[k, n] - zero[g_idx[k], n]) *
scale[g_idx[k], n], where the checkpoint stores zero - 1 in the default 'gptq' checkpoint_format and zero
itself in 'gptq_v2'. 4-bit rows are int4 with mins (-zero * scale). 8-bit rows of a symmetric checkpoint
(every zero 128, `sym: true`, as Qwen's GPTQ-Int8 models are) are int8 group-wise, exactly; an asymmetric
one's are re-quantized to int8 per output channel (the int8 kernels are symmetric).

Without act-order g_idx is k // group (checked), so a group is group_size contiguous columns. With it
(`desc_act: true`) GPTQ quantized the columns in order of importance, and g_idx scatters each group over
the input. The rows are then stored with each group's columns gathered together (`PermutedRows`), and the
layer gathers its input in that order: one index_select of the activations, while the weight kernels stay
the plain group-wise ones. A row-parallel rank holds a contiguous slice of the input columns, so it reads
every group's scales and zeros and pads the groups it holds unequal parts of (zero input columns).
"""

from __future__ import annotations

import torch

from kubellm.kernels import quant, quant_cpu
from kubellm.runtime.executor.layers.quantization import QuantizationError, QuantPlan
from kubellm.runtime.executor.layers.quantization.awq import unpack_int32
from kubellm.runtime.executor.layers.quantization.layout import Part, read_part
from kubellm.runtime.executor.layers.quantization.packed import (
    FloatRows,
    Int4Rows,
    Int8Rows,
    PermutedRows,
    int8_per_channel,
)


class GPTQFormat:
    def __init__(self, plan: QuantPlan):
        self.plan = plan
        g = plan.group_size if plan.group_size > 0 else None
        per = 32 // plan.bits
        self.parts = {"qweight": Part(1, 1, 0, per), "qzeros": Part(1, per, 0, g), "scales": Part(1, 1, 0, g),
                      "g_idx": Part(None, 1, 0, 1, optional=not plan.act_order)}
        self.required = ("qweight", "qzeros", "scales") + (("g_idx",) if plan.act_order else ())

    def read(self, name, loaded, out_span, in_span, layer):
        if self.plan.act_order and name in ("qzeros", "scales"):
            in_span = None   # a slice of columns may hold members of any group
        return read_part(self.parts[name], loaded, out_span, in_span)

    def to_rows(self, pieces, in_span, layer):
        bits = self.plan.bits
        q = unpack_int32(pieces["qweight"].t(), bits=bits).t()                  # [K/p, N] -> [K, N]
        # (the int32 packing follows the input axis; AWQ's follows the output axis)
        zeros = unpack_int32(pieces["qzeros"], bits=bits) + self.plan.zero_offset   # [G, N]
        scales = pieces["scales"].float()
        if self.plan.act_order:
            group = self.plan.group_size if self.plan.group_size > 0 else layer._full_input_size()
            return act_order_rows(q, scales, zeros, torch.as_tensor(pieces["g_idx"][:]).long(), group, bits)
        return stored_rows(q, scales, zeros, bits)

    def check_optional(self, name, loaded, layer):
        """g_idx must be the trivial k // group_size: anything else is act-order, which desc_act must say."""
        g_idx = torch.as_tensor(loaded[:])
        group = self.plan.group_size if self.plan.group_size > 0 else g_idx.numel()
        if not torch.equal(g_idx.long().cpu(), torch.arange(g_idx.numel()) // group):
            raise QuantizationError("g_idx: the checkpoint's input columns are reordered (act-order) although "
                                    "quantization_config.desc_act is false; set desc_act: true in its config.json")


def padded_group(most: int, equal: bool, group_size: int) -> int:
    """Stored columns per group: the count itself when every group has it, else the next size torch's CPU
    int4 kernel takes, if no wider than the checkpoint's groups (else the largest count, made even)."""
    if equal:
        return most
    return next((g for g in quant_cpu.INT4_GROUPS if most <= g <= group_size), most + most % 2)


def stored_rows(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int):
    """q [K, N] (groups of contiguous columns), scales / zeros [G, N] -> this rank's rows [N, K]."""
    if bits == 4:
        mins = -zeros.float() * scales
        return Int4Rows(quant.pack_int4(q.t()), scales.t().contiguous(), mins.t().contiguous())
    if bool((zeros == 128).all()):   # symmetric: q - 128 is the int8 value, exactly
        return Int8Rows((q - 128).to(torch.int8).t().contiguous(), scales.t().contiguous())
    group = q.shape[0] // zeros.shape[0]
    w = (q.float() - zeros.float().repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    return int8_per_channel(FloatRows(w.t()))


def act_order_rows(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                   group_size: int, bits: int = 4):
    """q [K, N] in input order, scales / zeros [G, N] for every group, g_idx [K] -> rows stored group by
    group (`PermutedRows`, or plain rows where that order is the input's own). `group_size`: the
    checkpoint's columns per group (the whole input for -1)."""
    width, groups = q.shape[0], scales.shape[0]
    if g_idx.shape != (width,) or (width and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups)):
        raise QuantizationError(f"g_idx: must give each of the {width} input columns a group in [0, {groups}) "
                                f"(the rows of scales); got shape {tuple(g_idx.shape)}, values "
                                f"{int(g_idx.min()) if width else 0}..{int(g_idx.max()) if width else 0}")
    order = torch.argsort(g_idx, stable=True)
    present, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    size = padded_group(int(counts.max()), bool((counts == counts[0]).all()), group_size)
    # stored column (group i, slot j) <- input column order[starts[i] + j], or the padding column `width`
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(size)
    source = torch.where(slot < counts[:, None], starts[:, None] + slot, width).reshape(-1)
    stored_order = torch.cat([order, torch.tensor([width])])[source]
    if size * len(present) == width and torch.equal(stored_order, torch.arange(width)):
        return stored_rows(q, scales[present], zeros[present], bits)
    padded = torch.cat([q, q.new_zeros(1, q.shape[1])])[stored_order]      # [stored, N]
    pad = stored_order == width
    padded[pad] = zeros[present][(torch.arange(len(stored_order)) // size)[pad]]   # q = zero: w = 0 there
    return PermutedRows(stored_rows(padded, scales[present], zeros[present], bits), stored_order, width)

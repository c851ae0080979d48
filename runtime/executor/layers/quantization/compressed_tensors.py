"""compressed-tensors checkpoints (llm-compressor, `quant_method: compressed-tensors`): one weight scheme
for every Linear, in one of its formats.

- pack-quantized (W4A16 / W8A16): `weight_packed` int32 [N, K*bits/32], 32/bits values per int32 along the
  input (column pj+i in field i), each stored as its signed value plus 2^(bits-1); `weight_scale` [N, G]
  (strategy group; G = 1 for channel, [1] for tensor); `weight_zero_point` (asymmetric only) packed the
  same way along the output axis, [N*bits/32, G]; `weight_g_idx` [K] with actorder 'group'.
  w = (q - zero) * scale, so in the unsigned stored values it is GPTQ's form with zero 2^(bits-1) when
  symmetric: the rows are gptq.py's (int4 with mins; symmetric int8 exactly; act-order gathered).
- int-quantized (W8A8 int8): `weight` int8 [N, K] as it is, scales (and zero points) as above.
- float-quantized (FP8 e4m3): `weight` float8 [N, K] times `weight_scale` (tensor, channel, group or block),
  kept FP8 (`Fp8Rows`: a scale per group of columns) where a kernel multiplies it (Triton on sm89+ GPUs,
  the reference), de-quantized on load elsewhere (the CPU); int8 or float when the plan says.
  transformers' own FP8 checkpoints (`quant_method: fp8`: DeepSeek's, Qwen's *-FP8) are the same thing with
  their scale named `weight_scale_inv` over blocks of `weight_block_size` (the last block of a row or column
  may be partial); AutoFP8's (no block size) have one `weight_scale` per tensor and an `input_scale`, unused
  here (the activations stay float).
Activation quantization in the scheme (W8A8) is not applied: kubellm serves the weights, activations float.
"""

from __future__ import annotations

import math

import torch

from kubellm.runtime.executor.layers.quantization import QuantizationError, QuantPlan
from kubellm.runtime.executor.layers.quantization.awq import unpack_int32
from kubellm.runtime.executor.layers.quantization.gptq import act_order_rows, stored_rows
from kubellm.runtime.executor.layers.quantization.layout import Part, read_part
from kubellm.runtime.executor.layers.quantization.packed import FloatRows, Fp8Rows


# a tensor's dtype as torch or safetensors names it, for the float types a kept-float layer is stored in
_PLAIN_FLOATS = {"F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64"}


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, groups] from a per-group / per-channel tensor, or from the one value of strategy tensor."""
    return t.reshape(1, 1).expand(rows, 1) if t.numel() == 1 else t.reshape(rows, -1)


# A scale per fewer FP8 columns costs more bytes than it saves (a float32 scale per 8 e4m3 weights: 1.5 bytes each)
FP8_MIN_GROUP = 8


def _one_per_group(per_element: torch.Tensor, group: int) -> torch.Tensor | None:
    """[n, k / group] from each element's scale [n, k] when every group of columns shares one; else None."""
    n, k = per_element.shape
    if group < FP8_MIN_GROUP:
        return None
    grouped = per_element.reshape(n, k // group, group)
    return grouped[:, :, 0] if torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)) else None


class CompressedTensorsFormat:
    def __init__(self, plan: QuantPlan):
        self.plan = plan
        packed = plan.scheme == "pack-quantized"
        per = 32 // plan.bits if packed else 1
        if plan.strategy == "block":
            rows, cols = plan.block
            scale = Part(0, rows, 1, cols)
        elif plan.strategy == "tensor":
            scale = Part(None, 1, None, 1)
        else:
            scale = Part(0, 1, 1, plan.group_size if plan.group_size > 0 else None)
        # transformers' fp8 checkpoints name a block's scale weight_scale_inv (it multiplies, as weight_scale does)
        self.scale_name = "weight_scale_inv" if plan.stored == "fp8" and plan.strategy == "block" else "weight_scale"
        self.parts = {("weight_packed" if packed else "weight"): Part(0, 1, 1, per), self.scale_name: scale,
                      "weight_shape": Part(None, 1, None, 1, optional=True),
                      "weight_g_idx": Part(None, 1, 0, 1, optional=not plan.act_order),
                      "input_scale": Part(None, 1, None, 1, optional=True)}   # static FP8 activations: unused
        if not plan.symmetric:
            self.parts["weight_zero_point"] = Part(0, per, 1, scale.in_factor) if plan.strategy != "tensor" else scale
        self.required = tuple(n for n, p in self.parts.items() if not p.optional)

    def is_kept_float(self, name, loaded) -> bool:
        """A plain float `weight` where int8 / FP8 values are stored: a layer the recipe left float (`ignore`)."""
        if name != "weight" or self.plan.scheme == "pack-quantized":
            return False
        dtype = loaded.dtype if isinstance(loaded, torch.Tensor) else getattr(loaded, "get_dtype", lambda: None)()
        return str(dtype).removeprefix("torch.").upper() in _PLAIN_FLOATS

    def read(self, name, loaded, out_span, in_span, layer):
        if name == self.scale_name and self.plan.strategy == "block":
            return self._block_scales(loaded, out_span, in_span or (0, layer._full_input_size()))
        if self.plan.act_order and name in ("weight_scale", "weight_zero_point"):
            in_span = None   # a slice of columns may hold members of any group
        return read_part(self.parts[name], loaded, out_span, in_span)

    def _block_scales(self, loaded, out_span, in_span) -> torch.Tensor:
        """Each of this rank's weight elements' scale [rows, columns]: the scale tensor is tiny (one per block)
        and read whole, so a rank's slice need not start or end on a block, and the last block may be partial."""
        rows, cols = self.plan.block
        scales = torch.as_tensor(loaded[:]).float()
        (out_start, out_size), (in_start, in_size) = out_span, in_span
        needed = (-(-(out_start + out_size) // rows), -(-(in_start + in_size) // cols))
        if scales.dim() != 2 or scales.shape[0] < needed[0] or scales.shape[1] < needed[1]:
            raise QuantizationError(f"{self.scale_name}: shape {tuple(scales.shape)} has too few blocks for blocks of "
                                    f"[{rows}, {cols}] over rows up to {out_start + out_size} and columns up to "
                                    f"{in_start + in_size} (at least {list(needed)}); check the block size "
                                    "(weight_block_size / block_structure) in config.json")
        by_row = scales[torch.arange(out_start, out_start + out_size) // rows]
        return by_row[:, torch.arange(in_start, in_start + in_size) // cols]

    def to_rows(self, pieces, in_span, layer):
        plan = self.plan
        scales = torch.as_tensor(pieces[self.scale_name][()]).float()
        if plan.scheme == "float-quantized":
            return self._fp8_rows(torch.as_tensor(pieces["weight"][:]), scales)
        offset = 1 << (plan.bits - 1)
        if plan.scheme == "pack-quantized":   # [N, K] unsigned; the last int32 may be padding past K
            width = in_span[1] if in_span is not None else layer._full_input_size()
            q = unpack_int32(pieces["weight_packed"], bits=plan.bits)[:, :width]
        else:
            q = torch.as_tensor(pieces["weight"][:]).to(torch.int32) + offset
        n = q.shape[0]
        scales = _per_row(scales, n)
        if plan.symmetric:
            zeros = torch.full(scales.shape, offset, dtype=torch.int32)
        else:
            zp = torch.as_tensor(pieces["weight_zero_point"][:])
            if plan.scheme == "pack-quantized":
                zeros = unpack_int32(zp.t().contiguous(), bits=plan.bits).t()[:n]   # packed along the rows
            else:
                zeros = zp.to(torch.int32) + offset
            zeros = _per_row(zeros, n)
        q, scales, zeros = q.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous()   # GPTQ's [K, N]
        if plan.act_order:
            group = plan.group_size if plan.group_size > 0 else layer._full_input_size()
            g_idx = torch.as_tensor(pieces["weight_g_idx"][:]).long()
            return act_order_rows(q, scales, zeros, g_idx, group, plan.bits)
        return stored_rows(q, scales, zeros, plan.bits)

    def _fp8_rows(self, w: torch.Tensor, scales: torch.Tensor):
        """e4m3 weights as stored, with one float32 scale per group of columns of each row (quant.py's fp8
        form): per tensor and per channel one group, per group its own; per block, groups of gcd(block columns,
        K) where a rank's columns start on one (a partial last block or a TP slice inside a block still does).
        Anything else (e5m2, groups under FP8_MIN_GROUP columns) is de-quantized here."""
        n, k = w.shape
        if scales.numel() == 1:   # strategy tensor
            scales = scales.reshape(1, 1).expand(n, 1)
        elif scales.dim() < 2:    # strategy channel, stored [n]
            scales = scales.reshape(n, 1)
        elif scales.shape[0] != n:
            scales = scales.repeat_interleave(n // scales.shape[0], 0)
        grouped = scales
        if self.plan.strategy == "block":   # _block_scales gave each element's scale
            grouped = _one_per_group(scales, math.gcd(self.plan.block[1], k))
        if grouped is None or w.dtype != torch.float8_e4m3fn or k % grouped.shape[1]:
            return FloatRows(w.float() * scales.repeat_interleave(k // scales.shape[1], 1))
        return Fp8Rows(w, grouped.float().contiguous())

    def check_optional(self, name, loaded, layer):
        """weight_shape is implied by the layer, input_scale unused; a g_idx without actorder 'group' must be
        the trivial one."""
        if name != "weight_g_idx":
            return
        g_idx = torch.as_tensor(loaded[:]).long()
        group = self.plan.group_size if self.plan.group_size > 0 else g_idx.numel()
        if not torch.equal(g_idx, torch.arange(g_idx.numel()) // group):
            raise QuantizationError("weight_g_idx: the input columns are reordered although the scheme's actorder "
                                    "is not 'group'; set weights.actorder: group in config.json")

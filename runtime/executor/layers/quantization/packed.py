"""One layer's quantized weight once loaded: rows in a common form, and the module that multiplies with it.

Every format's reader (awq.py, gptq.py, gguf.py, int8.py, compressed_tensors.py) turns this rank's slice of
its checkpoint tensors into `Int4Rows`, `Int8Rows`, `Fp8Rows` or `FloatRows` (a fused projection's shards one
by one); `combine`
stacks the shards, `serve_as` applies the plan's serving form (int8 on load, de-quantize to float), and
`QuantizedWeight` keeps the result in the form its device computes fastest with (kernels/quant*.py):
the int4pack / int8pack layouts of torch's CPU kernels on CPU, quant.py's layout for Triton on a GPU and
for the reference (KUBELLM_KERNELS=reference). FP8 stays FP8 where a kernel multiplies it (`fp8_kept`), and is
de-quantized once, on load, elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kubellm.kernels import dispatch, linear_cpu, quant, quant_cpu


@dataclass
class Int4Rows:
    """w = q * scales + mins per group; qweight uint8 [n, k/2] (quant.py's packing), scales / mins [n, groups]."""
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_int4(self.qweight, self.scales.float(), self.mins.float())


@dataclass
class Int8Rows:
    """w = q * scales per group; qweight int8 [n, k], scales [n, groups] (1 group: per output channel)."""
    qweight: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_int8(self.qweight, self.scales.float())


@dataclass
class Fp8Rows:
    """w = q * scales per group; qweight float8_e4m3fn [n, k], scales float32 [n, groups]."""
    qweight: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_int8(self.qweight, self.scales.float())


@dataclass
class FloatRows:
    weight: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


@dataclass
class PermutedRows:
    """Rows whose stored columns are this rank's input columns in another order: GPTQ's act-order groups
    gathered so that each group's columns are contiguous. Stored column j multiplies input column order[j];
    order[j] == width is a padding column (zero input), where a rank's slice holds unequal parts of groups."""
    rows: Int4Rows | Int8Rows
    order: torch.Tensor
    width: int

    def dequantize(self) -> torch.Tensor:
        """[n, width] in the input's own column order."""
        w = self.rows.dequantize()
        out = w.new_zeros(w.shape[0], self.width + 1)
        out[:, self.order] = w
        return out[:, :self.width]


@dataclass
class SplitRows:
    """A fused projection whose shards cannot share one form (a Q4_K_M GGUF's q and k in Q4_K, v in Q6_K): runs
    of shards of one form, each multiplied as stored, their outputs side by side. Exact, where one form for all
    would re-quantize some shards (and int4 shards made int8 take twice their bytes)."""
    parts: list

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


Rows = Int4Rows | Int8Rows | Fp8Rows | FloatRows | PermutedRows | SplitRows


def _stack_key(rows: Rows):
    """Rows of equal keys stack into one tensor set: the same form and the same groups."""
    return type(rows), None if isinstance(rows, FloatRows) else rows.scales.shape[1]


def int8_per_channel(rows: Rows) -> Int8Rows:
    q, scales = quant.quantize_int8(rows.dequantize())
    return Int8Rows(q, scales)


def combine(shards: list[tuple[int, Rows]]) -> Rows:
    """Stack shards (offset, rows) in output order. Shards of different int4 / int8 forms or group counts (a GGUF
    may store q as Q4_K and v as Q6_K) stay as they are, side by side (`SplitRows`); with a float or FP8 shard
    among them, float."""
    parts = [rows for _, rows in sorted(shards, key=lambda s: s[0])]
    kinds = {type(p) for p in parts}
    if len(parts) == 1:
        return parts[0]
    if PermutedRows in kinds:
        # one input feeds every shard, so one gather of it must serve all: the same order, or exact float
        first = parts[0]
        if kinds == {PermutedRows} and all(torch.equal(p.order, first.order) for p in parts):
            return PermutedRows(combine(list(enumerate(p.rows for p in parts))), first.order, first.width)
        return FloatRows(torch.cat([p.dequantize() for p in parts]))
    if kinds == {FloatRows}:
        return FloatRows(torch.cat([p.weight for p in parts]))
    groups = {p.scales.shape[1] for p in parts if not isinstance(p, FloatRows)}
    if kinds == {Fp8Rows} and len(groups) == 1:
        return Fp8Rows(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
    if FloatRows in kinds or Fp8Rows in kinds:   # a shard kept float, or FP8 scaled otherwise: exact float
        return FloatRows(torch.cat([p.dequantize() for p in parts]))
    if kinds == {Int4Rows} and len(groups) == 1:
        return Int4Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("qweight", "scales", "mins")))
    if kinds == {Int8Rows} and len(groups) == 1:
        return Int8Rows(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
    runs: list[list[Rows]] = []
    for p in parts:
        if runs and _stack_key(runs[-1][0]) == _stack_key(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    return SplitRows([combine(list(enumerate(run))) for run in runs])


def serve_as(rows: Rows, serve: str) -> Rows:
    """The plan's serving form: native (as stored), int8 (per output channel) or float."""
    if serve == "float":
        return FloatRows(rows.dequantize())
    if serve == "int8" and not (isinstance(rows, Int8Rows) and rows.scales.shape[1] == 1):
        return int8_per_channel(rows)
    return rows


def _on_cpu_fast_path(device: torch.device) -> bool:
    return device.type == "cpu" and dispatch.kernel_mode() != "reference"


def fp8_kept(device: torch.device) -> bool:
    """FP8 weights stay FP8 where a kernel multiplies them as they are: a GPU of compute capability 8.9 or
    more with Triton (its e4m3 conversion: Ada, Hopper), or the reference (KUBELLM_KERNELS=reference).
    Elsewhere they are de-quantized on load: the CPU's oneDNN float linear, or a GPU's bf16 GEMM, beats
    de-quantizing on every call."""
    if device.type == "cuda":
        reference = dispatch.kernel_mode() == "reference"
        return reference or (dispatch.triton_installed() and torch.cuda.get_device_capability(device) >= (8, 9))
    return not _on_cpu_fast_path(device)


class QuantizedWeight(nn.Module):
    """A [out, in] weight in one of the forms below (buffers), with `linear(x, bias)` and `rows(ids)`.

    form "float" (weight), "int4" (qweight, scales, mins: quant.py), "int8" (qweight, scales: quant.py),
    "fp8" (qweight float8_e4m3fn, scales float32: quant.py), "split" (parts: one QuantizedWeight per run of
    shards of one form, SplitRows),
    "int4_cpu" (qweight int4pack, scales_and_zeros), "int8_cpu" (qweight, scales bf16 [out]).
    A float weight on CPU is multiplied in oneDNN's packed layout (kernels/linear_cpu.py): `weight` itself, or,
    when it is also gathered by row, `packed`, a copy made on its first matmul (only a table tied to the LM head
    has one; not a buffer: a step reads one of the two)."""

    packed: torch.Tensor | None = None
    pack_on_use = False
    pad_input = False   # PermutedRows whose order holds the zero padding column

    def __init__(self, rows: Rows, dtype: torch.dtype, device: torch.device, gather: bool = False):
        """`gather`: the weight is also an embedding table, so rows(ids) must work (int4pack cannot)."""
        super().__init__()
        order = None   # buffer input_order: PermutedRows' input columns in stored order
        if isinstance(rows, PermutedRows):
            order, self.pad_input = rows.order.long(), bool((rows.order == rows.width).any())
            rows = rows.rows
        self.register_buffer("input_order", order, persistent=False)
        if isinstance(rows, SplitRows):
            self.form = "split"
            self.parts = nn.ModuleList(QuantizedWeight(p, dtype, device) for p in rows.parts)
            self.out_features = sum(p.out_features for p in self.parts)
            return
        self.out_features = rows.qweight.shape[0] if not isinstance(rows, FloatRows) else rows.weight.shape[0]
        cpu = _on_cpu_fast_path(device)
        if isinstance(rows, Fp8Rows):
            if fp8_kept(device):
                self.form = "fp8"
                self._keep(qweight=rows.qweight, scales=rows.scales.float())
                return
            rows = FloatRows(rows.dequantize())
        if isinstance(rows, FloatRows):
            self.form = "float"
            weight = rows.weight.to(dtype)
            if cpu and linear_cpu.available() and linear_cpu.can_pack(weight):
                if gather:
                    self.pack_on_use = True
                else:
                    weight = linear_cpu.pack(weight)
            self._keep(weight=weight)
        elif isinstance(rows, Int4Rows):
            k, groups = rows.qweight.shape[1] * 2, rows.scales.shape[1]
            self.group_size = k // groups
            if cpu and gather:   # the CPU int4 layout cannot be gathered by row: int8 instead
                rows = int8_per_channel(rows)
            elif cpu and quant_cpu.int4_supported(k, self.group_size):
                self.form = "int4_cpu"
                packed, scales_and_zeros = quant_cpu.prepare_int4(rows.qweight, rows.scales, rows.mins)
                self._keep(qweight=packed, scales_and_zeros=scales_and_zeros)
                return
            else:
                self.form = "int4"
                self._keep(qweight=rows.qweight, scales=rows.scales.to(dtype), mins=rows.mins.to(dtype))
                return
        if isinstance(rows, Int8Rows):
            if cpu:
                self.form = "int8_cpu"
                q, scales = quant_cpu.prepare_int8(rows.qweight, rows.scales)
                self._keep(qweight=q, scales=scales)
            else:
                self.form = "int8"
                self._keep(qweight=rows.qweight, scales=rows.scales.to(dtype))

    def _keep(self, **tensors):
        for name, t in tensors.items():
            self.register_buffer(name, t if t.is_mkldnn else t.contiguous(), persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_order is not None:
            if self.pad_input:
                x = torch.nn.functional.pad(x, (0, 1))
            x = x.index_select(-1, self.input_order)
        form = self.form
        if form == "int4_cpu":
            return quant_cpu.int4_linear(x, self.qweight, self.scales_and_zeros, self.group_size, bias)
        if form == "int8_cpu":
            return quant_cpu.int8_linear(x, self.qweight, self.scales, bias)
        if form == "int4":
            return dispatch.int4_linear(x, self.qweight, self.scales, self.mins, bias)
        if form == "int8":
            return dispatch.int8_linear(x, self.qweight, self.scales, bias)
        if form == "fp8":
            return dispatch.fp8_linear(x, self.qweight, self.scales, bias)
        if form == "split":
            y = torch.cat([p.linear(x, None) for p in self.parts], dim=-1)
            return y if bias is None else y + bias
        if self.pack_on_use and self.packed is None:
            self.packed = linear_cpu.pack(self.weight)
        return linear_cpu.linear(x, self.weight if self.packed is None else self.packed, bias)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight in `dtype` (an embedding lookup)."""
        if self.form == "float":
            return torch.nn.functional.embedding(ids, self.weight)
        if self.form in ("int8", "int8_cpu", "fp8"):
            scales = self.scales if self.scales.dim() == 2 else self.scales.unsqueeze(1)
            return quant.dequantize_int8(self.qweight[ids], scales[ids].float()).to(dtype)
        if self.form == "int4":
            return quant.dequantize_int4(self.qweight[ids], self.scales[ids].float(), self.mins[ids].float()).to(dtype)
        raise RuntimeError("rows() of an int4pack weight: it was not built with gather=True")

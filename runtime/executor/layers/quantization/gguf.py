"""GGUF files read directly: their tensors under Hugging Face names, lazily, and their blocks as int4 / int8 rows.

A GGUF tensor of llama.cpp's block types is rows of blocks of 32 input columns: Q4_0 (fp16 scale d, 16
bytes of nibbles: w = (q - 8) * d), Q4_1 (d and a minimum m: w = q * d + m) and Q8_0 (d, 32 int8: w = q * d).
Those three become int4 / int8 rows block for block (no float copy); F32 / F16 / BF16 tensors stay float;
any other type (K-quants, ...) is de-quantized with the `gguf` package and re-quantized to int8 per row.

The file is memory-mapped (`gguf.GGUFReader`): a rank reads only its rows (column-parallel) or its blocks
(row-parallel; 32 must divide its columns). llama.cpp's converter permutes the rows of attn_q / attn_k
for its rotary layout; `GGUFTensor` undoes that with a row order, so rows are in Hugging Face order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from kubellm.runtime.executor.layers.quantization import QuantizationError
from kubellm.runtime.executor.layers.quantization.layout import IN_MISFIT, stored_span
from kubellm.runtime.executor.layers.quantization.packed import FloatRows, Int4Rows, Int8Rows, int8_per_channel
from kubellm.runtime.gguf_file import SUPPORTED_ARCHITECTURES, field, open_reader

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for what kubellm recomputes (rope_freqs)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """GGUF row of each Hugging Face row of attn_q / attn_k (llama.cpp's `permute` interleaves each head's halves)."""
    d = rows // heads
    return torch.arange(rows).reshape(heads, d // 2, 2).permute(0, 2, 1).reshape(-1)


class GGUFTensor:
    """One tensor, [rows, columns] as Hugging Face orients it. Indexing gives float32 (de-quantized rows);
    `raw(out_span, in_span)` gives this rank's stored blocks as (type, uint8 [rows, bytes])."""

    def __init__(self, tensor, row_order: torch.Tensor | None):
        import gguf

        self.type = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        self.block, self.block_bytes = gguf.GGML_QUANT_SIZES[self.type]
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        self.data = tensor.data
        self.row_order = row_order

    @property
    def quantized(self) -> bool:
        return self.block > 1

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if self.row_order is None:
            return self.data[start:stop]
        return self.data[self.row_order[start:stop].numpy()]

    def raw(self, out_span: tuple[int, int], in_span: tuple[int, int] | None):
        start, size = out_span
        rows = self._rows(start, start + size)
        if in_span is not None:
            span = stored_span(*in_span, self.block, IN_MISFIT.replace("group_size", "GGUF block"))
            unit = self.block_bytes if self.quantized else 1
            rows = rows[:, span.start * unit:span.stop * unit]
        return self.type, torch.from_numpy(np.array(rows))   # a copy: the mapped file is read-only

    def __getitem__(self, index) -> torch.Tensor:
        import gguf

        if len(self.shape) == 1:
            return torch.from_numpy(np.array(self.data[index], dtype=np.float32))
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        start, stop, _ = rows.indices(self.shape[0])
        data = np.asarray(self._rows(start, stop))
        values = gguf.quants.dequantize(data, self.type) if self.quantized else data
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[:, cols]


class GGUFFile:
    """The tensors of one .gguf file under Hugging Face names (the `open_tensors` interface of checkpoint.py)."""

    def __init__(self, path: Path):
        self.reader = reader = open_reader(path)
        arch = field(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise QuantizationError(f"model: {path.name} is a GGUF of architecture {arch!r}; kubellm reads GGUF "
                                    f"files of {', '.join(SUPPORTED_ARCHITECTURES)} models")
        heads = {"attn_q": field(reader, f"{arch}.attention.head_count"),
                 "attn_k": field(reader, f"{arch}.attention.head_count_kv")}
        self.tensors = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
            order = None
            if arch == "llama" and kind in heads and t.name.endswith(".weight"):
                order = unpermute_rows(int(t.shape[-1]), int(heads[kind]))
            self.tensors[name] = (t, order)

    def names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str) -> GGUFTensor:
        return GGUFTensor(*self.tensors[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name][0].shape.tolist()))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name][0].data.nbytes)


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def rows_from_blocks(qtype, raw: torch.Tensor):
    """This rank's stored rows (uint8 bytes, or float for F32/F16/BF16) -> int4 / int8 / float rows."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16, T.BF16):
        if qtype == T.BF16:
            raw = raw.view(torch.int16).view(torch.bfloat16)
        return FloatRows(raw.float())
    n = raw.shape[0]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(n, -1, block_bytes)
    if qtype in (T.Q4_0, T.Q4_1):
        qs = blocks[..., 2 if qtype == T.Q4_0 else 4:]
        values = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, -1)   # elements 0..15 low, 16..31 high
        d = _fp16(blocks, 0)
        mins = -8 * d if qtype == T.Q4_0 else _fp16(blocks, 2)
        from kubellm.kernels import quant

        return Int4Rows(quant.pack_int4(values), d, mins)
    if qtype == T.Q8_0:
        return Int8Rows(blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1), _fp16(blocks, 0))
    # other block types: the gguf package de-quantizes, then int8 per row (kernels for them are not written)
    values = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float32))
    return int8_per_channel(FloatRows(values))


class GGUFFormat:
    """The linears' (and embedding's) reader for GGUF tensors: one stored part, `weight`."""

    def __init__(self):
        from kubellm.runtime.executor.layers.quantization.layout import Part

        self.parts = {"weight": Part(0, 1, 1, 32)}
        self.required = ("weight",)

    def read(self, name, loaded, out_span, in_span, layer):
        if not isinstance(getattr(loaded, "piece", loaded), GGUFTensor):
            raise QuantizationError("model: a GGUF plan read a tensor that is not from a .gguf file")
        return loaded.raw(out_span, in_span)

    def to_rows(self, pieces, in_span, layer):
        return rows_from_blocks(*pieces["weight"])

    def check_optional(self, name, loaded, layer):
        pass
